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
parallelism) and the tree and the fold of every tile follow — by default in the same launch (``fuse``): each
chain program counts itself in at its tile's arrival counter (``atom.acq_rel.gpu``) after storing its chain,
and the last to arrive loads the others' chains from L2, folds and writes the tile, then resets the counter
(what Marlin's locks do for its stripes). Every tiling gives the same bits.

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

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from pack.packing import PACK_FACTOR, group_size_of

from .counters import grow_zeros, pool
from .env import interpreting
from .marlin_schedule import Launch, Schedule, build_schedule
from .w4a16 import on_operand_gpu

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
def _x_load(x_ptr, rows, rmask, k0, nt, stride_xm):
    """``A[rows, k0:k0+32]`` (rows past the launch masked to 0; all of it for an empty piece, ``nt <= 0``)."""
    kk = tl.arange(0, 32)
    return tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + kk)[None, :],
                   mask=(rmask & (rows * 0 + nt > 0))[:, None], other=0.0)


@triton.jit
def _w_load(wq_ptr, cols, kw0, nt, stride_wn):
    """Packed ``W[cols, 8 kw0 : 8 kw0 + 32]``: 32 k of a column are 4 consecutive int32 (16 bytes), one vector load
    per column. ``kw0`` is passed separately from the k offset (built from products of constants) so that Triton
    can prove the loads' alignment; ``nt <= 0`` (an empty piece, whose columns may lie past N) masks them off."""
    return tl.load(wq_ptr + cols[:, None] * stride_wn + (kw0 + tl.arange(0, 4))[None, :],
                   mask=(cols * 0 + nt > 0)[:, None], other=0)  # [BN, 4]


@triton.jit
def _chain_load(x_ptr, wq_ptr, rows, rmask, cols, k0, kw0, nt, stride_xm, stride_wn):
    """One warp-row chain's operands of one tile: ``A[rows, k0:k0+32]`` and the packed ``W[cols, k0:k0+32]``."""
    return _x_load(x_ptr, rows, rmask, k0, nt, stride_xm), _w_load(wq_ptr, cols, kw0, nt, stride_wn)


@triton.jit
def _tile_words(wq_ptr, cols, kw0, nt, stride_wn, KW: tl.constexpr, BN: tl.constexpr):
    """The packed weights of one whole k-tile row per column, split into its KW warp-row chains' ``[BN, 4]``.

    One ``[BN, 4 KW]`` load (a contiguous 32- or 64-byte run per column: a warp covers 8 columns per instruction,
    where four separate 16-byte chain loads touch 32 columns, i.e. 32 cache lines, each) instead of KW loads;
    word ``j`` of the tile belongs to chain ``j // 4``. The split goes through registers / shared memory, as
    Triton decides.
    """
    words = tl.load(wq_ptr + cols[:, None] * stride_wn + (kw0 + tl.arange(0, 4 * KW))[None, :],
                    mask=(cols * 0 + nt > 0)[:, None], other=0)  # [BN, 4 KW]
    if KW == 4:  # j = 8 c1 + 4 c0 + i, chain c = 2 c1 + c0
        w = tl.permute(tl.reshape(words, (BN, 2, 2, 4)), (0, 3, 1, 2))  # [BN, i, c1, c0]
        even, odd = tl.split(w)  # c0 = 0 / 1
        w0, w2 = tl.split(even)
        w1, w3 = tl.split(odd)
    else:  # j = 4 c + i
        w0, w1 = tl.split(tl.permute(tl.reshape(words, (BN, 2, 4)), (0, 2, 1)))
        w2 = w0
        w3 = w0
    return w0, w1, w2, w3


