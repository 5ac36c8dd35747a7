"""Dequantize a compressed-tensors int4 weight to the activation dtype in one pass (and the ``dequant_mm`` path).

``W'[N, K] = RN_dtype((q - 8) * s)`` — bit-identical to :func:`pack.packing.dequantize` — written by a Triton
kernel that reads each int32 word once (0.5 B/weight) and writes 2 B/weight: a memory-bound copy.

Why it exists in the GEMM dispatcher: far into the compute-bound regime (M in the thousands) the whole cost of a
W4A16 GEMM is the MMA work, and cuBLAS's bf16 GEMM runs it at ~790 TFLOP/s on an H200. Dequantizing once per call
costs ~2.5 B/weight of traffic (e.g. ~25 µs for a 16384x2560 weight) while the GEMM itself costs hundreds of µs,
so "dequantize + cuBLAS" can beat an in-kernel-dequant Triton GEMM there. The autotuner picks it only where it
measured faster (kernel ``dequant_mm``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a16_mainloop import dequant_block, scale_groups


@triton.jit(do_not_specialize=["stride_sn"])
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                    USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, NG: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPB: tl.constexpr = BLOCK_K // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = (rows % N).to(tl.int64)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + pid_k * WPB + tl.arange(0, WPB)[None, :])
    if GROUP_SIZE == 0:
        col = 0
    elif NG > 1:
        col = pid_k * NG
    else:
        col = (pid_k * BLOCK_K) // GROUP_SIZE
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + col + tl.arange(0, NG)[None, :])
    wd = dequant_block(tl.reshape(w, [BLOCK_N, NG, WPB // NG]), s, BLOCK_N, BLOCK_K, USE_ASM, True)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :], wd, mask=(rows < N)[:, None])


def dequantize_weight(weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int,
                      use_asm: bool = True) -> torch.Tensor:
    """``[N, K/8]`` int32 + ``[N, K/G]`` scales (bf16/fp16) -> ``[N, K]`` in the scale dtype (K % 128 == 0)."""
    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    out = torch.empty((n, k), dtype=weight_scale.dtype, device=weight_packed.device)
    block_k = 128
    gk, ng = scale_groups(group_size, k, block_k)
    grid = (triton.cdiv(n, 64), k // block_k)
    _dequant_kernel[grid](weight_packed, weight_scale, out, n, k, weight_packed.stride(0), weight_scale.stride(0),
                          out.stride(0), USE_ASM=use_asm, BLOCK_N=64, BLOCK_K=block_k, GROUP_SIZE=gk, NG=ng,
                          num_warps=4)
    return out


def w4a16_dequant_mm(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, group_size: int, use_asm: bool = True) -> torch.Tensor:
    """``x @ W'^T (+ bias)`` via :func:`dequantize_weight` and cuBLAS: fp32 accumulation inside cuBLAS's tiles,
    but torch's ``allow_{bf16,fp16}_reduced_precision_reduction`` (True by default) lets cuBLAS add split-K
    partials in 16 bits, as for any bf16 ``nn.Linear``; the bias is added in ``addmm``'s epilogue."""
    w = dequantize_weight(weight_packed, weight_scale, group_size, use_asm)
    if bias is None:
        return torch.matmul(x, w.t())
    return torch.addmm(bias, x, w.t())
