"""Memoryless symmetric min-max int4 observer (spec pack-quantized.md §1).

Exactly what llmcompressor's ``memoryless_minmax`` weight observer and compressed-tensors' quantizer
compute for the recipe ``W4A16, group 128, symmetric, minmax``:

    G     = W.reshape(N, K/g, g)                  (bf16)
    mn    = min(amin(G), 0) ; mx = max(amax(G), 0)
    amax  = max(|mn|, |mx|)                       (exact in bf16)
    scale = bf16_RNE(f32(amax) / 7.5)            7.5 = (qmax - qmin) / 2
    scale = where(scale == 0, 2**-7, scale)       eps of bf16: only all-zero (or underflowing) groups

and the codes, with the stored bf16 scale, in one of two rounding modes (§1.3):

    "fp32div": t = f32(W) / f32(scale)            llmcompressor 0.14 / CT 0.19 on CUDA (Triton path)
    "eager"  : t = bf16_RNE(f32(W) / f32(scale))  CPU, CT <= 0.17, CT_ENFORCE_EAGER=1
    q = round_half_even(clamp(t, -8, 7))          clamp BEFORE rounding: +7.5 -> 7, -7.5 -> -8

Both modes are computed with IEEE fp32 division, so CPU and CUDA give the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import QMAX, QMIN
from .qconfig import ROUNDING_MODES

__all__ = ["ROUNDING_MODES", "QuantScheme", "compute_scale", "quantize_codes", "quantize_weight"]

_HALF_RANGE = (QMAX - QMIN) / 2  # 7.5


@dataclass(frozen=True)
class QuantScheme:
    """W4A16 weight scheme. ``group_size=-1`` means channelwise (one scale per output row)."""

    num_bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    rounding: str = "fp32div"

    def __post_init__(self):
        if self.num_bits != 4:
            raise ValueError(f"only 4-bit weights are supported, got num_bits={self.num_bits}")
        if not self.symmetric:
            raise ValueError("only symmetric quantization is supported (no zero point)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size must be -1 (channelwise) or a positive multiple of 8, got {self.group_size}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")

    def check_k(self, k: int, name: str = "weight") -> None:
        """Raise if a Linear with input width ``k`` cannot be quantized with this scheme."""
        if self.group_size != -1 and k % self.group_size:
            raise ValueError(
                f"{name}: in_features K={k} is not a multiple of group_size {self.group_size}; "
                f"add it to --ignore or choose a group size that divides K"
            )


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps  # bf16: 2**-7 (compressed-tensors _get_dtype_eps)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [N, K]`` as ``[N, K/g, g]`` in its own dtype (a view where the strides allow)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"K={k} is not a multiple of group_size {g}")
    return w.reshape(n, k // g, g)


def _amax(g: torch.Tensor) -> torch.Tensor:
    """max |w| over each group of ``g [N, G, g]`` (the last dim), in ``g``'s dtype: exact, and equal to
    ``max(|min(amin, 0)|, max(amax, 0))``. NaN/Inf propagate (a NaN's result is a NaN, an Inf's is +Inf)."""
    if g.dtype in (torch.bfloat16, torch.float16):
        # A 16-bit float's |w| is its bit pattern with the sign bit cleared, and non-negative floats order like
        # their bit patterns read as integers (+Inf above every finite value, every NaN above +Inf): one int16
        # pass over half the bytes of an fp32 copy, ~2x faster on CPU than amin and amax of that copy.
        return (g.view(torch.int16) & 0x7FFF).amax(dim=-1).view(g.dtype)
    return g.abs().amax(dim=-1)


def _scale(g: torch.Tensor) -> torch.Tensor:
    """The stored scale of each group of ``g [N, G, g]``, in ``g``'s dtype: ``[N, G]``."""
    scale = (_amax(g).float() / _HALF_RANGE).to(g.dtype)  # one RNE rounding to the weight dtype
    return scale.masked_fill_(scale == 0, _eps(g.dtype))


def _codes(g: torch.Tensor, scale: torch.Tensor, rounding: str, own_scale: bool = False) -> torch.Tensor:
    """int8 codes ``[N, K]`` of ``g [N, G, g]`` with ``scale [N, G]``; ``own_scale``: the scale is ``_scale(g)``."""
    # IEEE fp32 division on CPU and CUDA (tensor / tensor is correctly rounded) of an fp32 copy of the weight (exact
    # for bf16/fp16), divided in place; the scale broadcasts over each group
    t = g.to(torch.float32, copy=True).div_(scale.float().unsqueeze(-1))
    if rounding == "eager" and g.dtype != torch.float32:
        # the torch path divides bf16 tensors: the quotient is rounded to bf16. It is stored back into the fp32
        # buffer (exact): clamp (bounds representable, rounding monotonic) and round-half-even then give the
        # same values as on the bf16 tensor, at fp32 speed (bf16 elementwise ops are ~3x slower on CPU).
        t = t.copy_(t.to(g.dtype))
    if not own_scale:  # any scale: clamp BEFORE rounding (and before the int8 conversion, which must not wrap)
        return t.clamp_(QMIN, QMAX).round_().to(torch.int8).reshape(t.shape[0], -1)
    # The group's own scale bounds |t|: scale >= (amax / 7.5)(1 - 2**-9) for a normal scale, so |t| < 7.6; a
    # subnormal one is rounded down by at most a third of itself, so |t| <= 11.25 (the eps scale's groups are 0
    # or underflow). So the int8 conversion of the rounded quotient is exact, and since rounding and clamping to
    # the integer bounds commute (+7.5 -> 8 -> 7 as 7.5 -> 7 -> 7; -8.5 -> -8 either way), the clamp runs on the
    # int8 codes, a quarter of the bytes. torch.round = half to even.
    return t.round_().to(torch.int8).clamp_(QMIN, QMAX).reshape(t.shape[0], -1)


def compute_scale(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Per-group symmetric scale of ``w [N, K]`` in ``w.dtype``: ``[N, K/group_size]`` (``[N, 1]`` if channelwise)."""
    return _scale(_grouped(w, group_size))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, rounding: str = "fp32div") -> torch.Tensor:
    """Signed int4 codes (int8 ``[N, K]``) of ``w`` with the stored ``scale`` (``[N, K/g]``)."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    n, k = w.shape
    groups = scale.shape[1]
    if scale.shape[0] != n or k % groups:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit weight {tuple(w.shape)}")
    return _codes(_grouped(w, k // groups), scale, rounding)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme = QuantScheme()) -> tuple[torch.Tensor, torch.Tensor]:
    """Observe and quantize ``w [N, K]``: returns ``(codes int8 [N, K], scale [N, K/g] in w.dtype)``.

    Same results as :func:`compute_scale` then :func:`quantize_codes`, with one fp32 conversion of ``w``.
    """
    g = _grouped(w, scheme.group_size)
    scale = _scale(g)
    return _codes(g, scale, scheme.rounding, own_scale=True), scale