@triton.jit
def _arrive_and_fold(ctr_ptr, part_ptr, out_ptr, scale_ptr, bias_ptr, q, sub, l, stride_om, stride_sn, ROW_OFF,
                     M_SPLIT, MB, N_TILES, K_TILES, T1, T2, ITERS, MAXB, TN, NSUB, SUBS, SLOT0, NSLOTS, CHANNELWISE,
                     HAS_BIAS, FP32_REDUCE, KW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     SPLIT: tl.constexpr, IS_BF16: tl.constexpr, EMU: tl.constexpr):
    """The fused fold: count this program in at its tile's arrival counter; the last to arrive folds the tile.

    Called right after the program stored its partial (one chain with SPLIT, else a block partial). Expected
    arrivals: the tile's pieces (x KW with SPLIT). ``acq_rel`` at GPU scope after a CTA barrier: the other
    programs' partials are visible to the last one (loaded ``.cg``, from L2). It resets the counter to 0, so the
    buffer is zero again for the next call.
    """
    ip = (q < T1).to(tl.int32)
    p = tl.maximum(q - T1, 0)
    j_first, j_last = _split_tile(p, K_TILES, ITERS)
    n_pieces = ip + (1 - ip) * (j_last - j_first + 1)
    cidx = (l * (T1 + T2) + q) * SUBS + sub
    tl.debug_barrier()  # every thread's partial is stored before the release below
    arrived = tl.atomic_add(ctr_ptr + cidx, 1, sem="acq_rel", scope="gpu")
    if arrived == n_pieces * (KW if SPLIT else 1) - 1:  # everyone else has released their partials
        _fold_tile(part_ptr, out_ptr, scale_ptr, bias_ptr, q, sub, l, n_pieces, j_last, p, ip, stride_om, stride_sn,
                   ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, ITERS, MAXB, TN, NSUB, SUBS, SLOT0, NSLOTS,
                   CHANNELWISE, HAS_BIAS, FP32_REDUCE, KW, BM, BN, SPLIT, IS_BF16, EMU)
        tl.atomic_xchg(ctr_ptr + cidx, 0)


