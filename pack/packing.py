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
]

PACK_FACTOR = 8  # int4 codes per int32 word
QMIN, QMAX = -8, 7  # signed int4 range
_OFFSET = 8  # stored nibble = code + 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # bit offset of element i within its word


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 codes ``[N, K]`` (any integer dtype, values in [-8, 7]) into int32 ``[N, ceil(K/8)]``.

    Bit-identical to compressed-tensors ``pack_to_int32(codes, num_bits=4)``.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D [N, K] code tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4 expects integer codes, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < QMIN or int(c.max()) > QMAX):
        raise ValueError(f"int4 codes must lie in [{QMIN}, {QMAX}], got [{int(c.min())}, {int(c.max())}]")
    n, k = c.shape
    pad = (-k) % PACK_FACTOR
    u = c + _OFFSET
    if pad:  # pad with u = 0 (code -8) exactly as compressed-tensors does
        u = torch.nn.functional.pad(u, (0, pad), value=0)
    u = u.view(n, -1, PACK_FACTOR)
    words = (u << _SHIFTS.to(u.device)).sum(dim=-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's complement int32
    return words.to(torch.int32).contiguous()


def unpack_uint4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unpack int32 ``[N, ceil(k/8)]`` into the raw stored nibbles ``u = q + 8`` as uint8 ``[N, k]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError(f"expected an int32 [N, K/8] tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != -(-k // PACK_FACTOR):
        raise ValueError(f"packed width {packed.shape[1]} does not match K={k} (need ceil(K/8))")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    u = (w.unsqueeze(-1) >> _SHIFTS.to(w.device)) & 0xF
    return u.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


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
