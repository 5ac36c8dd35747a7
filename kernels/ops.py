"""``torch.ops.pdqkit.w4a16_gemm``: the fast W4A16 GEMM as a torch.library custom op (torch.compile-visible).

Importing this module registers the op (and its fake/meta implementation); Triton is imported on first call.
"""
from __future__ import annotations

import torch

__all__ = ["w4a16_gemm"]


@torch.library.custom_op("pdqkit::w4a16_gemm", mutates_args=())
def w4a16_gemm(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W'^T (+ bias)`` for an int4 weight in the compressed-tensors ``pack-quantized`` layout.

    Inputs (exactly the tensors of a pack-quantized checkpoint; **no repack is needed at load time** — only make
    the scales the activation dtype and everything contiguous, once):

    * ``x``: ``[..., K]``, bfloat16 or float16, any leading shape (flattened to ``M`` rows; any ``M >= 0``).
    * ``weight_packed``: ``[N, K/8]`` int32, contiguous, ``<module>.weight_packed`` as stored: nibble ``i``
      (bits ``4i..4i+3``) of word ``j`` holds ``q + 8`` for ``k = 8j + i``, ``q`` in [-8, 7] (vLLM ``uint4b8``).
    * ``weight_scale``: ``[N, K/G]``, same dtype as ``x``, contiguous: ``<module>.weight_scale`` (bf16 on disk;
      ``.to(x.dtype)`` for fp16 models). G = 128 (or 32, 64, any multiple of 128 dividing K); ``[N, 1]`` = channelwise.
      Symmetric only: no zero point, no ``g_idx``.
    * ``bias``: optional ``[N]`` of ``x.dtype``.
    * Shapes: ``N % 64 == 0``, ``K % 128 == 0``; anything else raises ``ValueError`` naming the problem.

    Output: ``[..., N]`` of ``x.dtype``, ``RN(sum_k x[m,k] * W'[n,k] + bias[n])`` with fp32 accumulation and one
    final rounding, where ``W'[n,k] = RN_dtype(q[n,k] * s[n, k // G])`` = :func:`pack.packing.dequantize` (the same
    dequantized values as Marlin/Machete and transformers). Not bit-identical to Marlin (summation order differs;
    within one output ulp + 2^-16·Σ|x·w|, marlin-arithmetic.md §9B); deterministic run to run for a given
    (GPU, M bucket). Use ``pdqkit::w4a16_gemm_exact`` for Marlin's bits. One exception to "fp32 accumulation, one
    rounding": where the dispatcher picks ``dequant_mm`` (by default M >= 1024), the GEMM is cuBLAS's on the
    dequantized weight and follows torch's cuBLAS settings, like any bf16/fp16 ``nn.Linear``: with
    ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` (fp16 likewise; True by default) cuBLAS
    may add split-K partials in 16 bits, and ``addmm`` adds the bias in its epilogue.

    Execution: CUDA tensors run pdqkit's Triton kernels (tensor-core GEMVs or the split-K decode kernel for small M,
    wgmma tiles for large M, per-GPU tuned configs in ``kernels/configs``); CPU tensors run the pure-torch
    reference. The split-K launches (decode kernel and GEMVs) and the Gluon prefill kernels keep per-device int32
    tile-counter buffers that they leave zeroed: do not run two of these GEMMs concurrently on different streams of
    one device, and allocate the buffers before CUDA-graph capture (``kernels.counters.reserve(device)``; the vLLM
    plugin and ``swap_w4a16_linears`` do it at load).
    """
    from .w4a16 import w4a16_gemm as _impl

    return _impl(x, weight_packed, weight_scale, bias)


@w4a16_gemm.register_fake
def _w4a16_gemm_fake(x, weight_packed, weight_scale, bias=None):
    torch._check(x.shape[-1] == weight_packed.shape[1] * 8,
                 lambda: f"w4a16_gemm: x's last dim {x.shape[-1]} != 8 * weight_packed.shape[1]")
    torch._check(weight_scale.dtype == x.dtype, lambda: "w4a16_gemm: weight_scale dtype must equal x dtype")
    _check_one_device("w4a16_gemm", x, weight_packed, weight_scale, bias)
    return x.new_empty((*x.shape[:-1], weight_packed.shape[0]))


def _check_one_device(name: str, *operands) -> None:
    """The dispatcher sends a call with any ``meta`` operand here, not to the kernel wrapper whose checks refuse
    mixed devices: without this, a layer whose bias or scales stayed on ``meta`` (``init_empty_weights``, an
    offloaded module) would get ``x.new_empty(...)`` on x's real device, uninitialised memory, as its output."""
    devs = {t.device for t in operands if t is not None}
    torch._check_value(len(devs) == 1, lambda: f"{name}: operands on different devices: {sorted(map(str, devs))}")