@triton.jit
def _chain_step(acc, a, words, s_ptr, s_tile, cols, k0, stride_sn, GROUP, BN: tl.constexpr,
                GROUPED: tl.constexpr, OWN_SCALE: tl.constexpr, IS_BF16: tl.constexpr, EMU: tl.constexpr,
                SWAP: tl.constexpr = False):
    """acc += A[rows, k0:k0+32] @ deq(W)[k0:k0+32, cols]: one warp-row's two chained k16 MMAs of one tile.

    ``SWAP``: the transposed product ``acc[BN, BM] += deq(W) @ A^T`` instead. Each output element is still the
    same 16 exact products per k16 step summed by the tensor core in k order onto the same accumulator; the
    weights become the MMA's *A* operand, so with BN >= 64 Triton can issue wgmma with the dequantised weights
    straight from registers (no shared-memory round trip) and the few activation rows as the narrow N side.

    ``a``, ``words``: the tile's operands from :func:`_chain_load`. ``s_tile`` holds the tile's scales when the
    whole tile lies in one group; with groups smaller than the tile (``OWN_SCALE``) each warp-row loads its own.
    """
    nib = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # [BN, 4, 8], k = 8*word + nibble
    w = tl.reshape(nib, (BN, 32)).to(tl.float32) - 8.0  # exact: q - 8 in [-8, 7]
    if GROUPED:  # 32 k never straddle a group (G is a multiple of 32): one scale per column
        if OWN_SCALE:
            s = tl.load(s_ptr + cols * stride_sn + k0 // GROUP).to(tl.float32)
        else:
            s = s_tile
        w = w * s[:, None]  # exact in fp32; rounded once below (Marlin's __hmul2)
    if EMU:  # interpreter: round with integer ops, dot on the exactly-representable fp32 values
        wd = _rn(w, IS_BF16, EMU)
        ad = a.to(tl.float32)
    elif IS_BF16:
        wd = w.to(tl.bfloat16)
        ad = a
    else:
        wd = w.to(tl.float16)
        ad = a
    if SWAP:
        return tl.dot(wd, tl.trans(ad), acc)
    else:
        return tl.dot(ad, tl.trans(wd), acc)


@triton.jit
def _tile_scales(scale_ptr, cols, t, t_last, stride_sn, GROUP, TK: tl.constexpr):
    """Scales of k-tile min(t, t_last) (the whole tile lies in one group): a prefetch one tile ahead."""
    return tl.load(scale_ptr + cols * stride_sn + (tl.minimum(t, t_last) * TK) // GROUP).to(tl.float32)


# Schedule scalars change with M; keeping Triton from specialising on them (value 1, divisibility by 16) keeps
# the number of compiled variants to the constexpr combinations.
_SCALARS = ["ROW_OFF", "M_SPLIT", "MB", "N_TILES", "K_TILES", "T1", "T2", "ITERS", "MAXB", "TN", "NSUB", "SUBS",
            "SLOT0", "NSLOTS", "stride_sn", "HAS_BIAS", "CHANNELWISE"]


@triton.jit(do_not_specialize=_SCALARS + ["GROUP", "FP32_REDUCE"])
def _marlin_pass1(
    x_ptr, wq_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr, ctr_ptr,
    stride_xm, stride_wn, stride_sn, stride_om,
    ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, T2, ITERS, MAXB, TN, NSUB, SUBS, SLOT0, NSLOTS, GROUP,
    CHANNELWISE, HAS_BIAS, FP32_REDUCE,
    TK: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUPED: tl.constexpr,
    OWN_SCALE: tl.constexpr, SPLIT: tl.constexpr, IS_BF16: tl.constexpr, EMU: tl.constexpr,
    PREFETCH: tl.constexpr, WR_FAST: tl.constexpr, SWAP: tl.constexpr, FUSE: tl.constexpr,
    TILE_LOAD: tl.constexpr,
):
    """Grid (T1 + slots [x KW if SPLIT and WR_FAST], sub-blocks [x KW if SPLIT and not WR_FAST], launches).

    SPLIT = False: the program runs all KW warp-row chains of its piece, combines them with the tree, and writes
    either the output (unsplit tile) or the block partial to workspace slot ``u - SLOT0``.
    SPLIT = True (small M: KW x more programs for the same work): the program runs ONE warp-row chain and stores
    it; pass 2 applies the tree and the fold for every tile — or, with FUSE, the tile's last chain program to
    arrive (an acq_rel counter per tile and sub-block in ``ctr_ptr``, reset to 0 by that program) does.
    """
    l = tl.program_id(2)
    if SPLIT and WR_FAST:  # the KW chains of a piece are neighbours in launch order: they share DRAM sectors
        u = tl.program_id(0) // KW
        wr = tl.program_id(0) % KW
        sub = tl.program_id(1)
    elif SPLIT:
        u = tl.program_id(0)
        sub = tl.program_id(1) // KW
        wr = tl.program_id(1) % KW
    else:
        u = tl.program_id(0)
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
    if SPLIT:
        # One chain per program. Decode is latency-bound: a program's tiles form a serial chain through one
        # accumulator, so the next PREFETCH tiles' operands are requested before this tile's MMAs (registers:
        # a [BN, 4] int32 and a [BM, 32] x tile per step of depth), keeping that many loads in flight per chain.
        ka = 32 * wr
        if SWAP:
            acc0 = tl.zeros((BN, BM), dtype=tl.float32)
        a_n1 = tl.zeros((BM, 32), dtype=x_ptr.dtype.element_ty)
        w_n1 = tl.zeros((BN, 4), dtype=tl.int32)
        a_n2 = a_n1
        w_n2 = w_n1
        if PREFETCH >= 1:
            a_n1, w_n1 = _chain_load(x_ptr, wq_ptr, rows, rmask, cols, t0 * TK + ka, t0 * (TK // 8) + 4 * wr,
                                     nt, stride_xm, stride_wn)
        if PREFETCH >= 2:
            t1 = tl.minimum(t0 + 1, t_last)
            a_n2, w_n2 = _chain_load(x_ptr, wq_ptr, rows, rmask, cols, t1 * TK + ka, t1 * (TK // 8) + 4 * wr,
                                     nt, stride_xm, stride_wn)
        for t in range(t0, t0 + nt):
            s_tile = s_next
            if GROUPED and not OWN_SCALE:  # load the next tile's scales while this one computes
                s_next = _tile_scales(scale_ptr, cols, t + 1, t_last, stride_sn, GROUP, TK)
            if PREFETCH == 0:
                a, w = _chain_load(x_ptr, wq_ptr, rows, rmask, cols, t * TK + ka, t * (TK // 8) + 4 * wr, nt,
                                   stride_xm, stride_wn)
            elif PREFETCH == 1:
                a, w = a_n1, w_n1
                tn = tl.minimum(t + 1, t_last)
                a_n1, w_n1 = _chain_load(x_ptr, wq_ptr, rows, rmask, cols, tn * TK + ka, tn * (TK // 8) + 4 * wr,
                                         nt, stride_xm, stride_wn)
            else:
                a, w = a_n1, w_n1
                a_n1, w_n1 = a_n2, w_n2
                tn = tl.minimum(t + 2, t_last)
                a_n2, w_n2 = _chain_load(x_ptr, wq_ptr, rows, rmask, cols, tn * TK + ka, tn * (TK // 8) + 4 * wr,
                                         nt, stride_xm, stride_wn)
            acc0 = _chain_step(acc0, a, w, scale_ptr, s_tile, cols, t * TK + ka, stride_sn, GROUP, BN, GROUPED,
                               OWN_SCALE, IS_BF16, EMU, SWAP)
    else:
        for t in range(t0, t0 + nt):
            s_tile = s_next
            if GROUPED and not OWN_SCALE:
                s_next = _tile_scales(scale_ptr, cols, t + 1, t_last, stride_sn, GROUP, TK)
            kt = t * TK
            kw = t * (TK // 8)
            if TILE_LOAD:  # one whole-tile-row load per column, split between the chains
                w0, w1, w2, w3 = _tile_words(wq_ptr, cols, kw, nt, stride_wn, KW, BN)
            else:  # one 16-byte load per column and chain
                w0 = _w_load(wq_ptr, cols, kw, nt, stride_wn)
                w1 = _w_load(wq_ptr, cols, kw + 4, nt, stride_wn)
                w2 = w0
                w3 = w0
                if KW == 4:
                    w2 = _w_load(wq_ptr, cols, kw + 8, nt, stride_wn)
                    w3 = _w_load(wq_ptr, cols, kw + 12, nt, stride_wn)
            acc0 = _chain_step(acc0, _x_load(x_ptr, rows, rmask, kt, nt, stride_xm), w0, scale_ptr, s_tile, cols,
                               kt, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)
            acc1 = _chain_step(acc1, _x_load(x_ptr, rows, rmask, kt + 32, nt, stride_xm), w1, scale_ptr, s_tile,
                               cols, kt + 32, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)
            if KW == 4:
                acc2 = _chain_step(acc2, _x_load(x_ptr, rows, rmask, kt + 64, nt, stride_xm), w2, scale_ptr,
                                   s_tile, cols, kt + 64, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)
                acc3 = _chain_step(acc3, _x_load(x_ptr, rows, rmask, kt + 96, nt, stride_xm), w3, scale_ptr,
                                   s_tile, cols, kt + 96, stride_sn, GROUP, BN, GROUPED, OWN_SCALE, IS_BF16, EMU)

    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    if nt > 0:
        if SPLIT:  # one warp-row's chain -> workspace [L, NSLOTS, SUBS, KW, BM, BN]
            base = part_ptr + (((l * NSLOTS + (u - SLOT0)) * SUBS + sub) * KW + wr) * (BM * BN)
            if SWAP:  # acc0 is [BN, BM]: store it transposed
                offs_t = tl.arange(0, BN)[:, None] + tl.arange(0, BM)[None, :] * BN
                tl.store(base + offs_t, acc0, mask=rmask[None, :])
            else:
                tl.store(base + offs, acc0, mask=rmask[:, None])
            if FUSE:  # the last chain program of a tile folds it (saves pass 2's launch; Marlin's locks, in spirit)
                _arrive_and_fold(ctr_ptr, part_ptr, out_ptr, scale_ptr, bias_ptr, q, sub, l, stride_om, stride_sn,
                                 ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, T2, ITERS, MAXB, TN, NSUB, SUBS, SLOT0,
                                 NSLOTS, CHANNELWISE, HAS_BIAS, FP32_REDUCE, KW, BM, BN, SPLIT, IS_BF16, EMU)
        else:
            blk = _tree(acc0, acc1, acc2, acc3, KW)
            if single:  # nobody else touches this tile: Marlin's write_result straight away
                _epilogue(blk, out_ptr, scale_ptr, bias_ptr, rows, rmask, tile_row0, cols, stride_om, stride_sn,
                          CHANNELWISE, HAS_BIAS, IS_BF16, EMU)
            else:  # fp32 block partial -> workspace [L, NSLOTS, SUBS, BM, BN]
                base = part_ptr + ((l * NSLOTS + (u - SLOT0)) * SUBS + sub) * (BM * BN)
                tl.store(base + offs, blk, mask=rmask[:, None])
                if FUSE:
                    _arrive_and_fold(ctr_ptr, part_ptr, out_ptr, scale_ptr, bias_ptr, q, sub, l, stride_om,
                                     stride_sn, ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, T2, ITERS, MAXB, TN,
                                     NSUB, SUBS, SLOT0, NSLOTS, CHANNELWISE, HAS_BIAS, FP32_REDUCE, KW, BM, BN,
                                     SPLIT, IS_BF16, EMU)


# ----------------------------------------------------------------------------------------------------------------
# Pass 2: fold the pieces of every split tile (every tile with SPLIT) in Marlin's order, then the epilogue
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_piece(part_ptr, slot, l, sub, NSLOTS, SUBS, offs, rmask, KW: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, SPLIT: tl.constexpr):
    """A piece's fp32 block partial: stored by pass 1, or (SPLIT) its KW chains combined with the tree.

    ``.cg`` loads (L2, not L1): with the fused fold the partials were just written by programs on other SMs.
    """
    if SPLIT:
        base = part_ptr + (((l * NSLOTS + slot) * SUBS + sub) * KW) * (BM * BN) + offs
        p0 = tl.load(base, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
        p1 = tl.load(base + BM * BN, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
        if KW == 4:
            p2 = tl.load(base + 2 * BM * BN, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
            p3 = tl.load(base + 3 * BM * BN, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
        else:
            p2 = p0
            p3 = p0
        return _tree(p0, p1, p2, p3, KW)
    else:
        return tl.load(part_ptr + ((l * NSLOTS + slot) * SUBS + sub) * (BM * BN) + offs, mask=rmask[:, None],
                       other=0.0, cache_modifier=".cg")


@triton.jit
def _fold_tile(part_ptr, out_ptr, scale_ptr, bias_ptr, q, sub, l, n_pieces, j_last, p, ip, stride_om, stride_sn,
               ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, ITERS, MAXB, TN, NSUB, SUBS, SLOT0, NSLOTS,
               CHANNELWISE, HAS_BIAS, FP32_REDUCE, KW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               SPLIT: tl.constexpr, IS_BF16: tl.constexpr, EMU: tl.constexpr):
    """Fold the ``n_pieces`` partials of tile ``q`` (sub-block ``sub``, launch ``l``) in Marlin's order; epilogue."""
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
        _fold_tile(part_ptr, out_ptr, scale_ptr, bias_ptr, q, sub, l, n_pieces, j_last, p, ip, stride_om, stride_sn,
                   ROW_OFF, M_SPLIT, MB, N_TILES, K_TILES, T1, ITERS, MAXB, TN, NSUB, SUBS, SLOT0, NSLOTS,
                   CHANNELWISE, HAS_BIAS, FP32_REDUCE, KW, BM, BN, SPLIT, IS_BF16, EMU)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def _pass1_counts(launch: Launch, bm: int, bn: int) -> tuple[int, int, int]:
    """``(nsub, subs, pieces)`` of one launch with ``bm x bn`` program tiles: ``nsub`` column sub-blocks per
    Marlin tile (``thread_n / bn``), ``subs`` sub-blocks per Marlin tile (``nsub`` x row sub-blocks of the
    ``mb``-row m-block), ``pieces`` pass-1 programs per (sub-block, launch): the unsplit tiles plus the slots."""
    nsub = launch.cfg.thread_n // bn
    return nsub, nsub * -(-launch.mb // bm), launch.part1_tiles + launch.slots


@dataclasses.dataclass(slots=True, eq=False)  # eq=False: identity equality and hashable, as before
class PassConfig:
    """Triton launch parameters of one launch group (free: every choice gives the same bits).

    ``prefetch`` (0-2, SPLIT only): tiles of operands requested ahead of the MMAs of each chain;
    ``wr_fast`` (SPLIT only): launch the KW chain programs of a piece next to each other;
    ``swap`` (SPLIT only): compute the transposed tile, weights as the MMA's A operand;
    ``fuse``: the last program to finish a split tile folds it (no pass 2 launch);
    ``tile_load`` (not SPLIT): one whole-tile-row load per column, split between the KW chains;
    ``maxnreg``: cap on registers per thread (PTX ``.maxnreg``; None = the compiler's choice). Decode pass 1 is
    latency-bound and its programs are resident 4 per SM at 126 registers: a cap trades spills for occupancy.

    The SPLIT-only / not-SPLIT-only flags are masked here (off where they do not apply), flags made bool.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split: bool
    prefetch: int = 0
    wr_fast: bool = False
    swap: bool = False
    fuse: bool = False
    tile_load: bool = False
    maxnreg: int | None = None

    def __post_init__(self):
        if self.maxnreg is not None and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"maxnreg must be in [24, 255] or None, got {self.maxnreg}")
        if self.block_m not in (16, 32, 64) or self.block_n not in (32, 64, 128, 256):
            raise ValueError(f"block_m must be 16/32/64 and block_n 32..256, got {self.block_m}, {self.block_n}")
        if self.prefetch not in (0, 1, 2):
            raise ValueError(f"prefetch must be 0, 1 or 2, got {self.prefetch}")
        split = self.split
        self.prefetch = self.prefetch if split else 0
        self.wr_fast = bool(self.wr_fast) and split
        self.swap = bool(self.swap) and split
        self.fuse = bool(self.fuse)
        self.tile_load = bool(self.tile_load) and not split


def pass_config(launch: Launch, block_m: int | None = None, block_n: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None,
                split: bool | None = None, prefetch: int | None = None,
                wr_fast: bool | None = None, swap: bool | None = None, fuse: bool | None = None,
                tile_load: bool | None = None, maxnreg: int | None = None) -> PassConfig:
    """Default tiles (measured on an H200, see bench/bench_marlin_exact.py --tune): m-blocks of <= 16 rows run
    BM 16 (mma.sync) with one program per warp-row chain (SPLIT) over BN 128 columns (capped at Marlin's
    thread_n); larger ones BM 64 (wgmma) with all chains in one program, BN 128 with 4 warps when two chains
    (64 x 128 x 2 fp32 accumulators), BN 64 with 8 warps when four.

    SPLIT (decode) defaults, from the 2026-11-29 tune grid on the E4B shapes at M = 1 and 16 (bench/results/
    h200-2026-11-29c): the fused fold everywhere; with thread_n 128 (the wide gate_up layers: short chains,
    many programs) the KW chain programs of a piece launched side by side and the transposed MMA (gate_up
    16384 x 2560, M=1: 34.3 -> 32.0 us); with thread_n 64 (long chains) one tile of operand prefetch (down
    2560 x 8192: 32.4 -> 30.6 us). ``kernels.verify --decode-variant`` re-ran the sweep's M <= 16 cases with the
    fused, transposed, side-by-side variant: 0 mismatching elements (H200, 2026-11-29).

    Long decode grids: at its ~128 registers per thread pass 1 keeps 4 programs per SM resident. When the grid
    holds more than two such waves (``programs > 8 * sms``: gate_up 20480 x 2560 has 1,536 chain programs on 132
    SMs), a cap of 96 registers (5 per SM) with 4 pipeline stages measured 47.0 -> 44.9 us at M=1; at <= 2 waves
    the cap only slows it (gate_up 16384 x 2560: 31.4 -> 35.7 us; qkv, o, down likewise; bench/results/
    h200-2026-11-29d/tune3.json)."""
    bm = block_m or (16 if launch.mb <= 16 else 64)
    sp = (bm == 16) if split is None else split
    kw = 1 if sp else launch.cfg.kw
    bn = min(block_n or (128 if sp else 64 if bm == 16 or kw == 4 else 128), launch.cfg.thread_n)
    warps = num_warps or (8 if bm == 64 and kw == 4 else 4)
    wide = launch.cfg.thread_n >= 128
    pf = (0 if wide else 1) if prefetch is None else prefetch
    wf = wide if wr_fast is None else wr_fast
    swap = wide if swap is None else swap
    fuse = sp if fuse is None else fuse
    stages = num_stages or 3
    if sp and maxnreg is None and num_stages is None:
        _, subs, pieces = _pass1_counts(launch, bm, bn)
        programs = pieces * launch.cfg.kw * subs
        if programs > 8 * launch.sms:
            maxnreg, stages = 96, 4
    return PassConfig(bm, bn, warps, stages, sp, pf, wf, swap, fuse, tile_load, maxnreg)


LAST_COMPILED: dict = {}  # the compiled kernels the latest call launched (kernels.verify reads their PTX)


# The fused fold's per-tile arrival counters: device -> every buffer handed out there (kernels.counters.grow_zeros).
# Calls on concurrent streams of one device must not share them: launch them in order or pass ``fuse=False``.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = pool("marlin")


@functools.lru_cache(maxsize=16)
def device_sms(index: int) -> int:
    """Multiprocessor count of CUDA device ``index`` (what Marlin reads with cudaDevAttrMultiProcessorCount)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check(x, weight_packed, weight_scale, bias) -> tuple[int, int, int]:
    if x.dim() < 1:
        raise ValueError("x must be [..., K], got a 0-d tensor")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bfloat16 or float16, got {x.dtype}")
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise TypeError(f"weight_packed must be int32 [N, K/8], got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    n, k = weight_packed.shape[0], x.shape[-1]
    if k == 0 or n == 0:
        raise ValueError(f"N={n}, K={k}: an empty weight has nothing to multiply")
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


INT32_LIMIT = 2**31  # offsets the kernels compute in int32 stay below this (tests lower it to force chunking)


def _grid_chunks(sched: Schedule, row_cap: int):
    """``(group, count, first_row)`` for every grid to launch: each launch group of ``sched`` (same-shaped Marlin
    launches, one grid) cut into runs of launches spanning at most ``row_cap`` rows."""
    for grp in sched.groups:
        ln = sched.launches[grp.first]
        per = row_cap // ln.m_split
        if per < 1:
            raise ValueError(f"N={ln.n}: one launch's {ln.m_split} rows overflow int32 offsets")
        for c0 in range(0, grp.count, per):
            yield grp, min(per, grp.count - c0), ln.row_off + c0 * ln.m_split


@on_operand_gpu   # Triton launches on the current device: run on the operands' GPU
def w4a16_gemm_exact(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, use_fp32_reduce: bool = True, sms: int = -1,
                     *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, split: bool | None = None, prefetch: int | None = None,
                     wr_fast: bool | None = None, swap: bool | None = None,
                     fuse: bool | None = None, tile_load: bool | None = None,
                     maxnreg: int | None = None) -> torch.Tensor:
    """``y = x @ dequant(W).T (+ bias)`` with the bits of vLLM 0.26.0 ``marlin_gemm`` on a GPU with ``sms`` SMs.

    Args:
        x: ``[..., K]`` bfloat16 or float16 (any leading shape; the last dim must be contiguous).
        weight_packed: int32 ``[N, K/8]`` compressed-tensors pack-quantized codes (uint4b8, low nibble first).
        weight_scale: ``[N, K/G]`` in x's dtype (G = 32, 64 or 128), or ``[N, 1]`` channelwise.
        bias: optional ``[N]`` in x's dtype.
        use_fp32_reduce: Marlin's flag (vLLM default True): the cross-block fold in fp32, else in x's dtype.
        sms: SM count Marlin ran with; -1 = this device's (``cudaDevAttrMultiProcessorCount``).
        block_m, block_n, num_warps, num_stages, split, prefetch, wr_fast, swap, fuse, tile_load, maxnreg: Triton
            launch choices (:func:`pass_config`; they do not change the bits).

    Returns:
        ``[..., N]`` in x's dtype.
    """
    m, n, k = _check(x, weight_packed, weight_scale, bias)
    LAST_COMPILED.clear()  # only what this call runs (the fused decode path launches no pass 2)
    if weight_packed.numel() * 2 >= INT32_LIMIT:
        raise ValueError(f"N={n}, K={k} too large: the kernels index the weight with int32 offsets")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    # Activation and output rows are indexed with int32 offsets (row * stride) inside a grid. Marlin moves its
    # pointers launch by launch, so any M works there; here each grid gets views starting at its first row and
    # covers at most `row_cap` rows, which keeps every offset below 2^31 whatever M is (bits unchanged: every
    # launch computes its rows on its own).
    row_cap = (INT32_LIMIT - 1) // max(x2.stride(0), n, 1)
    emu = interpreting()
    if sms == -1:
        if x.device.type != "cuda":
            raise ValueError("sms=-1 needs a CUDA tensor; pass the SM count explicitly")
        sms = device_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    g = group_size_of(k, weight_scale)
    sched: Schedule = build_schedule(m, n, k, g, "bfloat16" if x.dtype == torch.bfloat16 else "float16", sms)
    channelwise = sched.problem.group_blocks == -1
    wq = weight_packed if weight_packed.is_contiguous() else weight_packed.contiguous()
    ws = weight_scale if weight_scale.stride(1) == 1 else weight_scale.contiguous()
    # the kernels read bias[cols] without a stride; ws is a dummy pointer when HAS_BIAS is False
    b = bias.contiguous() if bias is not None else ws
    out2 = out.view(m, n)
    is_bf16 = x.dtype == torch.bfloat16
    for grp, count, row0 in _grid_chunks(sched, row_cap):
        ln = sched.launches[grp.first]
        cfg = pass_config(ln, block_m, block_n, num_warps, num_stages, split, prefetch, wr_fast, swap, fuse,
                          tile_load, maxnreg)
        bm, bn, sp = cfg.block_m, cfg.block_n, cfg.split
        nsub, subs, pieces = _pass1_counts(ln, bm, bn)
        needs_pass2 = sp or any(len(f) > 1 for f in ln.folds)
        slot0, nslots = (0, pieces) if sp else (ln.part1_tiles, ln.slots)
        part_numel = count * nslots * subs * (ln.cfg.kw if sp else 1) * bm * bn if needs_pass2 else 1
        if part_numel >= INT32_LIMIT:
            raise ValueError(f"M={m}, N={n}, K={k}: fp32 workspace too large for int32 indexing")
        part = torch.empty(part_numel, dtype=torch.float32, device=x.device)
        xg, og = x2[row0:], out2[row0:]  # this grid's rows start at its views' row 0
        scalars = dict(ROW_OFF=0, M_SPLIT=ln.m_split, MB=ln.mb, N_TILES=ln.n_tiles, K_TILES=ln.k_tiles,
                       T1=ln.part1_tiles, T2=ln.part2_tiles, ITERS=ln.iters, MAXB=ln.max_pieces_per_block,
                       TN=ln.cfg.thread_n, NSUB=nsub, SUBS=subs, SLOT0=slot0, NSLOTS=nslots,
                       CHANNELWISE=int(channelwise), HAS_BIAS=int(bias is not None),
                       FP32_REDUCE=int(bool(use_fp32_reduce)))  # runtime args both passes take
        common = dict(KW=ln.cfg.kw, BM=bm, BN=bn, SPLIT=sp, IS_BF16=is_bf16, EMU=emu,
                      enable_fp_fusion=False)  # no mul+add -> fma contraction anywhere: every rounding is Marlin's
        fan = ln.cfg.kw if sp else 1  # SPLIT: one program per warp-row chain
        grid1 = (pieces * fan, subs, count) if cfg.wr_fast else (pieces, subs * fan, count)
        ctr = grow_zeros(_COUNTERS, x.device, count * ln.tiles * subs, 1 << 16) if cfg.fuse else part
        LAST_COMPILED["pass1"] = _marlin_pass1[grid1](
            xg, wq, ws, b, og, part, ctr, x2.stride(0), wq.stride(0), ws.stride(0), out2.stride(0),
            GROUP=max(g, 1), **scalars, TK=ln.cfg.thread_k, GROUPED=int(not channelwise),
            OWN_SCALE=int(not channelwise and g < ln.cfg.thread_k), PREFETCH=cfg.prefetch, WR_FAST=cfg.wr_fast,
            SWAP=cfg.swap, FUSE=cfg.fuse, TILE_LOAD=cfg.tile_load, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({} if cfg.maxnreg is None or emu else {"maxnreg": cfg.maxnreg}),
        )
        if needs_pass2 and not cfg.fuse:
            LAST_COMPILED["pass2"] = _marlin_pass2[(ln.tiles if sp else ln.part2_tiles, subs, count)](
                part, og, ws, b, out2.stride(0), ws.stride(0), **scalars, **common, num_warps=4,
            )
    return out
