"""Marlin-order W4A16 GEMM: bit-identical to vLLM 0.26.0's Marlin, in two Triton passes.

Why a second kernel
-------------------
Floating-point addition is not associative, so two correct int4 GEMMs differ in the last bit of a few outputs.
vLLM's Marlin (the W4A16 kernel vLLM runs for compressed-tensors checkpoints when Machete is off) sums in a very
particular order, which depends on M, N, K and on the GPU's SM count (spec marlin-arithmetic.md §6). This kernel
replays that order, so its output has the same bits as Marlin's for the same logical weights. It is a
verification tool (same tokens as vLLM-with-Marlin, golden outputs for CI), not the fast path: pdqkit's fast
kernel is ``pdqkit::w4a16_gemm``.

What Marlin computes, and how we replay it
------------------------------------------
Weights arrive in compressed-tensors layout: ``weight_packed`` int32 ``[N, K/8]`` (nibble ``k % 8`` of word
``k // 8`` holds ``q = w + 8``) and ``weight_scale`` ``[N, K/G]`` (or ``[N, 1]`` channelwise). Marlin's own repacked
layout is never needed: only the *order of the arithmetic* matters, not where the bytes sit.

1. Dequantisation (§4): ``w = RN((q - 8) * s)`` in the activation dtype, one rounding; channelwise: ``w = q - 8``.
2. Tensor-core chains (§5, §6.3): inside a Marlin thread block, warp-row ``w`` of ``KW = thread_k / 32`` owns the
   32 consecutive k of every ``thread_k`` tile that start at ``32 w``, and chains them through one fp32
   accumulator with m16n8k16 MMAs, tile after tile. ``tl.dot(a[BM, 32], w[32, BN], acc)`` is exactly two
   chained k16 MMAs (measured bit-identical for Triton's mma.sync and wgmma lowerings on sm_90).
3. The fixed in-block tree (§6.4): ``B = P0 + (P1 + (P3 + P2))`` for KW = 4, ``P0 + P1`` for KW = 2.
4. Stripes and the cross-block fold (§6.2, §6.5): ``sms`` blocks share the work; a tile cut into pieces is folded
   from the bottom piece (largest k) up: ``R = B_bottom; R = B_next + R; ...`` in fp32 (or, with
   ``use_fp32_reduce=False``, ``R = B_next + RN(R)``).
5. Epilogue (§6.6): ``y = RN(R)``, channelwise ``y = RN(y * s)``, bias ``y = RN(y + b)`` — except channelwise
   WITH bias, where the compiled binary fuses scale and bias into one FMA in all but the first unrolled write
   (see :func:`_epilogue`; found on the H200 against Marlin, confirmed in the binary's SASS).

Pass 1 runs one program per *piece* (what one Marlin block computes for one tile) and BN-column / BM-row
sub-block: it runs the KW chains over the piece's k-tiles, combines them with the tree, and either writes the
final output (tiles that are not split: every part-1 tile and unsplit part-2 tiles) or stores the fp32 block
partial into a workspace slot. Pass 2 runs one program per split tile and folds the slots in Marlin's order.
For small M (``SPLIT``, the decode default) pass 1 instead runs one program per warp-row chain (KW times the
parallelism) and pass 2 applies the tree and the fold for every tile. Every tiling gives the same bits.

The pieces are not read from a table: both passes derive them from a few launch scalars with the same integer
arithmetic Marlin's ``init_part2_slice`` uses (block ``j`` owns k-tile units ``[j*iters, (j+1)*iters)`` of the
part-2 tiles laid end to end), so a call does no host-to-device copy and can be captured in a CUDA graph.
kernels/marlin_schedule.py derives the same pieces by walking every Marlin block; the tests check they agree.

Interpreter (CPU) mode
----------------------
Under ``TRITON_INTERPRET=1`` bf16 tensors are raw uint16 and the interpreter's fp32->bf16 cast truncates, so the
kernel switches (constexpr ``EMU``) to an integer round-to-nearest-even and to fp32 dot operands (the values are
already rounded to the activation dtype, so only the dot's summation model changes: numpy's fp32 matmul instead of
the tensor core). That mode checks indexing, chain order, tree and fold exactly on CPU; the tensor-core bits are
only checked on the GPU against Marlin (``python -m kernels.verify``).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pack.packing import PACK_FACTOR, group_size_of

from .marlin_schedule import Launch, Schedule, build_schedule

__all__ = ["w4a16_gemm_exact", "device_sms", "PassConfig", "pass_config"]


# ----------------------------------------------------------------------------------------------------------------
# Rounding helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _rn(x, IS_BF16: tl.constexpr, EMU: tl.constexpr):
    """fp32 tensor holding ``RN_dtype(x)`` (round to nearest even into bf16/fp16, back to fp32 exactly).

    On the GPU this is ``cvt.rn.bf16.f32`` / ``cvt.rn.f16.f32`` — the same rounding as Marlin's
    ``__float2bfloat16`` / ``__float2half`` and as the RN step of ``__hmul2``/``__hadd2`` (a product or sum of two
    16-bit values is exact in fp32 for the product, and double rounding fp32 -> bf16/fp16 is innocuous for the
    sum since 24 >= 2p + 2). In the interpreter bf16 rounding is done on the fp32 bit pattern.
    """
    if EMU and IS_BF16:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)
    elif IS_BF16:
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        return x.to(tl.float16).to(tl.float32)


@triton.jit
def _store_out(ptrs, y, mask, IS_BF16: tl.constexpr, EMU: tl.constexpr):
    """Store fp32 ``y`` (already rounded to the output dtype) into a bf16/fp16 tensor."""
    if EMU and IS_BF16:  # interpreter bf16 storage is the raw upper half of the fp32 pattern
        bits = (y.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(ptrs, bits.to(tl.bfloat16, bitcast=True), mask=mask)
    elif IS_BF16:
        tl.store(ptrs, y.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptrs, y.to(tl.float16), mask=mask)


@triton.jit
def _rn_fma(a, b, c, IS_BF16: tl.constexpr, EMU: tl.constexpr):
    """fp32 tensor holding ``RN_dtype(a * b + c)`` rounded ONCE, as ``HFMA2`` computes it (a, b, c: 16-bit values).

    ``a * b`` is exact in fp32 (two 8- or 11-bit significands). TwoSum gives ``hi + lo == a*b + c`` exactly (it
    relies on no fma contraction: the kernels are compiled with ``enable_fp_fusion=False``); rounding ``hi`` to
    odd with ``lo`` as sticky bit and then to the 16-bit type is a single correct rounding (round-to-odd needs
    p + 2 bits in the intermediate; fp32 has 24 >= 11 + 2).
    """
    p = a * b
    hi = p + c
    bv = hi - p
    lo = (p - (hi - bv)) + (c - bv)
    bits = hi.to(tl.int32, bitcast=True)
    trunc = tl.where((lo > 0) == (hi > 0), bits, bits - 1)  # the fp32 neighbour of a*b + c towards zero
    odd = tl.where(lo == 0, bits, trunc | 1)
    return _rn(odd.to(tl.float32, bitcast=True), IS_BF16, EMU)


@triton.jit
def _epilogue(r, out_ptr, scale_ptr, bias_ptr, rows, rmask, tile_row0, cols, stride_om, stride_sn, CHANNELWISE,
              HAS_BIAS, IS_BF16: tl.constexpr, EMU: tl.constexpr):
    """Marlin ``write_result``: y = RN(R); channelwise y = RN(y * s); bias y = RN(y + b); store.

    Channelwise with bias is what the compiled 0.26.0 binary does, not what its source says: ptxas fuses
    ``__hmul2`` + ``__hadd2`` into one ``HFMA2`` (a single rounding) in every unrolled ``write`` of
    ``write_result`` except the first, whose multiply is hoisted above the ``has_bias && last`` branch (SASS of all
    15 bf16 channelwise kernels: N-1 HFMA2 and one HMUL2/HADD2 pair; ptxas on the fp16 PTX: the same). The first
    write covers rows 0-7 of the tile and columns 0-7 of each warp's 64 columns.
    ``CHANNELWISE`` and ``HAS_BIAS`` are runtime 0/1 flags (fewer compiled variants; the branches are uniform).
    """
    y = _rn(r, IS_BF16, EMU)
    if CHANNELWISE != 0:  # __hmul2 after the conversion, one scale per output column
        s = tl.load(scale_ptr + cols * stride_sn).to(tl.float32)[None, :]
        if HAS_BIAS != 0:
            b = tl.load(bias_ptr + cols).to(tl.float32)[None, :]
            first = ((rows - tile_row0) < 8)[:, None] & ((cols % 64) < 8)[None, :]
            y = tl.where(first, _rn(_rn(y * s, IS_BF16, EMU) + b, IS_BF16, EMU), _rn_fma(y, s, b, IS_BF16, EMU))
        else:
            y = _rn(y * s, IS_BF16, EMU)
    else:
        if HAS_BIAS != 0:  # __hadd2, only by the block that writes the output
            b = tl.load(bias_ptr + cols).to(tl.float32)
            y = _rn(y + b[None, :], IS_BF16, EMU)
    _store_out(out_ptr + rows[:, None] * stride_om + cols[None, :], y, rmask[:, None], IS_BF16, EMU)


# ----------------------------------------------------------------------------------------------------------------
# Piece arithmetic shared by both passes (Marlin's init_part1_slice / init_part2_slice, closed form)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_rows_cols(q, sub, l, ROW_OFF, M_SPLIT, MB, N_TILES, TN, NSUB, BM: tl.constexpr, BN: tl.constexpr):
    """Global rows / columns of sub-block ``sub`` of tile ``q`` in launch ``l`` of the group."""
    par_id = q // N_TILES
    col = q % N_TILES
    n_sub = sub % NSUB
    m_sub = sub // NSUB
    launch_row0 = ROW_OFF + l * M_SPLIT
    tile_row0 = launch_row0 + par_id * MB
    rows = tile_row0 + m_sub * BM + tl.arange(0, BM)
    rmask = (rows < launch_row0 + M_SPLIT) & (rows < tile_row0 + MB)
    cols = col * TN + n_sub * BN + tl.arange(0, BN)
    return rows, rmask, tile_row0, cols


@triton.jit
def _split_tile(p, K_TILES, ITERS):
    """Blocks ``j_first..j_last`` whose stripes cut part-2 tile ``p`` (k-tile units [p*K_TILES, (p+1)*K_TILES))."""
    j_first = (p * K_TILES) // ITERS
    j_last = ((p + 1) * K_TILES - 1) // ITERS
    return j_first, j_last


@triton.jit
def _piece(u, T1, T2, K_TILES, ITERS, MAXB):
    """Piece ``u`` -> (tile q, first k-tile t0, k-tiles nt, tile is unsplit). nt <= 0: empty slot.

    Part 1 (u < T1): tile u alone over all of K. Part 2: slot u - T1 = j * MAXB + r is block j's r-th tile; block j
    owns the part-2 k-tile units [j*ITERS, (j+1)*ITERS) (the T2 tiles laid end to end).
    """
    is_p1 = u < T1
    v = tl.maximum(u - T1, 0)
    j = v // MAXB
    lo = j * ITERS
    hi = tl.minimum(lo + ITERS, T2 * K_TILES)
    p = lo // K_TILES + v % MAXB
    start = tl.maximum(lo, p * K_TILES)
    end = tl.minimum(hi, (p + 1) * K_TILES)
    j_first, j_last = _split_tile(p, K_TILES, ITERS)
    ip = is_p1.to(tl.int32)  # select by arithmetic: a scalar tl.where is not 0-d in Triton 3.6's interpreter
    q = ip * u + (1 - ip) * (T1 + p)
    t0 = (1 - ip) * (start - p * K_TILES)
    nt = ip * K_TILES + (1 - ip) * (end - start)
    single = is_p1 | (j_first == j_last)
    return q, t0, nt, single


@triton.jit
def _tree(acc0, acc1, acc2, acc3, KW: tl.constexpr):
    """thread_block_reduce: warp-rows 2 and 3 write, row 1 adds (P3 + P2), row 0 adds the result (fp32)."""
    if KW == 4:
        return acc0 + (acc1 + (acc3 + acc2))
    else:
        return acc0 + acc1


# ----------------------------------------------------------------------------------------------------------------
# Pass 1: one program per (piece, column/row sub-block[, warp-row])
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _chain_step(acc, x_ptr, wq_ptr, s_ptr, s_tile, rows, rmask, cols, k0, kw0, stride_xm, stride_wn, stride_sn,
                GROUP, BN: tl.constexpr, GROUPED: tl.constexpr, OWN_SCALE: tl.constexpr, IS_BF16: tl.constexpr,
                EMU: tl.constexpr):
    """acc += A[rows, k0:k0+32] @ deq(W)[k0:k0+32, cols]: one warp-row's two chained k16 MMAs of one tile.

    ``kw0 = k0 / 8`` is passed separately (built from products of constants) so that Triton can prove the
    alignment of the weight loads. ``s_tile`` holds the tile's scales when the whole tile lies in one group;
    with groups smaller than the tile (``OWN_SCALE``) each warp-row loads its own.
    """
    kk = tl.arange(0, 32)
    a = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + kk)[None, :], mask=rmask[:, None], other=0.0)
    # 32 k of a column = 4 consecutive int32 (16 bytes): one vector load per column, then split the nibbles.
    words = tl.load(wq_ptr + cols[:, None] * stride_wn + (kw0 + tl.arange(0, 4))[None, :])  # [BN, 4]
    nib = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # [BN, 4, 8], k = 8*word + nibble
    w = tl.reshape(nib, (BN, 32)).to(tl.float32) - 8.0  # exact: q - 8 in [-8, 7]
    if GROUPED:  # 32 k never straddle a group (G is a multiple of 32): one scale per column
        if OWN_SCALE:
            s = tl.load(s_ptr + cols * stride_sn + k0 // GROUP).to(tl.float32)
        else:
            s = s_tile
        w = w * s[:, None]  # exact in fp32; rounded once below (Marlin's __hmul2)
    if EMU:  # interpreter: round with integer ops, dot on the exactly-representable fp32 values
        return tl.dot(a.to(tl.float32), tl.trans(_rn(w, IS_BF16, EMU)), acc)
    elif IS_BF16:
        return tl.dot(a, tl.trans(w.to(tl.bfloat16)), acc)
    else:
        return tl.dot(a, tl.trans(w.to(tl.float16)), acc)


@triton.jit
def _tile_scales(scale_ptr, cols, t, t_last, stride_sn, GROUP, TK: tl.constexpr):
    """Scales of k-tile min(t, t_last) (the whole tile lies in one group): a prefetch one tile ahead."""
    return tl.load(scale_ptr + cols * stride_sn + (tl.minimum(t, t_last) * TK) // GROUP).to(tl.float32)


# Schedule scalars change with M; keeping Triton from specialising on them (value 1, divisibility by 16) keeps
# the number of compiled variants to the constexpr combinations.
_SCALARS = ["ROW_OFF", "M_SPLIT", "MB", "N_TILES", "K_TILES", "T1", "T2", "ITERS", "MAXB", "TN", "NSUB", "SUBS",
            "SLOT0", "NSLOTS", "stride_sn", "HAS_BIAS", "CHANNELWISE"]


@triton.jit(do_not_specialize=_SCALARS + ["GROUP"])
def _marlin_pass1(
    x_ptr, wq_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr,
    stride_xm, stride_wn, stride_sn, stride_om,
    ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, T2, ITERS, MAXB, TN, NSUB, SUBS, SLOT0, NSLOTS, GROUP,
    CHANNELWISE, HAS_BIAS,
    TK: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUPED: tl.constexpr,
    OWN_SCALE: tl.constexpr, SPLIT: tl.constexpr, IS_BF16: tl.constexpr, EMU: tl.constexpr,
):
    """Grid (T1 + slots, sub-blocks [x KW if SPLIT], launches).

    SPLIT = False: the program runs all KW warp-row chains of its piece, combines them with the tree, and writes
    either the output (unsplit tile) or the block partial to workspace slot ``u - SLOT0``.
    SPLIT = True (small M: KW x more programs for the same work): the program runs ONE warp-row chain and stores
    it; pass 2 applies the tree and the fold for every tile.
    """
    u = tl.program_id(0)
    l = tl.program_id(2)
    if SPLIT:
        sub = tl.program_id(1) // KW
        wr = tl.program_id(1) % KW
    else:
        sub = tl.program_id(1)
        wr = 0
    q, t0, nt, single = _piece(u, T1, T2, K_TILES, ITERS, MAXB)
    rows, rmask, tile_row0, cols = _tile_rows_cols(q, sub, l, ROW_OFF, M_SPLIT, MB, N_TILES, TN, NSUB, BM, BN)

    # KW independent chains, one per Marlin warp-row, each advancing by 32 k per tile, tiles in increasing order.
    acc0 = tl.zeros((BM, BN), dtype=tl.float32)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    s_next = tl.zeros((BN,), dtype=tl.float32)
    t_last = tl.maximum(t0 + nt - 1, 0)
    if GROUPED and not OWN_SCALE:
        s_next = _tile_scales(scale_ptr, cols, t0, t_last, stride_sn, GROUP, TK)
    for t in range(t0, t0 + nt):
        s_tile = s_next
        if GROUPED and not OWN_SCALE:  # load the next tile's scales while this one computes
            s_next = _tile_scales(scale_ptr, cols, t + 1, t_last, stride_sn, GROUP, TK)
        kt = t * TK
        kw = t * (TK // 8)
        if SPLIT:
            acc0 = _chain_step(acc0, x_ptr, wq_ptr, scale_ptr, s_tile, rows, rmask, cols, kt + 32 * wr,
                               kw + 4 * wr, stride_xm, stride_wn, stride_sn, GROUP, BN, GROUPED, OWN_SCALE,
                               IS_BF16, EMU)
        else:
            acc0 = _chain_step(acc0, x_ptr, wq_ptr, scale_ptr, s_tile, rows, rmask, cols, kt, kw, stride_xm,
                               stride_wn, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)
            acc1 = _chain_step(acc1, x_ptr, wq_ptr, scale_ptr, s_tile, rows, rmask, cols, kt + 32, kw + 4,
                               stride_xm, stride_wn, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)
            if KW == 4:
                acc2 = _chain_step(acc2, x_ptr, wq_ptr, scale_ptr, s_tile, rows, rmask, cols, kt + 64, kw + 8,
                                   stride_xm, stride_wn, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)
                acc3 = _chain_step(acc3, x_ptr, wq_ptr, scale_ptr, s_tile, rows, rmask, cols, kt + 96, kw + 12,
                                   stride_xm, stride_wn, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)

    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    if nt > 0:
        if SPLIT:  # one warp-row's chain -> workspace [L, NSLOTS, SUBS, KW, BM, BN]
            base = part_ptr + (((l * NSLOTS + (u - SLOT0)) * SUBS + sub) * KW + wr) * (BM * BN)
            tl.store(base + offs, acc0, mask=rmask[:, None])
        else:
            blk = _tree(acc0, acc1, acc2, acc3, KW)
            if single:  # nobody else touches this tile: Marlin's write_result straight away
                _epilogue(blk, out_ptr, scale_ptr, bias_ptr, rows, rmask, tile_row0, cols, stride_om, stride_sn,
                          CHANNELWISE, HAS_BIAS, IS_BF16, EMU)
            else:  # fp32 block partial -> workspace [L, NSLOTS, SUBS, BM, BN]
                base = part_ptr + ((l * NSLOTS + (u - SLOT0)) * SUBS + sub) * (BM * BN)
                tl.store(base + offs, blk, mask=rmask[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Pass 2: fold the pieces of every split tile (every tile with SPLIT) in Marlin's order, then the epilogue
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_piece(part_ptr, slot, l, sub, NSLOTS, SUBS, offs, rmask, KW: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, SPLIT: tl.constexpr):
    """A piece's fp32 block partial: stored by pass 1, or (SPLIT) its KW chains combined with the tree."""
    if SPLIT:
        base = part_ptr + (((l * NSLOTS + slot) * SUBS + sub) * KW) * (BM * BN) + offs
        p0 = tl.load(base, mask=rmask[:, None], other=0.0)
        p1 = tl.load(base + BM * BN, mask=rmask[:, None], other=0.0)
        if KW == 4:
            p2 = tl.load(base + 2 * BM * BN, mask=rmask[:, None], other=0.0)
            p3 = tl.load(base + 3 * BM * BN, mask=rmask[:, None], other=0.0)
        else:
            p2 = p0
            p3 = p0
        return _tree(p0, p1, p2, p3, KW)
    else:
        return tl.load(part_ptr + ((l * NSLOTS + slot) * SUBS + sub) * (BM * BN) + offs, mask=rmask[:, None],
                       other=0.0)


