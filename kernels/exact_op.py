"""``torch.ops.pdqkit.w4a16_gemm_exact``: the Marlin-bit-exact W4A16 GEMM as a torch.library custom op.

Importing this module registers the op (and its fake/meta implementation for torch.compile and FakeTensor
tracing); Triton is imported only when the op first runs.

Signature (schema ``pdqkit::w4a16_gemm_exact(Tensor x, Tensor weight_packed, Tensor weight_scale,
Tensor? bias=None, bool use_fp32_reduce=True, int sms=-1) -> Tensor``):

    x               [..., K]  bfloat16 or float16, CUDA; last dim contiguous (any leading dims, M = prod of them).
    weight_packed   [N, K/8]  int32, compressed-tensors ``pack-quantized`` codes exactly as stored in the
                              checkpoint (``<m>.weight_packed``): nibble k%8 of word k//8 holds q = w + 8,
                              low nibble first (vLLM ``uint4b8``). No Marlin repack.
    weight_scale    [N, K/G]  same dtype as x, G in {32, 64, 128} (``<m>.weight_scale``), or [N, 1] channelwise.
                              A single group (G == K) is channelwise, as in Marlin.
    bias            [N] or None, same dtype as x.
    use_fp32_reduce Marlin's flag; vLLM's default (USE_FP32_REDUCE_DEFAULT) is True.
    sms             SM count of the GPU whose Marlin output you want to reproduce; -1 = the SM count of x's device
                    (what Marlin itself uses: cudaDevAttrMultiProcessorCount). 132 on H100 SXM / H200.
    returns         [..., N] in x's dtype, bit-identical to vLLM 0.26.0 ``marlin_gemm`` called the way
                    ``MarlinLinearKernel.apply_weights`` calls it (use_atomic_add off) on a GPU with ``sms`` SMs.

Constraints: N % 64 == 0, K % 64 == 0 and a Marlin thread config must exist (all Gemma/Llama shapes; shapes
vLLM would pad are rejected). The op allocates its fp32 workspace from the caching allocator and does no
host-device synchronisation or copy, so it can be captured in CUDA graphs. It is deterministic.
"""
from __future__ import annotations

import torch

from .ops import _check_one_device

__all__ = ["w4a16_gemm_exact"]


SCHEMA = ("(Tensor x, Tensor weight_packed, Tensor weight_scale, Tensor? bias=None, bool use_fp32_reduce=True, "
          "int sms=-1) -> Tensor")


@torch.library.custom_op("pdqkit::w4a16_gemm_exact", mutates_args=(), schema=SCHEMA)
def w4a16_gemm_exact(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, use_fp32_reduce: bool = True, sms: int = -1) -> torch.Tensor:
    """Marlin-order W4A16 GEMM (see the module docstring for the exact contract)."""
    from .env import interpreting

    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"pdqkit::w4a16_gemm_exact runs on CUDA tensors (got {x.device}); on CPU only under "
                         "TRITON_INTERPRET=1")
    from .w4a16_marlin import w4a16_gemm_exact as _impl

    return _impl(x, weight_packed, weight_scale, bias, use_fp32_reduce, sms)


@w4a16_gemm_exact.register_fake
def _(x, weight_packed, weight_scale, bias=None, use_fp32_reduce=True, sms=-1):
    n = weight_packed.shape[0]
    torch._check(weight_packed.shape[1] * 8 == x.shape[-1],
                 lambda: f"weight_packed {tuple(weight_packed.shape)} does not match K={x.shape[-1]}")
    torch._check(weight_scale.shape[0] == n, lambda: f"weight_scale rows {weight_scale.shape[0]} != N={n}")
    _check_one_device("w4a16_gemm_exact", x, weight_packed, weight_scale, bias)   # (a meta operand lands here)
    return x.new_empty((*x.shape[:-1], n))
