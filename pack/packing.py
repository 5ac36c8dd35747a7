"""The one int4 packing module of pdqkit: writer, kernels and tests all use it.

compressed-tensors ``pack-quantized`` layout (spec pack-quantized.md §2.1)
-------------------------------------------------------------------------
A quantized ``nn.Linear`` with weight ``W[N, K]`` (N = out_features, K = in_features) is stored as

* ``weight_packed``  int32 ``[N, ceil(K/8)]``: eight 4-bit codes per word, packed along K.
  Code ``q`` in [-8, 7] is stored offset by +8 as ``u = q + 8`` in [0, 15] (vLLM calls this
  ``uint4b8``). Element ``k = 8*j + i`` sits in bits ``4*i .. 4*i+3`` of word ``j``: the LOW nibble
  holds the element with the smallest k. Words are int32 two's complement (bit 31 set when the top
  nibble is >= 8). When K is not a multiple of 8 the row is padded with u = 0 (code -8).
* ``weight_scale``   ``[N, K/G]`` in the model dtype (bf16), one scale per group of G along K;
  channelwise quantization stores ``[N, 1]``.
* ``weight_shape``   int64 ``[2]`` = ``[N, K]``.

Dequantization (transformers / compressed-tensors ``_dequantize``) is ``W' = dtype(q) * scale``
computed in the scale dtype, i.e. the product is rounded once to bf16/fp16.
"""
from __future__ import annotations

import sys

import torch

__all__ = [
    "PACK_FACTOR",
    "QMIN",
    "QMAX",
    "pack_int4",
    "unpack_int4",
    "unpack_uint4",
    "dequantize",
    "group_size_of",
    "marlin_scale_perm",
    "marlin_permute_scales",
    "marlin_permute_bias",
]

