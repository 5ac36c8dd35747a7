"""Batch-1..4 W4A16 GEMV on tensor cores without shared memory: ``mma.sync`` fed straight from each thread's words.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)``, the same contract and tiling as :mod:`kernels.w4a16_gemv` (a program
owns ``BLOCK_N`` whole weight rows, over all of K or, with split-K, over one K slice), but the multiply-accumulate
runs on the tensor cores.

The hardware reason
-------------------
The CUDA-core GEMV spends ~40 instructions per int32 word (8 weights) at M = 1: 17 to dequantize, 8 to widen the
bf16 weights to fp32, 8 FMAs, and the rest addressing; it is issue-bound (H200: gate_up at ~1.9 TB/s), and every
further activation row costs 8 more FMAs per word. Here one ``mma.sync.m16n8k16`` takes the 16-bit weight pairs
the dequantization already produced, so a word costs its 17 dequant instructions plus one MMA per activation row.

How a warp's threads become an MMA, with Triton choosing the layout
------------------------------------------------------------------
Triton lays the ``[BLOCK_N/2, WPB]`` word tiles out with a warp's lanes along K (16-byte vectors), so the four
lanes of a quad (lanes 4r..4r+3) always hold the *same* weight rows and *different* words. ``mma.sync`` m16n8k16
(bf16, row.col) computes ``D[16, 8] += A[16, 16] B[16, 8]`` where lane ``4r + q`` supplies ``A[r, k]`` and
``A[r + 8, k]`` for k in {2q, 2q+1, 2q+8, 2q+9} and ``B[k, c]`` for the same k and column ``c = r``. Each lane
passes: as A rows r and r+8, two codes pairs of its word of row ``R1`` (first half of the tile) and of its word of
row ``R2`` (second half), the same word index; as B, the activation pairs of that word. Then ``D[r, c]`` pairs A from
quad r with B from quad c: it is a true dot product only where both come from the same lanes, i.e. on the diagonal
``c = r``, where ``D[r, r]`` and ``D[r + 8, r]`` are quad r's partial dot products of rows R1 and R2 over its four
words. The other 7/8 of each MMA is discarded: the tensor cores have that much to spare at M <= 4, the issue slots
do not. Two MMAs cover a word pair (codes 0-3, then 4-7); the diagonal lane of each quad (``q = r // 2``, column
parity ``r % 2``) picks its two accumulators after the K loop, and ``tl.sum`` adds them across the lanes.

Chained accumulators (``CHAIN``, the config's ``chain``)
-------------------------------------------------------
Triton keeps one accumulator set (c0..c3) per element, i.e. per word a thread holds, for each activation row: with
8 words of each row half per thread that is 32 registers per row, more than the words themselves. With ``CHAIN``
the words of a thread's 16-byte vector are split in registers (``tl.reshape`` + ``tl.split``, no data movement)
and their MMAs chained into one set, a quarter of the accumulators (gate_up's tiling at M = 1: 127 -> 78
registers, the same loop instructions; ``bench/gpu/sass_loop.py --chain``). Measured on the H200 (2026-11-30,
``bench/results/h200-2026-11-30i/``; ``bench/gpu/gemv_sweep.py`` and ``bench/gpu/table_ab.py`` repeat it): at M = 2, where the accumulators double, the chained
tilings the autotuner picked are 1.075x (gate_up) and 1.09x (8192x8192) faster than the tuned per-word ones; at
M = 1 chaining does not pay (0.88-0.95x on the tuned tilings; the best chained tiling 0.83-1.0x the best per-word):
ptxas then sinks the next block's loads behind most of the MMAs instead of issuing them first, and at M = 1 the
grid, not the register file, bounds the warps per SM (gate_up: 2,048 one-warp programs, 15.5 per SM). The
autotuner times both forms.

Precision: an MMA multiplies 16-bit values exactly and adds in fp32, as the reference does; only the fp32 summation
order differs. Needs sm_80+ (``mma.sync`` bf16) and the bf16x2 dequant of sm_90 for bf16 activations (see
:func:`kernels.w4a16.asm_ok`); inline PTX cannot run in the Triton interpreter, where the dispatcher runs the
CUDA-core GEMV of the same tiling instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a16_config import chain_ok
from .w4a16_gemv import emit, gemv_operands, group_scales, scale_column, split_plan, split_range, split_reduce
from .w4a16_mainloop import dequant_ptx_lines


def _dequant_pairs_ptx(bf16: bool) -> str:
    """PTX: one int32 word + its (s, s) pair -> four packed 16-bit pairs, codes (0,1), (2,3), (4,5), (6,7), each
    ``RN((u - 8) * s)`` (:func:`kernels.w4a16_mainloop.dequant_ptx_lines`, natural pairs, 17 instructions)."""
    lines = dequant_ptx_lines(bf16, True, "$4", "$5") + [f"mov.b32 ${t}, p{t};" for t in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


_PTX_PAIRS_BF16 = tl.constexpr(_dequant_pairs_ptx(True))
_PTX_PAIRS_FP16 = tl.constexpr(_dequant_pairs_ptx(False))
_PTX_MMA_BF16 = tl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                             "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")
_PTX_MMA_FP16 = tl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                             "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")
# D[r, r] sits in c0/c2 of lane 4r + r/2 when r is even, in c1/c3 of that lane when r is odd; zero elsewhere.
_PTX_DIAG = tl.constexpr("""{
.reg .u32 l, r, q;
.reg .pred p0, p1;
mov.u32 l, %laneid;
shr.u32 r, l, 2;
and.b32 q, l, 3;
shl.b32 q, q, 1;
setp.eq.u32 p0, r, q;
add.u32 q, q, 1;
setp.eq.u32 p1, r, q;
mov.f32 $0, 0f00000000;
mov.f32 $1, 0f00000000;
@p0 mov.f32 $0, $2;
@p0 mov.f32 $1, $4;
@p1 mov.f32 $0, $3;
@p1 mov.f32 $1, $5;
}""")
_PTX_LOAD4 = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];")


@triton.jit
def _pairs(w, s, IS_BF16: tl.constexpr):
    s16 = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.inline_asm_elementwise(_PTX_PAIRS_BF16 if IS_BF16 else _PTX_PAIRS_FP16, "=r,=r,=r,=r,r,r",
                                     [w, s16 | (s16 << 16)], dtype=(tl.int32, ) * 4, is_pure=True, pack=1)


@triton.jit
def _mma(c0, c1, c2, c3, a0, a1, a2, a3, b0, b1, IS_BF16: tl.constexpr):
    # (is_pure=False: never merge or drop a warp-collective instruction)
    return tl.inline_asm_elementwise(_PTX_MMA_BF16 if IS_BF16 else _PTX_MMA_FP16, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                                     [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32, ) * 4,
                                     is_pure=False, pack=1)


@triton.jit
def _row_mma(c0, c1, c2, c3, x_ptr, xoff, m, M, stride_xm, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3,
             IS_BF16: tl.constexpr):
    """Two MMAs for activation row ``m``: codes 0-3, then 4-7, of the lane's word of rows R1 (``pa*``) and R2."""
    p = x_ptr + tl.minimum(m, M - 1) * stride_xm + xoff
    x0, x1, x2, x3 = tl.inline_asm_elementwise(_PTX_LOAD4, "=r,=r,=r,=r,l", [p.to(tl.int64, bitcast=True)],
                                               dtype=(tl.int32, ) * 4, is_pure=True, pack=1)
    c0, c1, c2, c3 = _mma(c0, c1, c2, c3, pa0, pb0, pa1, pb1, x0, x1, IS_BF16)
    c0, c1, c2, c3 = _mma(c0, c1, c2, c3, pa2, pb2, pa3, pb3, x2, x3, IS_BF16)
    return c0, c1, c2, c3


