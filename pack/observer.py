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


def _grouped_f32(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [N, K]`` as fp32 ``[N, K/g, g]`` (exact for bf16/fp16; a copy, never a view of ``w``)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"K={k} is not a multiple of group_size {g}")
    return w.reshape(n, k // g, g).to(torch.float32, copy=True)


def _scale(wf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # min/max of the fp32 copy = min/max of the bf16 values (the conversion is exact); fp32 reductions run
    # ~5x faster than bf16 ones on CPU. NaN/Inf propagate into the scale.
    mn = torch.clamp(wf.amin(dim=-1), max=0)
    mx = torch.clamp(wf.amax(dim=-1), min=0)
    amax = torch.maximum(mn.abs(), mx)
    scale = (amax / _HALF_RANGE).to(dtype)  # one RNE rounding to the weight dtype
    return scale.masked_fill_(scale == 0, _eps(dtype))


def _codes(wf: torch.Tensor, scale: torch.Tensor, rounding: str, dtype: torch.dtype) -> torch.Tensor:
    # IEEE fp32 division on CPU and CUDA (tensor / tensor is correctly rounded); the scale broadcasts over
    # each group; ``wf`` is our own fp32 copy, divided in place
    t = wf.div_(scale.float().unsqueeze(-1))
    if rounding == "eager" and dtype != torch.float32:
        # the torch path divides bf16 tensors: the quotient is rounded to bf16. It is stored back into the fp32
        # buffer (exact): clamp (bounds representable, rounding monotonic) and round-half-even then give the
        # same values as on the bf16 tensor, at fp32 speed (bf16 elementwise ops are ~3x slower on CPU).
        t = t.copy_(t.to(dtype))
    t = t.clamp_(QMIN, QMAX).round_()  # clamp BEFORE rounding; torch.round = half to even
    return t.to(torch.int8).reshape(t.shape[0], -1)


def compute_scale(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Per-group symmetric scale of ``w [N, K]`` in ``w.dtype``: ``[N, K/group_size]`` (``[N, 1]`` if channelwise)."""
    return _scale(_grouped_f32(w, group_size), w.dtype)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, rounding: str = "fp32div") -> torch.Tensor:
    """Signed int4 codes (int8 ``[N, K]``) of ``w`` with the stored ``scale`` (``[N, K/g]``)."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    n, k = w.shape
    groups = scale.shape[1]
    if scale.shape[0] != n or k % groups:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit weight {tuple(w.shape)}")
    return _codes(_grouped_f32(w, k // groups), scale, rounding, w.dtype)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme = QuantScheme()) -> tuple[torch.Tensor, torch.Tensor]:
    """Observe and quantize ``w [N, K]``: returns ``(codes int8 [N, K], scale [N, K/g] in w.dtype)``.

    Same results as :func:`compute_scale` then :func:`quantize_codes`, with one fp32 conversion of ``w``.
    """
    wf = _grouped_f32(w, scheme.group_size)
    scale = _scale(wf, w.dtype)
    return _codes(wf, scale, scheme.rounding, w.dtype), scale