PACK_FACTOR = 8  # int4 codes per int32 word
QMIN, QMAX = -8, 7  # signed int4 range
_OFFSET = 8  # stored nibble = code + 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # bit offset of element i within its word
_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 codes ``[N, K]`` (any integer dtype, values in [-8, 7]) into int32 ``[N, ceil(K/8)]``.

    Bit-identical to compressed-tensors ``pack_to_int32(codes, num_bits=4)``.

    How: two nibbles make a byte (element ``2i`` in the low nibble), four bytes make a little-endian int32
    word, so word ``j`` = bytes ``4j..4j+3`` = elements ``8j..8j+7`` with the smallest k in the lowest bits:
    the packed tensor is the ``[N, K/2]`` byte tensor reinterpreted as int32 (no int64 arithmetic).
    The byte of elements ``2i, 2i+1`` comes from the int16 ``v`` that holds both as its low/high byte:
    ``(v | v >> 4) & 0xFF`` = ``u[2i] | u[2i+1] << 4`` (``u`` <= 15): contiguous int16 ops only, ~3x faster
    on CPU than combining the strided even/odd halves.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D [N, K] code tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4 expects integer codes, got {codes.dtype}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < QMIN or hi > QMAX:
            raise ValueError(f"int4 codes must lie in [{QMIN}, {QMAX}], got [{lo}, {hi}]")
    n, k = codes.shape
    c8 = codes if codes.dtype == torch.int8 else codes.to(torch.int8)
    u = (c8 + _OFFSET).contiguous()  # u = q + 8 in [0, 15] (checked above: no int8 overflow)
    pad = (-k) % PACK_FACTOR
    if pad:  # pad with u = 0 (code -8) exactly as compressed-tensors does
        u = torch.nn.functional.pad(u, (0, pad), value=0)
    if not _LITTLE_ENDIAN:
        u = u.view(torch.uint8)
        return _words_big_endian(u[:, 0::2] | (u[:, 1::2] << 4))
    # Flat, then viewed: a contiguous tensor may still have strides a dtype view refuses (a [1, K] transpose of a
    # [K, 1] tensor has stride (1, 1); an [N, 0] one has no bytes at all), while its flat reshape is always a
    # plain 1-D view of the same memory. Row-major rows of a multiple of 8 codes keep each word within its row.
    v = u.reshape(-1).view(torch.int16)  # element 2i in the low byte, 2i+1 in the high byte
    pairs = (v >> 4).bitwise_or_(v).bitwise_and_(0xFF).to(torch.uint8)  # u[2i] | u[2i+1] << 4
    return pairs.view(torch.int32).view(n, (k + pad) // PACK_FACTOR)


def _words_big_endian(pairs: torch.Tensor) -> torch.Tensor:
    b = pairs.to(torch.int64).reshape(pairs.shape[0], pairs.shape[1] // 4, 4)  # no -1: K may be 0
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack_uint4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unpack int32 ``[N, ceil(k/8)]`` into the raw stored nibbles ``u = q + 8`` as uint8 ``[N, k]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError(f"expected an int32 [N, K/8] tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != -(-k // PACK_FACTOR):
        raise ValueError(f"packed width {packed.shape[1]} does not match K={k} (need ceil(K/8))")
    n = packed.shape[0]
    if _LITTLE_ENDIAN:  # the inverse of pack_int4: bytes of the words, low nibble first
        b = packed.contiguous().view(torch.uint8)  # [N, 4 * ceil(k/8)]
        u = torch.stack((b & 0xF, b >> 4), dim=-1)
    else:
        w = packed.to(torch.int64) & 0xFFFFFFFF
        u = ((w.unsqueeze(-1) >> _SHIFTS.to(w.device)) & 0xF).to(torch.uint8)
    return u.reshape(n, PACK_FACTOR * packed.shape[1])[:, :k].contiguous()  # no -1: N or K may be 0


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_int4`: int32 ``[N, ceil(k/8)]`` → int8 codes ``[N, k]`` in [-8, 7]."""
    return (unpack_uint4(packed, k).to(torch.int16) - _OFFSET).to(torch.int8)


def group_size_of(k: int, scale: torch.Tensor) -> int:
    """Group size implied by a ``[N, K/G]`` scale tensor; ``-1`` for channelwise ``[N, 1]`` (when K > 1 group)."""
    groups = scale.shape[-1]
    if groups == 1:
        return -1
    if k % groups:
        raise ValueError(f"K={k} is not divisible by the {groups} scale groups")
    return k // groups


def dequantize(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """Dequantize a pack-quantized weight to ``scale.dtype``: ``W'[n, k] = dtype(q[n, k]) * scale[n, k // G]``.

    ``shape`` is ``weight_shape`` (``[N, K]``). The multiply happens in the scale dtype (one rounding),
    exactly like compressed-tensors / transformers and Marlin's dequant.
    """
    n, k = (int(v) for v in shape)
    if packed.shape[0] != n or scale.shape[0] != n:
        raise ValueError(f"rows disagree: weight_shape N={n}, packed {tuple(packed.shape)}, scale {tuple(scale.shape)}")
    q = unpack_int4(packed, k).to(scale.dtype)
    g = group_size_of(k, scale)
    s = scale if g == -1 else scale.repeat_interleave(g, dim=1)
    return q * s


# ---------------------------------------------------------------------------------------------------------------
# Marlin layout helpers (vLLM MarlinLinearKernel, spec marlin-arithmetic.md §3). pdqkit's kernels read the
# compressed-tensors layout above; these exist to feed the SAME logical weights to vLLM's Marlin in verification
# harnesses. The weight itself is repacked by vLLM's own ``gptq_marlin_repack`` op from the transposed
# ``weight_packed`` (``[K/8, N]``, GPTQ layout: identical words).
# ---------------------------------------------------------------------------------------------------------------
def marlin_scale_perm(grouped: bool) -> list[int]:
    """Column permutation Marlin expects for scales, applied per block of 64 (grouped) or 32 (channelwise/bias).

    Grouped: new position ``8i + j`` takes old column ``i + 8j`` (i, j < 8). Channelwise ("single"): new position
    ``8i + t`` takes old column ``2i + (0, 1, 8, 9, 16, 17, 24, 25)[t]`` (i < 4, t < 8).
    """
    if grouped:
        return [i + 8 * j for i in range(8) for j in range(8)]
    return [2 * i + d for i in range(4) for d in (0, 1, 8, 9, 16, 17, 24, 25)]


def marlin_permute_scales(scale_gn: torch.Tensor, size_k: int, group_size: int) -> torch.Tensor:
    """vLLM ``marlin_permute_scales``: ``[K/G, N]`` (or ``[1, N]``) scales -> Marlin's column order.

    ``scale_gn`` is the transpose of compressed-tensors' ``weight_scale``. ``group_size`` is -1 for channelwise;
    a single group spanning all of K (``group_size >= size_k``) also takes the channelwise permutation.
    """
    if scale_gn.dim() != 2:
        raise ValueError(f"expected [K/G, N] scales, got shape {tuple(scale_gn.shape)}")
    grouped = group_size != -1 and group_size < size_k
    perm = marlin_scale_perm(grouped)
    if scale_gn.shape[1] % len(perm):
        raise ValueError(f"N={scale_gn.shape[1]} must be a multiple of {len(perm)} for Marlin's scale layout")
    idx = torch.tensor(perm, device=scale_gn.device)
    return scale_gn.reshape(-1, len(perm))[:, idx].reshape(scale_gn.shape).contiguous()


def marlin_permute_bias(bias: torch.Tensor) -> torch.Tensor:
    """vLLM ``marlin_permute_bias``: ``[N]`` bias in Marlin's column order (the channelwise 32-column permutation)."""
    perm = marlin_scale_perm(grouped=False)
    if bias.shape[-1] % len(perm):
        raise ValueError(f"N={bias.shape[-1]} must be a multiple of {len(perm)} for Marlin's bias layout")
    idx = torch.tensor(perm, device=bias.device)
    return bias.reshape(-1, len(perm))[:, idx].reshape(bias.shape).contiguous()