@triton.jit
def _split4(t):
    """``[R, W]`` with a thread's 16-byte vectors along W -> the 4 words of every vector as four ``[R, W / 4]``
    tensors (in-register: the reshape and splits only rename a thread's registers)."""
    R: tl.constexpr = t.shape[0]
    W: tl.constexpr = t.shape[1]
    lo, hi = tl.split(tl.reshape(t, [R, W // 4, 2, 2]))
    t0, t1 = tl.split(lo)
    t2, t3 = tl.split(hi)
    return t0, t1, t2, t3


@triton.jit
def chain_split(wl, wh, sl, sh):
    """``chain`` (both tensor-core GEMVs): the 4 words of every thread's 16-byte vector of rows R1 (``wl``) and R2
    (``wh``) as separate tensors, and the scale of each vector (a vector lies in one scale group)."""
    wl0, wl1, wl2, wl3 = _split4(wl)
    wh0, wh1, wh2, wh3 = _split4(wh)
    sl0, _, _, _ = _split4(sl)
    sh0, _, _, _ = _split4(sh)
    return wl0, wl1, wl2, wl3, wh0, wh1, wh2, wh3, sl0, sh0


@triton.jit
def _word_mma(acc, x_ptr, xk, m0, M, stride_xm, wl, wh, sl, sh, BLOCK_M: tl.constexpr, IS_BF16: tl.constexpr):
    """The MMAs of one word slot (words ``wl`` of rows R1, ``wh`` of rows R2, scales ``sl``/``sh``, activation
    offsets ``xk``) for every activation row, into ``acc``: the 16 accumulators c0..c3 of rows m0..m0+3."""
    a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, e2, e3, f0, f1, f2, f3 = acc
    pa0, pa1, pa2, pa3 = _pairs(wl, sl, IS_BF16)
    pb0, pb1, pb2, pb3 = _pairs(wh, sh, IS_BF16)
    a0, a1, a2, a3 = _row_mma(a0, a1, a2, a3, x_ptr, xk, m0, M, stride_xm, pa0, pa1, pa2, pa3,
                              pb0, pb1, pb2, pb3, IS_BF16)
    if BLOCK_M > 1:
        b0, b1, b2, b3 = _row_mma(b0, b1, b2, b3, x_ptr, xk, m0 + 1, M, stride_xm, pa0, pa1, pa2, pa3,
                                  pb0, pb1, pb2, pb3, IS_BF16)
    if BLOCK_M > 2:
        e0, e1, e2, e3 = _row_mma(e0, e1, e2, e3, x_ptr, xk, m0 + 2, M, stride_xm, pa0, pa1, pa2, pa3,
                                  pb0, pb1, pb2, pb3, IS_BF16)
        f0, f1, f2, f3 = _row_mma(f0, f1, f2, f3, x_ptr, xk, m0 + 3, M, stride_xm, pa0, pa1, pa2, pa3,
                                  pb0, pb1, pb2, pb3, IS_BF16)
    return a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, e2, e3, f0, f1, f2, f3


@triton.jit
def pipeline_start(wl_ptrs, wh_ptrs, kb_total, WPB: tl.constexpr, PREFETCH: tl.constexpr):
    """The register pipeline of both tensor-core GEMVs, first step: the words of rows R1 (``wl_ptrs``) and R2 of
    K block 0 and, for PREFETCH 2, of block 1 (zeros past the end). Returns ``(wl, wh, wl1, wh1)``; the last two
    are the block in flight (unused at PREFETCH 1)."""
    wl = tl.load(wl_ptrs)
    wh = tl.load(wh_ptrs)
    wl1 = wl
    wh1 = wh
    if PREFETCH == 2:
        more = tl.full(wl_ptrs.shape, 1, tl.int32) < kb_total
        wl1 = tl.load(wl_ptrs + WPB, mask=more, other=0)
        wh1 = tl.load(wh_ptrs + WPB, mask=more, other=0)
    return wl, wh, wl1, wh1


@triton.jit
def pipeline_load(wl_ptrs, wh_ptrs, kb, kb_total, WPB: tl.constexpr, PREFETCH: tl.constexpr):
    """Issue the loads of K block ``kb + PREFETCH`` (zeros past the end) at the top of block ``kb``."""
    more = tl.full(wl_ptrs.shape, kb + PREFETCH, tl.int32) < kb_total
    return (tl.load(wl_ptrs + (kb + PREFETCH) * WPB, mask=more, other=0),
            tl.load(wh_ptrs + (kb + PREFETCH) * WPB, mask=more, other=0))


@triton.jit
def pipeline_shift(wl1, wh1, wl_next, wh_next, PREFETCH: tl.constexpr):
    """End of block ``kb``: the words of block ``kb + 1`` become current -> ``(wl, wh, wl1, wh1)``."""
    if PREFETCH == 2:
        return wl1, wh1, wl_next, wh_next
    else:
        return wl_next, wh_next, wl1, wh1


@triton.jit
def _finish_mma(c0, c1, c2, c3, b_lo, b_hi, out_ptr, ws_ptr, rows_lo, rows_hi, m, M, N, stride_om, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    y_lo, y_hi = tl.inline_asm_elementwise(_PTX_DIAG, "=f,=f,f,f,f,f", [c0, c1, c2, c3],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    emit(tl.sum(y_lo, axis=1), b_lo, out_ptr, ws_ptr, rows_lo, m, M, N, stride_om, pid_k, HAS_BIAS, False, SPLIT)
    emit(tl.sum(y_hi, axis=1), b_hi, out_ptr, ws_ptr, rows_hi, m, M, N, stride_om, pid_k, HAS_BIAS, False, SPLIT)


@triton.jit(do_not_specialize=["M", "N", "stride_sn", "SPLIT_K", "KB_PER_SPLIT"])
def _w4a16_gemv_mma_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    SPLIT_K, KB_PER_SPLIT,
    HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
    NG: tl.constexpr, PREFETCH: tl.constexpr, CHAIN: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    HALF: tl.constexpr = BLOCK_N // 2
    WPB: tl.constexpr = BLOCK_K // 8
    WPG: tl.constexpr = WPB // NG
    rows_lo = pid_n * BLOCK_N + tl.arange(0, HALF)      # R1 of every lane: first half of the program's rows
    rows_hi = rows_lo + HALF                            # R2: second half, same word index
    words = tl.arange(0, WPB)
    wl_ptrs = w_ptr + rows_lo.to(tl.int64)[:, None] * stride_wn + words[None, :]
    wh_ptrs = w_ptr + rows_hi.to(tl.int64)[:, None] * stride_wn + words[None, :]
    sl_ptrs = s_ptr + rows_lo.to(tl.int64)[:, None] * stride_sn + tl.arange(0, NG)[None, :]
    sh_ptrs = s_ptr + rows_hi.to(tl.int64)[:, None] * stride_sn + tl.arange(0, NG)[None, :]
    xoff = (rows_lo * 0)[:, None] + words[None, :] * 4   # see kernels.w4a16_gemv: takes the words' layout

    ACC_W: tl.constexpr = WPB // 4 if CHAIN else WPB   # CHAIN: one accumulator set per 4-word vector
    z = tl.zeros([HALF, ACC_W], dtype=tl.float32)
    acc = (z, ) * 16   # c0..c3 of the MMA for activation row m0, then m0+1, m0+2, m0+3

    # Register pipeline: the words of the next PREFETCH blocks are in flight while this block is computed.
    kb_lo, kb_total = split_range(K, KB_PER_SPLIT, BLOCK_K, SPLIT)   # this split's K blocks (all without SPLIT)
    if SPLIT:
        wl_ptrs += kb_lo * WPB
        wh_ptrs += kb_lo * WPB
        xoff += kb_lo * (BLOCK_K // 2)
    wl, wh, wl1, wh1 = pipeline_start(wl_ptrs, wh_ptrs, kb_total, WPB, PREFETCH)
    for kb in range(0, kb_total):
        wl_next, wh_next = pipeline_load(wl_ptrs, wh_ptrs, kb, kb_total, WPB, PREFETCH)
        col = scale_column(kb_lo + kb, BLOCK_K, GROUP_SIZE, NG)
        sl = group_scales(sl_ptrs, col, True, WPG)
        sh = group_scales(sh_ptrs, col, True, WPG)
        xk = xoff + kb * (BLOCK_K // 2)
        if CHAIN:
            # The four words of a thread's vector chain their MMAs into one accumulator set: a quarter of the
            # accumulator registers (see the module docstring for when that pays).
            wl0, wl1_, wl2, wl3, wh0, wh1_, wh2, wh3, sl0, sh0 = chain_split(wl, wh, sl, sh)
            x0, x1, x2, x3 = _split4(xk)
            acc = _word_mma(acc, x_ptr, x0, m0, M, stride_xm, wl0, wh0, sl0, sh0, BLOCK_M, IS_BF16)
            acc = _word_mma(acc, x_ptr, x1, m0, M, stride_xm, wl1_, wh1_, sl0, sh0, BLOCK_M, IS_BF16)
            acc = _word_mma(acc, x_ptr, x2, m0, M, stride_xm, wl2, wh2, sl0, sh0, BLOCK_M, IS_BF16)
            acc = _word_mma(acc, x_ptr, x3, m0, M, stride_xm, wl3, wh3, sl0, sh0, BLOCK_M, IS_BF16)
        else:
            acc = _word_mma(acc, x_ptr, xk, m0, M, stride_xm, wl, wh, sl, sh, BLOCK_M, IS_BF16)
        wl, wh, wl1, wh1 = pipeline_shift(wl1, wh1, wl_next, wh_next, PREFETCH)

    a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, e2, e3, f0, f1, f2, f3 = acc
    bias_lo = tl.zeros([HALF], dtype=tl.float32)
    bias_hi = tl.zeros([HALF], dtype=tl.float32)
    if HAS_BIAS:
        bias_lo = tl.load(bias_ptr + rows_lo).to(tl.float32)
        bias_hi = tl.load(bias_ptr + rows_hi).to(tl.float32)
    _finish_mma(a0, a1, a2, a3, bias_lo, bias_hi, out_ptr, ws_ptr, rows_lo, rows_hi, m0, M, N, stride_om, pid_k,
                HAS_BIAS, SPLIT)
    if BLOCK_M > 1:
        _finish_mma(b0, b1, b2, b3, bias_lo, bias_hi, out_ptr, ws_ptr, rows_lo, rows_hi, m0 + 1, M, N, stride_om,
                    pid_k, HAS_BIAS, SPLIT)
    if BLOCK_M > 2:
        _finish_mma(e0, e1, e2, e3, bias_lo, bias_hi, out_ptr, ws_ptr, rows_lo, rows_hi, m0 + 2, M, N, stride_om,
                    pid_k, HAS_BIAS, SPLIT)
        _finish_mma(f0, f1, f2, f3, bias_lo, bias_hi, out_ptr, ws_ptr, rows_lo, rows_hi, m0 + 3, M, N, stride_om,
                    pid_k, HAS_BIAS, SPLIT)
    if SPLIT:
        split_reduce(ws_ptr, cnt_ptr, bias_ptr, out_ptr, pid_n, pid_m, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N,
                     HAS_BIAS, False)


GEMV_MMA_BLOCK_M = (1, 2, 4)


def w4a16_gemv_mma(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, group_size: int, *, block_m: int, block_n: int, block_k: int,
                   num_warps: int, prefetch: int = 1, chain: bool = False, split_k: int = 1) -> torch.Tensor:
    """Launch the tensor-core GEMV (CUDA only; sm_80+, bf16 needs sm_90). Same operand contract as
    :func:`kernels.w4a16_gemv.w4a16_gemv`; ``block_m`` in (1, 2, 4), ``block_n`` >= 2 (two row halves);
    ``prefetch`` (1 or 2): K blocks of words loaded ahead of the one being computed; ``chain``: one accumulator set
    per 16-byte vector of words instead of per word (needs :func:`chain_ok`); ``split_k``: K slices per output
    tile (:func:`kernels.w4a16_gemv.split_plan`). Returns ``[M, N]`` of ``x.dtype``."""
    if block_n < 2:
        raise ValueError(f"w4a16_gemv_mma: need block_n >= 2 (two row halves), got {block_n}")
    if chain and not chain_ok(block_n, block_k, num_warps):
        raise ValueError(f"w4a16_gemv_mma: chain needs 4 words per thread and row half, got block_n={block_n}, "
                         f"block_k={block_k}, num_warps={num_warps}")
    x32, out, gk, ng, grid = gemv_operands("w4a16_gemv_mma", x, weight_packed, group_size, block_m, block_n,
                                           block_k, GEMV_MMA_BLOCK_M, prefetch)
    n, k = weight_packed.shape[0], x.shape[1]
    grid, split_k, kb_per_split, ws, cnt = split_plan(x32, n, k, block_k, split_k, grid)
    _w4a16_gemv_mma_kernel[grid](
        x32, weight_packed, weight_scale, bias if bias is not None else weight_scale, out, ws, cnt,
        x.shape[0], n, k,
        x32.stride(0), weight_packed.stride(0), weight_scale.stride(0), out.stride(0),
        split_k, kb_per_split,
        HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_SIZE=gk, NG=ng,
        PREFETCH=prefetch, CHAIN=chain, SPLIT=split_k > 1, num_warps=num_warps, num_stages=1,
    )
    return out
