"""Batch-3..16 W4A16 GEMV on tensor cores without shared memory: every column of each ``mma.sync`` an activation row.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)``, the operand contract of :mod:`kernels.w4a16_gemv` (a program owns
``BLOCK_N`` whole weight rows over all of K or one split-K slice, words loaded straight into registers one or two
K blocks ahead, no barrier and no shared memory in the K loop), for ``BLOCK_M`` = 8 or 16 activation rows per
program.

The hardware reason
-------------------
:mod:`kernels.w4a16_gemv_mma` feeds ``mma.sync.m16n8k16`` from registers but keeps only the diagonal of each MMA:
with Triton's lanes along K, the eight quads of a warp hold different words, so ``D[r, c]`` is a dot product only
where ``c = r``. One activation row then costs one MMA per word, and at M = 8..16 the issue slots run out (8 to 16
MMAs per word on top of the 17-instruction dequant); the split-K wgmma kernel takes over there and pays its per-block
chain of barriers and waits (twentieth session's profile). Here the eight quads of a warp hold the *same* words of
eight *different* rows, so every entry of ``D`` is a true dot product: the MMA's 8 columns are 8 activation rows.
A word costs its 17 dequant instructions, one MMA and half a 16-byte activation load per 8 activation rows, about
what the diagonal GEMV pays for one.

How a warp's threads become an MMA
----------------------------------
The words are loaded as ``[TR, 16]`` int32 tiles: 16 words (128 weights of K, a *chunk*) per tile row. For that
shape and 16-byte alignment Triton lays the load out ``sizePerThread [1, 4]``, ``threadsPerWarp [8, 4]``,
``warpsPerCTA [num_warps, 1]`` (``tests/test_kernels_fast.py`` checks it on the compiled TTGIR): lane
``4g + t`` holds words ``4t..4t+3`` of tile row ``8 * (warp + num_warps * rep) + g``. Tile row ``i`` is mapped to
weight row ``8 * rg + (i % 8)`` of the program's row half and to K chunk ``c`` of the block, with
``i // 8 = c * RG + rg``: all eight quads of a warp and register slot share one chunk (the MMA's K) and hold eight
different rows (the MMA's M). As in the diagonal GEMV, each lane passes the same word of two rows, ``R1`` (first
half of the program's rows) and ``R2`` (second half), as A rows ``g`` and ``g + 8``, and as B the 8 activations of its
word, of activation row ``m0 + g`` (the lane's quad picks the B column). Two MMAs cover a word pair (codes 0-3, then
4-7). Then ``D[g, c]`` (c0/c1 of lane ``4g + t``: columns ``2t``, ``2t + 1``) is row R1's partial dot product with
activation row ``m0 + 2t (+1)`` over the chunk, and c2/c3 the same for R2.

After the K loop a thread sums its words' accumulators (in registers), the chunks are summed (across warps where
``RG < num_warps``: a fixed ``tl.sum`` tree, the only shared-memory use), and each lane stores its two columns.
With ``CHAIN`` the four words of a thread's vector share one accumulator set (always possible here: a thread holds
whole vectors).

Measured (H200, 2026-11-30, ``bench/results/h200-2026-11-30j/``): 24.6 SASS instructions per word at 8 activation
rows, 25.6-28.5 at 16 (``bench/gpu/sass_loop.py --kernel gemv_mma8``), against 29.8-36 for the diagonal GEMV at 4
rows (two tilings). The
autotuner put it into the table at M = 4 (gate_up 1.17x, 8192x8192 1.11x the split-K entries), M = 8 (qkv, o,
gate_up, 8192x8192: 1.03-1.19x) and M = 16 (o: 1.06x). It is not faster everywhere: each lane loads 16 bytes of its
own activation row per word pair, 8 or 16 rows per warp 64 bytes apart, so a warp's activation load touches 16 L1
lines where the diagonal GEMV's touches 4 (rows of a thread that share a chunk share the load: the tile rows are
ordered chunk-fastest for that, which made M = 16 1.15x faster on gate_up); at M = 16 the split-K wgmma kernel
stays ahead on five of the six E4B shapes (best variant 0.78-1.00x of it). ncu at gate_up M = 8: L1/TEX throughput
78 % (the M = 1 diagonal GEMV: 47 %), 56 % of the warps' stalls waiting on L1TEX data.

Split-K (thirty-sixth session, H200, ``bench/results/h200-2026-12-01l/``): on down_proj (2560 x 8192) the 160
programs of 16 rows leave the GPU short of loads in flight; 16-row programs over 1024-wide K blocks in 4 K slices
(:func:`kernels.w4a16_gemv.split_reduce` sums them) took M = 4 from 10.78 to 9.20 µs and M = 8 from 10.91 to
9.79 µs (the split-K wgmma kernel before); on the other E4B shapes split-K changed nothing measurable.

Precision: as :mod:`kernels.w4a16_gemv_mma` (16-bit products exact, fp32 sums, only the order differs). Needs
sm_80+ (bf16 dequant: sm_90, :func:`kernels.w4a16.asm_ok`) and 16-byte aligned ``weight_packed`` (the layout
above depends on it; the launcher refuses other pointers). Where inline PTX cannot run the dispatcher runs the
CUDA-core :mod:`kernels.w4a16_gemv` on the same tiling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a16_config import CHUNK_K, mma8_ok
from .w4a16_gemv import _load_scales, emit, gemv_operands, split_plan, split_range, split_reduce
from .w4a16_gemv_mma import (_PTX_LOAD4, _mma, _pairs, _split4, chain_split, pipeline_load, pipeline_shift,
                             pipeline_start)


@triton.jit
def _chunk_scales(s_rows, chunk, kb, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr, NGC: tl.constexpr):
    """Scales of every word of the ``[TR, 16]`` tile of K block ``kb`` -> ``[TR, 16]``. ``s_rows`` [TR]: each tile
    row's scale row; ``chunk`` [TR]: its K chunk. A chunk holds ``NGC`` groups (1 for G >= 128), a thread's
    16-byte vector always one (G >= 32), so the broadcast stays in registers."""
    if GROUP_SIZE == 0:
        col = chunk * 0                                          # channelwise: one scale per row
    else:
        col = (kb * BLOCK_K + chunk * 128) // GROUP_SIZE            # the chunk's first group
    s = _load_scales(s_rows[:, None] + col[:, None] + tl.arange(0, NGC)[None, :], True)
    TR: tl.constexpr = s.shape[0]
    return tl.reshape(tl.broadcast_to(s[:, :, None], [TR, NGC, 16 // NGC]), [TR, 16])


@triton.jit
def _col_mma(c0, c1, c2, c3, x_ptr, xo, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3, IS_BF16: tl.constexpr):
    """Two MMAs of a word pair (rows R1 ``pa*``, R2 ``pb*``) against the 8 activations at int32 offsets ``xo``
    (each lane's own activation row: its MMA column)."""
    p = (x_ptr + xo).to(tl.int64, bitcast=True)
    x0, x1, x2, x3 = tl.inline_asm_elementwise(_PTX_LOAD4, "=r,=r,=r,=r,l", [p], dtype=(tl.int32, ) * 4,
                                               is_pure=True, pack=1)
    c0, c1, c2, c3 = _mma(c0, c1, c2, c3, pa0, pb0, pa1, pb1, x0, x1, IS_BF16)
    c0, c1, c2, c3 = _mma(c0, c1, c2, c3, pa2, pb2, pa3, pb3, x2, x3, IS_BF16)
    return c0, c1, c2, c3


@triton.jit
def _word_mma8(acc, x_ptr, xa, xb, wl, wh, sl, sh, BLOCK_M: tl.constexpr, IS_BF16: tl.constexpr):
    """The MMAs of one word slot: activation rows m0..m0+7 (offsets ``xa``) and, for BLOCK_M 16, m0+8..m0+15
    (``xb``), into ``acc`` (c0..c3 of each column block)."""
    a0, a1, a2, a3, b0, b1, b2, b3 = acc
    pa0, pa1, pa2, pa3 = _pairs(wl, sl, IS_BF16)
    pb0, pb1, pb2, pb3 = _pairs(wh, sh, IS_BF16)
    a0, a1, a2, a3 = _col_mma(a0, a1, a2, a3, x_ptr, xa, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3, IS_BF16)
    if BLOCK_M > 8:
        b0, b1, b2, b3 = _col_mma(b0, b1, b2, b3, x_ptr, xb, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3, IS_BF16)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _thread_sum(c, KC: tl.constexpr, HALF: tl.constexpr):
    """``[TR, W]`` accumulators (W = 16 words, or 4 vectors with CHAIN) -> ``[HALF, 4]``: summed over a lane's
    words and over the K chunks; column t is lane t's (its MMA columns 2t, 2t+1)."""
    TR: tl.constexpr = c.shape[0]
    W: tl.constexpr = c.shape[1]
    if W > 4:
        c = tl.sum(tl.reshape(c, [TR, 4, W // 4]), axis=2)
    return tl.reshape(tl.sum(tl.reshape(c, [HALF // 8, KC, 8, 4]), axis=1), [HALF, 4])


@triton.jit
def _store_cols(c, b, out_ptr, ws_ptr, rows, m, M, N, stride_om, pid_k, KC: tl.constexpr, HALF: tl.constexpr,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """One accumulator of every lane (``[TR, W]``) -> ``out[m[t], rows]`` for the lane columns ``m`` ([1, 4])
    (with ``SPLIT``: the split's partial, :func:`kernels.w4a16_gemv.emit`)."""
    emit(_thread_sum(c, KC, HALF), b[:, None], out_ptr, ws_ptr, rows[:, None], m, M, N, stride_om, pid_k, HAS_BIAS,
         False, SPLIT)


@triton.jit
def _finish8(c0, c1, c2, c3, b_lo, b_hi, out_ptr, ws_ptr, rows_lo, rows_hi, mb, M, N, stride_om, pid_k,
             KC: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Store one column block: c0/c1 are rows R1 x activation rows ``mb + 2t`` / ``mb + 2t + 1``, c2/c3 rows R2."""
    m = mb + 2 * tl.arange(0, 4)[None, :]
    _store_cols(c0, b_lo, out_ptr, ws_ptr, rows_lo, m, M, N, stride_om, pid_k, KC, HALF, HAS_BIAS, SPLIT)
    _store_cols(c1, b_lo, out_ptr, ws_ptr, rows_lo, m + 1, M, N, stride_om, pid_k, KC, HALF, HAS_BIAS, SPLIT)
    _store_cols(c2, b_hi, out_ptr, ws_ptr, rows_hi, m, M, N, stride_om, pid_k, KC, HALF, HAS_BIAS, SPLIT)
    _store_cols(c3, b_hi, out_ptr, ws_ptr, rows_hi, m + 1, M, N, stride_om, pid_k, KC, HALF, HAS_BIAS, SPLIT)


@triton.jit(do_not_specialize=["M", "N", "stride_sn", "SPLIT_K", "KB_PER_SPLIT"])
def _w4a16_gemv_mma8_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    SPLIT_K, KB_PER_SPLIT,
    HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
    NGC: tl.constexpr, PREFETCH: tl.constexpr, CHAIN: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    HALF: tl.constexpr = BLOCK_N // 2        # rows R1 = first half, R2 = second half (same words)
    RG: tl.constexpr = HALF // 8             # groups of 8 rows (the MMA's rows g) per half
    KC: tl.constexpr = BLOCK_K // 128        # K chunks of 16 words per block
    TR: tl.constexpr = 8 * RG * KC           # tile rows: (row group, chunk, g), g fastest
    WPB: tl.constexpr = BLOCK_K // 8
    i = tl.arange(0, TR)
    g = i % 8
    chunk = (i // 8) % KC
    rows_t = pid_n * BLOCK_N + ((i // 8) // KC) * 8 + g     # R1 row of each tile row
    wcol = chunk[:, None] * 16 + tl.arange(0, 16)[None, :]  # word within the K block: [TR, 16]
    wl_ptrs = w_ptr + rows_t.to(tl.int64)[:, None] * stride_wn + wcol
    wh_ptrs = wl_ptrs + HALF * stride_wn
    sl_rows = s_ptr + rows_t.to(tl.int64) * stride_sn
    sh_rows = sl_rows + HALF * stride_sn
    # Activation offsets (x as int32 pairs, 4 per word): row m0 + g, i.e. the B column of the lane's quad. Built
    # from the words' own index tensors so that they take the words' layout (see kernels.w4a16_gemv). Rows >= M
    # read row M - 1; their columns are computed and not stored.
    xa = (tl.minimum(m0 + g, M - 1) * stride_xm)[:, None] + wcol * 4
    xb = (tl.minimum(m0 + 8 + g, M - 1) * stride_xm)[:, None] + wcol * 4

    ACC_W: tl.constexpr = 4 if CHAIN else 16
    z = tl.zeros([TR, ACC_W], dtype=tl.float32)
    acc = (z, ) * 8   # c0..c3 of column block m0..m0+7, then of m0+8..m0+15

    # register pipeline as in kernels.w4a16_gemv_mma, over this split's K blocks (all without SPLIT)
    kb_lo, kb_total = split_range(K, KB_PER_SPLIT, BLOCK_K, SPLIT)
    if SPLIT:
        wl_ptrs += kb_lo * WPB
        wh_ptrs += kb_lo * WPB
        xa += kb_lo * (BLOCK_K // 2)
        xb += kb_lo * (BLOCK_K // 2)
    wl, wh, wl1, wh1 = pipeline_start(wl_ptrs, wh_ptrs, kb_total, WPB, PREFETCH)
    for kb in range(0, kb_total):
        wl_next, wh_next = pipeline_load(wl_ptrs, wh_ptrs, kb, kb_total, WPB, PREFETCH)
        sl = _chunk_scales(sl_rows, chunk, kb_lo + kb, BLOCK_K, GROUP_SIZE, NGC)
        sh = _chunk_scales(sh_rows, chunk, kb_lo + kb, BLOCK_K, GROUP_SIZE, NGC)
        xka = xa + kb * (BLOCK_K // 2)
        xkb = xb + kb * (BLOCK_K // 2)
        if CHAIN:
            wl0, wl1_, wl2, wl3, wh0, wh1_, wh2, wh3, sl0, sh0 = chain_split(wl, wh, sl, sh)
            xa0, xa1, xa2, xa3 = _split4(xka)
            xb0, xb1, xb2, xb3 = _split4(xkb)
            acc = _word_mma8(acc, x_ptr, xa0, xb0, wl0, wh0, sl0, sh0, BLOCK_M, IS_BF16)
            acc = _word_mma8(acc, x_ptr, xa1, xb1, wl1_, wh1_, sl0, sh0, BLOCK_M, IS_BF16)
            acc = _word_mma8(acc, x_ptr, xa2, xb2, wl2, wh2, sl0, sh0, BLOCK_M, IS_BF16)
            acc = _word_mma8(acc, x_ptr, xa3, xb3, wl3, wh3, sl0, sh0, BLOCK_M, IS_BF16)
        else:
            acc = _word_mma8(acc, x_ptr, xka, xkb, wl, wh, sl, sh, BLOCK_M, IS_BF16)
        wl, wh, wl1, wh1 = pipeline_shift(wl1, wh1, wl_next, wh_next, PREFETCH)

    a0, a1, a2, a3, b0, b1, b2, b3 = acc
    rows_lo = pid_n * BLOCK_N + tl.arange(0, HALF)
    rows_hi = rows_lo + HALF
    bias_lo = tl.zeros([HALF], dtype=tl.float32)
    bias_hi = tl.zeros([HALF], dtype=tl.float32)
    if HAS_BIAS:
        bias_lo = tl.load(bias_ptr + rows_lo).to(tl.float32)
        bias_hi = tl.load(bias_ptr + rows_hi).to(tl.float32)
    _finish8(a0, a1, a2, a3, bias_lo, bias_hi, out_ptr, ws_ptr, rows_lo, rows_hi, m0, M, N, stride_om, pid_k, KC,
             HALF, HAS_BIAS, SPLIT)
    if BLOCK_M > 8:
        _finish8(b0, b1, b2, b3, bias_lo, bias_hi, out_ptr, ws_ptr, rows_lo, rows_hi, m0 + 8, M, N, stride_om, pid_k,
                 KC, HALF, HAS_BIAS, SPLIT)
    if SPLIT:
        split_reduce(ws_ptr, cnt_ptr, bias_ptr, out_ptr, pid_n, pid_m, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N,
                     HAS_BIAS, False)


GEMV_MMA8_BLOCK_M = (8, 16)


def w4a16_gemv_mma8(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, group_size: int, *, block_m: int, block_n: int, block_k: int,
                    num_warps: int, prefetch: int = 1, chain: bool = False, split_k: int = 1) -> torch.Tensor:
    """Launch the full-MMA GEMV (CUDA only; sm_80+, bf16 needs sm_90). Same operand contract as
    :func:`kernels.w4a16_gemv.w4a16_gemv`, plus: ``weight_packed`` 16-byte aligned; ``block_m`` 8 or 16;
    ``block_n`` a multiple of 16; ``block_k`` a multiple of 128 with ``(block_n / 16) * (block_k / 128) >=
    num_warps`` (:func:`mma8_ok`); group size 32 or more; ``prefetch`` 1 or 2; ``chain``: one accumulator set per
    16-byte vector; ``split_k``: K slices per output tile (:func:`kernels.w4a16_gemv.split_plan`). Returns
    ``[M, N]`` of ``x.dtype``."""
    if not mma8_ok(block_n, block_k, num_warps):
        raise ValueError(f"w4a16_gemv_mma8: need block_n % 16 == 0, block_k % 128 == 0 and (block_n/16)*(block_k/128)"
                         f" >= num_warps, got block_n={block_n}, block_k={block_k}, num_warps={num_warps}")
    if weight_packed.data_ptr() % 16:
        raise ValueError("w4a16_gemv_mma8: weight_packed must start on a 16-byte boundary (the word tile's layout "
                         "depends on it); use the gemv kernel for this tensor")
    if group_size < 32:
        raise ValueError(f"w4a16_gemv_mma8: group size {group_size} < 32 (a thread's 4-word vector must lie in one "
                         "group)")
    x32, out, gk, _, grid = gemv_operands("w4a16_gemv_mma8", x, weight_packed, group_size, block_m, block_n,
                                          block_k, GEMV_MMA8_BLOCK_M, prefetch)
    ngc = CHUNK_K // gk if 0 < gk < CHUNK_K else 1
    n, k = weight_packed.shape[0], x.shape[1]
    grid, split_k, kb_per_split, ws, cnt = split_plan(x32, n, k, block_k, split_k, grid)
    _w4a16_gemv_mma8_kernel[grid](
        x32, weight_packed, weight_scale, bias if bias is not None else weight_scale, out, ws, cnt,
        x.shape[0], n, k,
        x32.stride(0), weight_packed.stride(0), weight_scale.stride(0), out.stride(0),
        split_k, kb_per_split,
        HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_SIZE=gk, NGC=ngc,
        PREFETCH=prefetch, CHAIN=chain, SPLIT=split_k > 1, num_warps=num_warps, num_stages=1,
    )
    return out
