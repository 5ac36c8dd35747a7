"""Prefill-shaped W4A16 GEMM (large M): one output tile per program, full K, tensor-core (wgmma) tiles.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)`` with W' dequantized from the compressed-tensors int4 layout
(see :mod:`kernels.w4a16_mainloop`).

The hardware reason for this shape
----------------------------------
At M >= ~128 the GEMM is compute-bound (2·BLOCK_M FLOP per dequantized weight), so the kernel is a classic
tiled matmul: 128x128..256 output tiles, enough of them to cover the 132 SMs several times, no split-K, and
``acc = tl.dot(a, b, acc)`` chained over K in increasing order. With BLOCK_M >= 64 and 4/8 warps Triton lowers the
dot to Hopper ``wgmma`` (asynchronous warpgroup MMA): the activation tile streams global -> shared memory through
``num_stages`` cp.async buffers, the int4 tile is dequantized in registers (15-17 integer/packed-half instructions per
8 weights, amortized over BLOCK_M rows) and written to shared memory as the second wgmma operand — or, with
``W_IS_A``, kept in registers as the wgmma A operand (Machete's choice) while the activations become the shared
operand. Which of the two is faster depends on the tile, so it is an autotuned knob.

Program order is grouped along M (``GROUP_M`` row-tiles share each weight column-tile) so that the weight tiles and
activation rows a wave of programs touches stay in the 60 MB L2.

Determinism: no split-K and a fixed K order, so a given config always produces the same bits; the bits do not
depend on BLOCK_M/BLOCK_N/warps/stages (one k16 MMA chain per output, marlin-arithmetic.md §9B) — only on BLOCK_K
and the K labelling (``KPERM``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a16_mainloop import scale_groups, store_tile, w4a16_mainloop


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program ``pid``'s output tile ``(pid_m, pid_n)`` in grouped order (Triton matmul tutorial): ``GROUP_M``
    row-tiles walk the same column-tiles together, so a wave's weight tiles and activation rows stay in the L2.
    Scalar code, so the Gluon prefill kernel (:mod:`kernels.w4a16_prefill_tma`) calls it too."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def stream_span(c, G, W):
    """Stream-K (:mod:`kernels.w4a16_prefill_wsp`; scalar code like :func:`grouped_tile`): CTA ``c`` of ``G``'s
    share of the ``W`` (tile, K block) steps, ``[c W / G, (c + 1) W / G)``."""
    return c * W // G, (c + 1) * W // G


@triton.jit
def stream_owners(t, KB, G, W):
    """Stream-K: the first and the last CTA whose share holds a step of tile ``t`` (steps ``t KB .. t KB + KB - 1``;
    step ``w`` lies in the share of CTA ``((w + 1) G - 1) / W``)."""
    return ((t * KB + 1) * G - 1) // W, ((t * KB + KB) * G - 1) // W


@triton.jit
def stream_parts(c, cf, G, NH, H):
    """Stream-K workspace tiles of a tile whose owners are CTAs ``cf .. cl`` (more than one), for the ``H``-th of its
    ``NH`` tickets: ``(own, first, rest)``: CTA ``c``'s own slot (the tail slot ``c`` of the tails ``[G, NH]`` for the
    first owner, whose share ends in the tile; else its head slot in the heads ``[G, NH]`` that follow), and the
    reader's order, the first owner's tail then the heads of ``cf + 1 .. cl`` at stride ``NH`` from ``rest``."""
    return tl.where(c == cf, c, G + c) * NH + H, cf * NH + H, (G + cf + 1) * NH + H


@triton.jit(do_not_specialize=["M", "stride_sn"])
def _w4a16_tiled_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, DOT_F32: tl.constexpr, KPERM: tl.constexpr, W_IS_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
    NG: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = rows % M   # clamp, no load masks; the store drops the extra rows/cols
    offs_n = cols % N

    if W_IS_A:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = w4a16_mainloop(acc, x_ptr, w_ptr, s_ptr, offs_m, rows < M, offs_n, stride_xm, stride_wn, stride_sn,
                         0, K // BLOCK_K, BLOCK_N, BLOCK_K, GROUP_SIZE, NG, USE_ASM, DOT_F32, KPERM, W_IS_A)
    if W_IS_A:
        acc = tl.trans(acc)
    store_tile(out_ptr, bias_ptr, acc, rows, cols, M, N, stride_om, HAS_BIAS, DOT_F32)


def w4a16_prefill(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, group_size: int, *, block_m: int, block_n: int, block_k: int,
                  num_warps: int, num_stages: int, kperm: bool = False, w_is_a: bool = False, group_m: int = 8,
                  use_asm: bool = True, dot_f32: bool = False) -> torch.Tensor:
    """Launch the tiled kernel. Inputs are assumed validated by :func:`kernels.w4a16.w4a16_gemm` (same contract
    as :func:`kernels.w4a16_decode.w4a16_decode`). Returns ``[M, N]`` of ``x.dtype``."""
    m, k = x.shape
    n = weight_packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    gk, ng = scale_groups(group_size, k, block_k)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _w4a16_tiled_kernel[grid](
        x, weight_packed, weight_scale, bias if bias is not None else weight_scale, out,
        m, n, k,
        x.stride(0), weight_packed.stride(0), weight_scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, USE_ASM=use_asm, DOT_F32=dot_f32, KPERM=kperm, W_IS_A=w_is_a,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_SIZE=gk, NG=ng, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
