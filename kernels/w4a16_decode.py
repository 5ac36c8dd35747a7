"""Decode-shaped W4A16 GEMM (small M): split-K over all SMs, one launch, deterministic in-kernel reduction.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)`` with W' dequantized from the compressed-tensors int4 layout
(see :mod:`kernels.w4a16_mainloop`).

The hardware reason for split-K
-------------------------------
At M = 1..16 the GEMM is a weight stream: 0.5 B per weight, ~16 FLOP per byte even at M = 16, far below the H200's
~200 FLOP/B balance point, so the only goal is to keep HBM busy. An E4B projection has just 20..128 column tiles of
128 columns, fewer than the 132 SMs (and each SM wants 2-4 resident programs to have enough bytes in flight and to
hide the latency of its synchronous MMAs), so K is split too: program (n-tile, m-tile, split) streams
``[BLOCK_N, K/SPLIT_K]`` of the weight. Tensor cores do the multiply — their cost is negligible here; what costs is
the dequantization (~2 instructions per weight, see :mod:`kernels.w4a16_mainloop`). The tuned configs use
``W_IS_A``: the dequantized weight tile is the *register* A operand of Hopper ``wgmma`` (64 weight rows per
warpgroup x 16 token columns, BLOCK_M = 16 even for M = 1), with K relabelled (``KPERM``) so that each thread's
fragment is whole int32 words loaded with 16-byte ``cp.async`` — no shared-memory round trip for the weights.

Reduction without a second launch: every split stores its fp32 partial tile to a workspace, then takes a ticket
from a per-tile counter (``atomic_add``, acq_rel, gpu scope, after a CTA barrier — CUTLASS's serial split-K
semaphore pattern). The program that draws the last ticket sums all SPLIT_K partials **in split order** (so the bits
do not depend on which program finished last), adds the bias in fp32, rounds once to the activation dtype, stores,
and resets the counter to 0 for the next call. Partials are read with ``.cg`` (L2, bypassing the non-coherent L1).

Contract of the counter buffer: int32, zero before the launch, >= number of (m, n) tiles; the kernel leaves it zero.
Two launches that share it must not overlap (one CUDA stream per device — what HF and vLLM do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .counters import grow_zeros, pool
from .w4a16_config import effective_split
from .w4a16_mainloop import scale_groups, store_tile, w4a16_mainloop


@triton.jit(do_not_specialize=["M", "SPLIT_K", "KB_PER_SPLIT", "stride_sn"])
def _w4a16_splitk_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    SPLIT_K, KB_PER_SPLIT,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, DOT_F32: tl.constexpr, KPERM: tl.constexpr, W_IS_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
    NG: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n          # n fastest: neighbouring programs share the (tiny) activation rows
    pid_n = pid % num_pid_n

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamp instead of masking: out-of-range rows/cols re-read valid memory and are dropped at the store.
    offs_m = rows % M
    offs_n = cols % N

    kb_total = K // BLOCK_K
    kb_lo = pid_k * KB_PER_SPLIT
    kb_hi = tl.minimum(kb_lo + KB_PER_SPLIT, kb_total)
    if W_IS_A:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = w4a16_mainloop(acc, x_ptr, w_ptr, s_ptr, offs_m, rows < M, offs_n, stride_xm, stride_wn, stride_sn,
                         kb_lo, kb_hi, BLOCK_N, BLOCK_K, GROUP_SIZE, NG, USE_ASM, DOT_F32, KPERM, W_IS_A)
    if W_IS_A:
        acc = tl.trans(acc)

    if SPLIT_K == 1:
        store_tile(out_ptr, bias_ptr, acc, rows, cols, M, N, stride_om, HAS_BIAS, DOT_F32)
    else:
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        ws_ptrs = ws_ptr + rows[:, None] * N + cols[None, :]
        tl.store(ws_ptrs + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the ticket (the release below is cumulative)
        tile = pid_m * num_pid_n + pid_n
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLIT_K):  # fixed order: the bits do not depend on which split finished last
                total += tl.load(ws_ptrs + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            store_tile(out_ptr, bias_ptr, total, rows, cols, M, N, stride_om, HAS_BIAS, DOT_F32)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


# The split-K tickets: device -> every counter buffer handed out there (kernels.counters.grow_zeros).
_COUNTERS: dict[torch.device, list[torch.Tensor]] = pool("decode")


def w4a16_decode(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int, *, block_m: int, block_n: int, block_k: int,
                 split_k: int, num_warps: int, num_stages: int, kperm: bool = True, w_is_a: bool = True,
                 use_asm: bool = True, dot_f32: bool = False) -> torch.Tensor:
    """Launch the split-K kernel. Inputs are assumed validated by :func:`kernels.w4a16.w4a16_gemm`:
    ``x`` [M, K] contiguous bf16/fp16, ``weight_packed`` [N, K/8] int32 contiguous, ``weight_scale`` [N, K/G] of
    ``x.dtype`` contiguous, ``bias`` [N] or None, ``K % block_k == 0``. Returns ``[M, N]`` of ``x.dtype``.
    ``split_k`` is clamped so that no split is empty."""
    m, k = x.shape
    n = weight_packed.shape[0]
    kb_total = k // block_k
    if split_k * m * n >= 2**31:  # int32 workspace offsets; split-K is a small-M tool anyway
        split_k = 1
    split_k = effective_split(kb_total, split_k)
    kb_per_split = triton.cdiv(kb_total, split_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    cnt = grow_zeros(_COUNTERS, x.device, grid_mn, 4096)
    if split_k > 1:
        ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    else:
        ws = cnt.view(torch.float32)  # not touched when SPLIT_K == 1 (typed pointer for the compiled-in branch)
    gk, ng = scale_groups(group_size, k, block_k)
    _w4a16_splitk_kernel[(grid_mn, split_k)](
        x, weight_packed, weight_scale, bias if bias is not None else weight_scale, out, ws, cnt,
        m, n, k,
        x.stride(0), weight_packed.stride(0), weight_scale.stride(0), out.stride(0),
        split_k, kb_per_split,
        HAS_BIAS=bias is not None, USE_ASM=use_asm, DOT_F32=dot_f32, KPERM=kperm, W_IS_A=w_is_a,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_SIZE=gk, NG=ng,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