@triton.jit(do_not_specialize=_SCALARS + ["FP32_REDUCE"])
def _marlin_pass2(
    part_ptr, out_ptr, scale_ptr, bias_ptr,
    stride_om, stride_sn,
    ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, T2, ITERS, MAXB, TN, NSUB, SUBS, SLOT0, NSLOTS,
    CHANNELWISE, HAS_BIAS, FP32_REDUCE,
    KW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, IS_BF16: tl.constexpr,
    EMU: tl.constexpr,
):
    """Grid (tiles, sub-blocks, launches): every tile with SPLIT, else the part-2 tiles (p = program 0)."""
    if SPLIT:
        q = tl.program_id(0)
    else:
        q = T1 + tl.program_id(0)
    sub = tl.program_id(1)
    l = tl.program_id(2)
    ip = (q < T1).to(tl.int32)
    p = tl.maximum(q - T1, 0)
    j_first, j_last = _split_tile(p, K_TILES, ITERS)
    n_pieces = ip + (1 - ip) * (j_last - j_first + 1)
    if SPLIT:
        todo = n_pieces > 0
    else:  # pass 1 wrote the unsplit tiles itself
        todo = n_pieces > 1
    if todo:
        rows, rmask, tile_row0, cols = _tile_rows_cols(q, sub, l, ROW_OFF, M_SPLIT, MB, N_TILES, TN, NSUB, BM, BN)
        offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        # slice_idx 0 = block j_last (largest k); its partial starts the fold (global_reduce, first=True).
        first_slot = ip * q + (1 - ip) * (T1 + j_last * MAXB + (p - (j_last * ITERS) // K_TILES)) - SLOT0
        r = _load_piece(part_ptr, first_slot, l, sub, NSLOTS, SUBS, offs, rmask, KW, BM, BN, SPLIT)
        for i in range(1, n_pieces):
            j = j_last - i
            slot = T1 + j * MAXB + (p - (j * ITERS) // K_TILES) - SLOT0
            b = _load_piece(part_ptr, slot, l, sub, NSLOTS, SUBS, offs, rmask, KW, BM, BN, SPLIT)
            if FP32_REDUCE != 0:  # global_reduce_fp32: frag_c += C_tmp
                r = b + r
            else:  # global_reduce_fp16: the running sum travels through C in the output dtype
                r = b + _rn(r, IS_BF16, EMU)
        _epilogue(r, out_ptr, scale_ptr, bias_ptr, rows, rmask, tile_row0, cols, stride_om, stride_sn,
                  CHANNELWISE, HAS_BIAS, IS_BF16, EMU)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
class PassConfig:
    """Triton launch parameters of one launch group (free: every choice gives the same bits)."""

    __slots__ = ("block_m", "block_n", "num_warps", "num_stages", "split")

    def __init__(self, block_m: int, block_n: int, num_warps: int, num_stages: int, split: bool):
        if block_m not in (16, 32, 64) or block_n not in (32, 64, 128, 256):
            raise ValueError(f"block_m must be 16/32/64 and block_n 32..256, got {block_m}, {block_n}")
        self.block_m, self.block_n, self.num_warps, self.num_stages = block_m, block_n, num_warps, num_stages
        self.split = split

    def __repr__(self):
        return (f"PassConfig(bm={self.block_m}, bn={self.block_n}, warps={self.num_warps}, "
                f"stages={self.num_stages}, split={self.split})")


def pass_config(launch: Launch, block_m: int | None = None, block_n: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None,
                split: bool | None = None) -> PassConfig:
    """Default tiles (measured on an H200, see bench/bench_marlin_exact.py --tune): m-blocks of <= 16 rows run
    BM 16 (mma.sync) with one program per warp-row chain (SPLIT) over BN 128 columns (capped at Marlin's
    thread_n); larger ones BM 64 (wgmma) with all chains in one program, BN 128 with 4 warps when two chains
    (64 x 128 x 2 fp32 accumulators), BN 64 with 8 warps when four. SPLIT with BN 128 instead of 64 took gate_up
    16384 x 2560 at M=1 from 48.0 to 38.9 us and left the other E4B shapes within 1 %; ``kernels.verify
    --decode-variant`` re-ran 193 of the sweep's M <= 16 cases with it: 0 mismatching elements (H200, 2026-11-29)."""
    bm = block_m or (16 if launch.mb <= 16 else 64)
    sp = (bm == 16) if split is None else split
    kw = 1 if sp else launch.cfg.kw
    bn = min(block_n or (128 if sp else 64 if bm == 16 or kw == 4 else 128), launch.cfg.thread_n)
    warps = num_warps or (8 if bm == 64 and kw == 4 else 4)
    return PassConfig(bm, bn, warps, num_stages or 3, sp)


LAST_COMPILED: dict = {}  # the compiled kernels of the latest call (kernels.verify reads their PTX)


@functools.lru_cache(maxsize=16)
def device_sms(index: int) -> int:
    """Multiprocessor count of CUDA device ``index`` (what Marlin reads with cudaDevAttrMultiProcessorCount)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x, weight_packed, weight_scale, bias) -> tuple[int, int, int]:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bfloat16 or float16, got {x.dtype}")
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise TypeError(f"weight_packed must be int32 [N, K/8], got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    n, k = weight_packed.shape[0], x.shape[-1]
    if weight_packed.shape[1] * PACK_FACTOR != k:
        raise ValueError(f"weight_packed {tuple(weight_packed.shape)} does not match K={k} of x (need [N, K/8])")
    if weight_scale.dim() != 2 or weight_scale.shape[0] != n:
        raise ValueError(f"weight_scale must be [N={n}, K/G], got {tuple(weight_scale.shape)}")
    if weight_scale.dtype != x.dtype:
        raise TypeError(f"weight_scale dtype {weight_scale.dtype} must equal x dtype {x.dtype} (as in Marlin)")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    devs = {t.device for t in (x, weight_packed, weight_scale) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {devs}")
    return x.numel() // k if k else 0, n, k


def w4a16_gemm_exact(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, use_fp32_reduce: bool = True, sms: int = -1,
                     *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, split: bool | None = None) -> torch.Tensor:
    """``y = x @ dequant(W).T (+ bias)`` with the bits of vLLM 0.26.0 ``marlin_gemm`` on a GPU with ``sms`` SMs.

    Args:
        x: ``[..., K]`` bfloat16 or float16 (any leading shape; the last dim must be contiguous).
        weight_packed: int32 ``[N, K/8]`` compressed-tensors pack-quantized codes (uint4b8, low nibble first).
        weight_scale: ``[N, K/G]`` in x's dtype (G = 32, 64 or 128), or ``[N, 1]`` channelwise.
        bias: optional ``[N]`` in x's dtype.
        use_fp32_reduce: Marlin's flag (vLLM default True): the cross-block fold in fp32, else in x's dtype.
        sms: SM count Marlin ran with; -1 = this device's (``cudaDevAttrMultiProcessorCount``).
        block_m, block_n, num_warps, num_stages, split: Triton tile choices (:func:`pass_config`; they do not
            change the bits).

    Returns:
        ``[..., N]`` in x's dtype.
    """
    m, n, k = _check(x, weight_packed, weight_scale, bias)
    if max(x.numel(), m * n, weight_packed.numel() * 2) >= 2**31:
        raise ValueError(f"M={m}, N={n}, K={k} too large: the kernels index with int32 offsets")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    emu = _interpreting()
    if sms == -1:
        if x.device.type != "cuda":
            raise ValueError("sms=-1 needs a CUDA tensor; pass the SM count explicitly")
        sms = device_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    g = group_size_of(k, weight_scale)
    sched: Schedule = build_schedule(m, n, k, g, "bfloat16" if x.dtype == torch.bfloat16 else "float16", sms)
    channelwise = sched.problem.group_blocks == -1
    wq = weight_packed if weight_packed.is_contiguous() else weight_packed.contiguous()
    ws = weight_scale if weight_scale.stride(1) == 1 else weight_scale.contiguous()
    b = bias if bias is not None else ws  # dummy pointer when HAS_BIAS is False
    out2 = out.view(m, n)
    is_bf16 = x.dtype == torch.bfloat16
    for grp in sched.groups:
        ln = sched.launches[grp.first]
        cfg = pass_config(ln, block_m, block_n, num_warps, num_stages, split)
        bm, bn, sp = cfg.block_m, cfg.block_n, cfg.split
        nsub = ln.cfg.thread_n // bn
        subs = nsub * -(-ln.mb // bm)
        pieces = ln.part1_tiles + ln.slots  # pass-1 programs per (sub-block, launch)
        needs_pass2 = sp or any(len(f) > 1 for f in ln.folds)
        slot0, nslots = (0, pieces) if sp else (ln.part1_tiles, ln.slots)
        part_numel = grp.count * nslots * subs * (ln.cfg.kw if sp else 1) * bm * bn if needs_pass2 else 1
        if part_numel >= 2**31:
            raise ValueError(f"M={m}, N={n}, K={k}: fp32 workspace too large for int32 indexing")
        part = torch.empty(part_numel, dtype=torch.float32, device=x.device)
        scalars = dict(ROW_OFF=ln.row_off, M_SPLIT=ln.m_split, MB=ln.mb, N_TILES=ln.n_tiles, K_TILES=ln.k_tiles,
                       T1=ln.part1_tiles, T2=ln.part2_tiles, ITERS=ln.iters, MAXB=ln.max_pieces_per_block,
                       TN=ln.cfg.thread_n, NSUB=nsub, SUBS=subs, SLOT0=slot0, NSLOTS=nslots,
                       CHANNELWISE=int(channelwise), HAS_BIAS=int(bias is not None))
        common = dict(KW=ln.cfg.kw, BM=bm, BN=bn, SPLIT=sp, IS_BF16=is_bf16, EMU=emu,
                      enable_fp_fusion=False)  # no mul+add -> fma contraction anywhere: every rounding is Marlin's
        LAST_COMPILED["pass1"] = _marlin_pass1[(pieces, subs * (ln.cfg.kw if sp else 1), grp.count)](
            x2, wq, ws, b, out2, part, x2.stride(0), wq.stride(0), ws.stride(0), out2.stride(0),
            GROUP=max(g, 1), **scalars, TK=ln.cfg.thread_k, GROUPED=int(not channelwise),
            OWN_SCALE=int(not channelwise and g < ln.cfg.thread_k), **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if needs_pass2:
            LAST_COMPILED["pass2"] = _marlin_pass2[(ln.tiles if sp else ln.part2_tiles, subs, grp.count)](
                part, out2, ws, b, out2.stride(0), ws.stride(0), **scalars,
                FP32_REDUCE=int(bool(use_fp32_reduce)), **common, num_warps=4,
            )
    return out
