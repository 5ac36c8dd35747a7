"""Prefill-shaped W4A16 GEMM in Gluon, warp-specialised: one TMA producer warp, two consumer warpgroups.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)``, the same arithmetic as :mod:`kernels.w4a16_prefill_tma` (weights
dequantized straight into wgmma's register A operand, fixed K order), with a different schedule.

The hardware reason for this kernel
-----------------------------------
In ``prefill_tma`` every warp of a CTA waits for its K block's wgmma before it dequantizes the next one (ptxas
does not keep a register A operand alive across an asynchronous wgmma), and a CTA barrier per K block keeps all
warps in step, so within a CTA the ALUs (dequantization) and the tensor cores (wgmma) take turns.

A CTA runs two consumer warpgroups (64 weight rows each, ``BM`` activation rows) fed by one producer warp through
a TMA ring, in one of two modes:

* ``block_n`` 128: the CTA owns ``2 x 64`` weight rows, one half per warpgroup; both read every activation box.
* ``block_n`` 64: the CTA owns 64 weight rows; the warpgroups take every other K block (even / odd) and their two
  fp32 sums meet in ``64 x BM x 4`` bytes of shared memory at the end (even + odd, in that order). This halves
  each CTA's serial chain of K blocks for the grids that leave SMs idle (the small E4B shapes at M = 256: 64-96
  CTAs of 128 x 64 on 132 SMs), where split-K across CTAs (partials through global memory) paid only on long K.

The partitions:

* **Producer warp** (a worker partition, 1 warp): waits on a slot's ``empty`` barrier, then issues the TMA copies
  of the next K block (activation boxes and the ``[block_n, BK/8]`` word tile) against its ``ready`` barrier.
* **Consumers** (the default partition and one worker partition, 4 warps each): wait on ``ready``, dequantize
  their 64 rows of words into wgmma's A fragment, run the wgmma, wait for it, then arrive on ``empty`` (count 2
  when both read the slot, else 1: the slot is refilled only once the wgmmas that read it have retired).
* No CTA barrier in the K loop (the barriers Gluon emits there are named ones of the partition's 128 threads), so
  the two warpgroups drift apart: while one's wgmma runs on the tensor cores the other dequantizes on the ALUs of
  the same SM sub-partitions. Each warpgroup is still serial in itself, so no register is read by a wgmma in
  flight while it is rewritten.
* With K halves and an odd ring, the slots go to the two warpgroups in turn, and one can get a whole lap ahead:
  an mbarrier wait names a phase only by its parity, so a wait for block ``i`` made while block ``i - STAGES``
  (the other warpgroup's) has not landed takes the completed phase of block ``i - 2 STAGES`` (same parity) for
  block ``i``'s. So it first waits for the other warpgroup's release of block ``i - STAGES``. Without that wait,
  1024 CTAs of 64 K blocks at 5 slots ended in an unspecified launch failure on the H200 (the cause above was
  inferred from the code afterwards; a GPU test runs that launch).

Triton pads the producer's partition to a warpgroup, so a CTA runs 12 warps and holds the register file (168
registers each at launch, rebalanced by ``setmaxnreg``: 232 for the worker consumer, 24 for the producer): one
CTA per SM. Measured on the H200 against the table entries they replaced (A/B in one process): 128 rows per CTA
1.12-1.14x on gate_up at M = 256-1024 and 1.20x on 8192x8192 at M = 512-1024 (``prefill_tma``, dequantize +
cuBLAS before); K halves 1.07-1.10x on qkv and o at M = 256 (``prefill_tma`` before), 1.18x on 8192x8192 and 1.48x
on ``down`` (with split-K 3) at M = 128; the optional serial split-K
(:func:`kernels.w4a16_prefill_tma.store_acc`) takes one ticket per warpgroup, or per CTA with K halves.

Stream-K (``stream_k``, its own partitions :func:`_producer_stream` / :func:`_consumer_stream`): one CTA per SM,
CTA ``c`` of ``G`` takes steps ``[c W / G, (c + 1) W / G)`` of all ``W`` (tile, K block) steps, tile by tile through
one ring. A tile whose steps all lie in one share is stored directly; a shared one is summed by whichever owner
takes the last ticket (:func:`kernels.w4a16_prefill_tma.store_parts`): the tail of its first owner's share, then
the heads of the next owners' shares, in step order. With K halves the reduction buffer is reused per tile (a
second mbarrier says when the even warpgroup has read it). Measured on the H200 (twenty-ninth session,
``bench/results/h200-2026-12-01e``): where every share is whole tiles it runs as fast as the tiled launch or
faster (30.5 against 30.6 us with 264 tiles on 132 SMs, 47.9 against 52.1 with 528), and it won one table entry,
``down`` (2560x8192) at M = 512, 1.086x against split-K 3. On four E4B shapes at M = 256 and 1024 (a first
version) its best tiling reached only 0.66-0.91x of the best tiled one or the table's entry. The likely cost (by
inference, not profiled): a shared tile's partial store, fenced ticket and the last owner's reloads, against
shares of a few K blocks (10-15 on qkv and o at M = 256). The tiled launch's code is kept apart on purpose: a first version
that ran both through one loop over tiles made the 3-slot 128-row tilings 0.90-0.985x as fast (one-process A/B);
as written, the tiled kernel's SASS is byte-identical to the one before stream-K (Triton 3.6 and 3.9).

Determinism: with 128 rows each output is one warpgroup's chain of k16 MMAs in K order: without a split the bits
are ``prefill_tma``'s with the same activation rows and K block (checked on the GPU); with K halves it is the even
blocks' chain plus the odd blocks' chain; with a split the bits depend on the split count too (partials summed in
split order); with stream-K on the SM count too (the shares' boundaries; a tile in one share has the tiled
launch's bits, checked on the GPU).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .counters import grow_zeros
from .w4a16_prefill import grouped_tile, stream_owners, stream_parts, stream_span
from .w4a16_prefill_tma import (_COUNTERS, SUB_K, _block_scales, _cta_barrier, _dequant, _issue, _mma_block,
                                _next_scales, _store_out, check_launch, descriptors, split_workspace, store_acc,
                                store_parts, word_layout)
from .w4a16_marlin import device_sms


@gluon.jit
def _producer(x_desc, w_desc, x_smem, w_smem, ready, empty, off_m, off_n, kb_lo, kb_hi,
              STAGES: gl.constexpr, BK: gl.constexpr):
    for i in range(kb_hi - kb_lo):
        # A fresh barrier counts as having completed the phase before its first: the first pass does not wait.
        mbarrier.wait(empty.index(i % STAGES), ((i // STAGES) & 1) ^ 1)
        _issue(x_desc, w_desc, x_smem, w_smem, ready, i, kb_lo + i, off_m, off_n, True, STAGES, BK)


@triton.constexpr_function
def _acc_layout(BM):
    """The consumer warpgroup's fp32 accumulator ``[64 weight rows, BM]``: wgmma's, on 4 warps."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])


@gluon.jit
def _consume_block(x_smem, w_smem, ready, empty, acc, s2, sel, i, slot, ROW0: gl.constexpr, KSTEP: gl.constexpr,
                   IS_BF16: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr):
    """The CTA's ``i``-th ring step (in ``slot``, ``i % STAGES``): wait for it, dequantize rows ``ROW0 .. ROW0 + 63``
    of its words (scale pairs ``s2``), ``acc +=`` their product with its activation boxes, release the slot."""
    RW: gl.constexpr = 64
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_acc_layout(BM), k_width=2)
    LW: gl.constexpr = gl.SliceLayout(2, word_layout(RW, BK, 4))
    if KSTEP == 2 and STAGES % 2 == 1:
        # An odd ring gives a slot to the two warpgroups in turn, and one may run a whole lap ahead: while
        # block i - STAGES (the other warpgroup's) has not landed, a wait for block i's parity of ``ready``
        # would take block i - 2 STAGES's completed phase. So first wait until the other warpgroup has
        # released block i - STAGES (the producer's own wait; a fresh barrier passes it).
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
    # Block i's phase of its slot: the slot's earlier phases have completed (this warpgroup consumed the
    # slot's previous block, or waited above for the other's release of it), and it cannot complete a later
    # one first (the producer refills it only after block i is released).
    mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
    wd = _dequant(w_smem.index(slot).slice(ROW0, RW, dim=0).load(LW), sel, s2, RW, BK, IS_BF16)
    acc = _mma_block(wd, x_smem, slot, acc, a_layout, BK // SUB_K)
    # The wgmma has retired, and it could not start before all four warps had dequantized their words:
    # this warpgroup is done with the slot.
    mbarrier.arrive(empty.index(slot), count=1)
    return acc


@gluon.jit
def _consumer(x_smem, w_smem, ready, empty, red, red_bar, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, kb_lo,
              kb_hi, split_k, ticket_idx, n_tickets, stride_sn, stride_om, off_m, off_n, ROW0: gl.constexpr,
              KPAR: gl.constexpr, KSTEP: gl.constexpr, HAS_BIAS: gl.constexpr, IS_BF16: gl.constexpr,
              BM: gl.constexpr, BK: gl.constexpr, GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr,
              SPLIT: gl.constexpr):
    """One consumer warpgroup: weight rows ``ROW0 .. ROW0 + 63`` of the CTA's word box, the CTA's K blocks
    ``KPAR, KPAR + KSTEP, ...`` (KSTEP 1: all of them; 2: every other one, the two warpgroups' halves summed in the
    epilogue, this one's when ``KPAR`` is 0)."""
    RW: gl.constexpr = 64
    mma: gl.constexpr = _acc_layout(BM)
    L3: gl.constexpr = word_layout(RW, BK, 4)
    LROW: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
    LT: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, L3))

    rows = gl.minimum(off_n + ROW0 + gl.arange(0, RW, layout=LROW), N - 1)
    t = gl.arange(0, 4, layout=LT)
    sel = gl.expand_dims(gl.expand_dims(0x4400 + 0x1111 * t, 0), 0)
    s2 = _block_scales(s_ptr, rows, gl.minimum(kb_lo + KPAR, kb_hi - 1), stride_sn, BK, GROUP_SIZE)

    acc = gl.zeros([RW, BM], gl.float32, layout=mma)
    for i in range(KPAR, kb_hi - kb_lo, KSTEP):
        kb = kb_lo + i
        slot = i % STAGES
        s2_next = _next_scales(s2, s_ptr, rows, gl.minimum(kb + KSTEP, kb_hi - 1), stride_sn, BK, GROUP_SIZE)
        acc = _consume_block(x_smem, w_smem, ready, empty, acc, s2, sel, i, slot, ROW0, KSTEP, IS_BF16, BM, BK,
                             STAGES)
        s2 = s2_next

    n_idx = off_n + ROW0 + gl.arange(0, RW, layout=gl.SliceLayout(1, mma))
    m_idx = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    if KSTEP == 2 and KPAR == 1:
        # the odd K blocks' sum goes to shared memory for the other warpgroup: every warp's part is written
        # (this partition's barrier) before the one arrive
        red.store(acc)
        _cta_barrier()
        mbarrier.arrive(red_bar, count=1)
    else:
        if KSTEP == 2:
            mbarrier.wait(red_bar, 0)
            acc = acc + red.load(mma)     # even + odd blocks, always in this order: deterministic
        # split-K: a ticket per tile (KSTEP 2) or per warpgroup's half tile; the barrier in store_acc is this
        # partition's own
        store_acc(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, ticket_idx, n_tickets, n_idx, m_idx, M, N, stride_om,
                  split_k, HAS_BIAS, SPLIT)


@gluon.jit
def _producer_stream(x_desc, w_desc, x_smem, w_smem, ready, empty, M, N, lo, hi, KB, STAGES: gl.constexpr,
                     BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr):
    """Stream-K producer: the CTA's steps ``lo .. hi - 1`` (step w: tile ``w / KB``'s K block ``w % KB``), tile by
    tile, into the ring in that order (the CTA's i-th step into slot ``i % STAGES``)."""
    i = lo * 0
    for t in range(lo // KB, (hi - 1) // KB + 1):
        pid_m, pid_n = grouped_tile(t, M, N, BM, BN, GROUP_M)
        for kb in range(gl.maximum(lo, t * KB) - t * KB, gl.minimum(hi, t * KB + KB) - t * KB):
            mbarrier.wait(empty.index(i % STAGES), ((i // STAGES) & 1) ^ 1)
            _issue(x_desc, w_desc, x_smem, w_smem, ready, i, kb, pid_m * BM, pid_n * BN, True, STAGES, BK)
            i += 1


@gluon.jit
def _consumer_stream(x_smem, w_smem, ready, empty, red, red_bar, red_free, s_ptr, bias_ptr, out_ptr, ws_ptr,
                     cnt_ptr, M, N, lo, hi, KB, W, stride_sn, stride_om, ROW0: gl.constexpr, H: gl.constexpr,
                     NH: gl.constexpr, KPAR: gl.constexpr, KSTEP: gl.constexpr, HAS_BIAS: gl.constexpr,
                     IS_BF16: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                     GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """Stream-K consumer warpgroup: the tiles of the CTA's steps ``lo .. hi - 1`` one after another, each as
    :func:`_consumer` does one (its K blocks of the share, then the K halves' sum), then the tile's epilogue: a
    direct store where the share holds all its steps, else a part of the tile's sum (:func:`store_parts`): the tail
    of its first owner's share, then the heads of the next owners' shares, in step order (workspace tiles
    ``[2, G, NH]``, tails then heads; a ticket per tile and warpgroup that stores, ``H`` of ``NH``)."""
    RW: gl.constexpr = 64
    mma: gl.constexpr = _acc_layout(BM)
    L3: gl.constexpr = word_layout(RW, BK, 4)
    LROW: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
    LT: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, L3))
    t4 = gl.arange(0, 4, layout=LT)
    sel = gl.expand_dims(gl.expand_dims(0x4400 + 0x1111 * t4, 0), 0)
    c = gl.program_id(0)
    G = gl.num_programs(0)

    t_lo = lo // KB
    for t in range(t_lo, (hi - 1) // KB + 1):
        kb_lo = gl.maximum(lo, t * KB) - t * KB
        kb_hi = gl.minimum(hi, t * KB + KB) - t * KB
        i0 = t * KB + kb_lo - lo                        # the CTA's step (ring position) of the tile's first block
        pid_m, pid_n = grouped_tile(t, M, N, BM, BN, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        rows = gl.minimum(off_n + ROW0 + gl.arange(0, RW, layout=LROW), N - 1)
        first = kb_lo + ((KPAR - i0) & (KSTEP - 1))     # this warpgroup's first block: its step has parity KPAR
        s2 = _block_scales(s_ptr, rows, gl.minimum(first, kb_hi - 1), stride_sn, BK, GROUP_SIZE)
        acc = gl.zeros([RW, BM], gl.float32, layout=mma)
        for kb in range(first, kb_hi, KSTEP):
            i = i0 + kb - kb_lo
            slot = i % STAGES
            s2_next = _next_scales(s2, s_ptr, rows, gl.minimum(kb + KSTEP, kb_hi - 1), stride_sn, BK, GROUP_SIZE)
            acc = _consume_block(x_smem, w_smem, ready, empty, acc, s2, sel, i, slot, ROW0, KSTEP, IS_BF16, BM, BK,
                                 STAGES)
            s2 = s2_next

        n_idx = off_n + ROW0 + gl.arange(0, RW, layout=gl.SliceLayout(1, mma))
        m_idx = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
        if KSTEP == 2 and KPAR == 1:
            # the reduction buffer is reused per tile: first wait until the other warpgroup has read the previous
            # tile's (a fresh barrier passes the first wait)
            mbarrier.wait(red_free, ((t - t_lo) & 1) ^ 1)
            red.store(acc)
            _cta_barrier()
            mbarrier.arrive(red_bar, count=1)
        else:
            if KSTEP == 2:
                mbarrier.wait(red_bar, (t - t_lo) & 1)
                acc = acc + red.load(mma)     # even + odd steps, always in this order: deterministic
                _cta_barrier()                # all four warps have read the buffer before it is refilled
                mbarrier.arrive(red_free, count=1)
            cf, cl = stream_owners(t, KB, G, W)
            if cf == cl:
                _store_out(acc, out_ptr, bias_ptr, n_idx, m_idx, M, N, stride_om, HAS_BIAS)
            else:
                own, part0, rest = stream_parts(c, cf, G, NH, H)
                store_parts(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, t * NH + H, own, part0, rest, NH, cl - cf + 1,
                            n_idx, m_idx, M, N, stride_om, HAS_BIAS)


@gluon.jit
def _w4a16_prefill_wsp_kernel(
    x_desc, w_desc, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_sn, stride_om, split_k, kb_per_split,
    HAS_BIAS: gl.constexpr, IS_BF16: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
    GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    SPLIT: gl.constexpr, STREAM: gl.constexpr,
):
    SUB: gl.constexpr = BK // SUB_K
    KSPLIT: gl.constexpr = BN == 64   # both warpgroups on the same 64 rows, every other K block each
    KSTEP: gl.constexpr = 2 if KSPLIT else 1
    ROW1: gl.constexpr = 0 if KSPLIT else 64   # the worker consumer's first weight row
    if STREAM:
        # stream-K: the CTA's steps lo .. hi - 1 of all W (tile, K block) steps (step w: tile w / KB's block w % KB)
        KB = K // BK
        W = ((M + BM - 1) // BM) * ((N + BN - 1) // BN) * KB
        lo, hi = stream_span(gl.program_id(0), gl.num_programs(0), W)
    # the TMA ring: STAGES slots of activation boxes and word tiles, each with a ready and an empty barrier
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SUB, BM, SUB_K], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK // 8], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1 if KSPLIT else 2)
    if STREAM:
        if KSPLIT:
            # the odd steps' sum of a tile; red_bar: written (odd warpgroup), red_free: read (even warpgroup)
            red = gl.allocate_shared_memory(gl.float32, [64, BM], gl.SwizzledSharedLayout(2, 1, 8, order=[1, 0]))
            red_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            red_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(red_bar, count=1)
            mbarrier.init(red_free, count=1)
        else:
            red, red_bar, red_free = ready, ready, ready   # not used with 128 rows
        NH: gl.constexpr = 1 if KSPLIT else 2
        H1: gl.constexpr = 0 if KSPLIT else 1
        gl.warp_specialize([
            (_consumer_stream, (x_smem, w_smem, ready, empty, red, red_bar, red_free, s_ptr, bias_ptr, out_ptr,
                                ws_ptr, cnt_ptr, M, N, lo, hi, KB, W, stride_sn, stride_om, 0, 0, NH, 0, KSTEP,
                                HAS_BIAS, IS_BF16, BM, BN, BK, GROUP_SIZE, STAGES, GROUP_M)),
            (_consumer_stream, (x_smem, w_smem, ready, empty, red, red_bar, red_free, s_ptr, bias_ptr, out_ptr,
                                ws_ptr, cnt_ptr, M, N, lo, hi, KB, W, stride_sn, stride_om, ROW1, H1, NH, KSTEP - 1,
                                KSTEP, HAS_BIAS, IS_BF16, BM, BN, BK, GROUP_SIZE, STAGES, GROUP_M)),
            (_producer_stream, (x_desc, w_desc, x_smem, w_smem, ready, empty, M, N, lo, hi, KB, STAGES, BM, BN, BK,
                                GROUP_M)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        pid_m, pid_n = grouped_tile(gl.program_id(0), M, N, BM, BN, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        if KSPLIT:
            red_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(red_bar, count=1)
            # the odd blocks' fp32 sum, [64, BM]: swizzled so that the accumulator's row pairs do not share banks
            red = gl.allocate_shared_memory(gl.float32, [64, BM], gl.SwizzledSharedLayout(2, 1, 8, order=[1, 0]))
        else:
            red, red_bar = ready, ready   # not used with 128 rows
        kb_lo = gl.program_id(1) * kb_per_split
        kb_hi = gl.minimum(kb_lo + kb_per_split, K // BK)
        if KSPLIT:
            t0, t1, n_tickets = gl.program_id(0), gl.program_id(0), gl.num_programs(0)
        else:
            t0, t1, n_tickets = gl.program_id(0) * 2, gl.program_id(0) * 2 + 1, gl.num_programs(0) * 2

        gl.warp_specialize([
            (_consumer, (x_smem, w_smem, ready, empty, red, red_bar, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N,
                         kb_lo, kb_hi, split_k, t0, n_tickets, stride_sn, stride_om, off_m, off_n, 0, 0, KSTEP,
                         HAS_BIAS, IS_BF16, BM, BK, GROUP_SIZE, STAGES, SPLIT)),
            (_consumer, (x_smem, w_smem, ready, empty, red, red_bar, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N,
                         kb_lo, kb_hi, split_k, t1, n_tickets, stride_sn, stride_om, off_m, off_n, ROW1,
                         KSTEP - 1, KSTEP, HAS_BIAS, IS_BF16, BM, BK, GROUP_SIZE, STAGES, SPLIT)),
            (_producer, (x_desc, w_desc, x_smem, w_smem, ready, empty, off_m, off_n, kb_lo, kb_hi, STAGES, BK)),
        ], [4, 1], [CONSUMER_REGS, 24])


def stream_grid(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """CTAs of a stream-K launch: one per SM, at most one per step (0: the step count is too large for the kernel's
    int32 share arithmetic, run the tiled launch instead)."""
    steps = triton.cdiv(m, block_m) * triton.cdiv(n, block_n) * (k // block_k)
    grid = min(sms, steps)
    return grid if (grid + 1) * steps < 2**31 else 0


def w4a16_prefill_wsp(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, group_size: int, *, block_m: int = 128, block_n: int = 128,
                      block_k: int = 128, num_stages: int = 4, group_m: int = 8, split_k: int = 1,
                      stream_k: bool = False, consumer_regs: int = 232) -> torch.Tensor:
    """Launch the warp-specialised Gluon prefill kernel (sm_90: wgmma, TMA).

    * ``x`` ``[M, K]`` bf16/fp16, contiguous, 16-byte aligned; ``weight_packed`` ``[N, K/8]`` int32 contiguous,
      16-byte aligned; ``weight_scale`` ``[N, K/G]`` of x's dtype, G a multiple of ``block_k`` or G = K.
    * ``block_n`` weight rows per CTA: 128 (two consumer warpgroups of 64 rows) or 64 (both warpgroups on the
      same rows, every other K block each; ``64 * block_m * 4`` more bytes of shared memory), ``block_m``
      activation rows (wgmma's N, a multiple of 16 in 16..256), ``block_k`` 64 or 128; ``split_k`` > 1: serial
      split-K as in :func:`kernels.w4a16_prefill_tma.store_acc`, one ticket per warpgroup (per CTA with 64 rows).
    * ``stream_k``: one CTA per SM (:func:`stream_grid`), each an equal share of all (tile, K block) steps; a tile
      shared by several CTAs is summed by the last to finish, in step order (:func:`store_parts`). Not with
      ``split_k`` > 1. Where :func:`stream_grid` refuses (more than ~2^31 / SMs steps) the tiled launch runs.

    Returns ``[M, N]`` of x's dtype."""
    m, k = x.shape
    n = weight_packed.shape[0]
    check_launch("w4a16_prefill_wsp", k, group_size, block_m, block_n, block_k, split_k)
    if stream_k and split_k != 1:
        raise ValueError(f"w4a16_prefill_wsp: stream_k replaces split-K, got split_k={split_k}")
    x_desc, w_desc = descriptors(x, weight_packed, block_m, block_n, block_k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    nh = 1 if block_n == 64 else 2
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    grid = stream_grid(m, n, k, block_m, block_n, block_k, device_sms(index)) if stream_k else 0
    if grid:
        # tails and heads of the CTAs' shares, [2, grid, nh] tiles of 64 x block_m floats; a ticket per tile half
        ws = torch.empty(2 * grid * nh * 64 * block_m, dtype=torch.float32, device=x.device)
        cnt = grow_zeros(_COUNTERS, x.device, tiles * nh, 4096)
        launch, kb_per_split = (grid, 1), k // block_k
    else:
        split_k, kb_per_split, ws, cnt = split_workspace(x, k // block_k, split_k, tiles * nh, 64 * block_m)
        launch = (tiles, split_k)
    _w4a16_prefill_wsp_kernel[launch](
        x_desc, w_desc, weight_scale, bias if bias is not None else weight_scale, out, ws, cnt,
        m, n, k, weight_scale.stride(0), out.stride(0), split_k, kb_per_split,
        HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16, BM=block_m, BN=block_n, BK=block_k,
        GROUP_SIZE=0 if group_size >= k else group_size, STAGES=num_stages, GROUP_M=group_m,
        CONSUMER_REGS=consumer_regs, SPLIT=split_k > 1, STREAM=bool(grid), num_warps=4,
    )
    return out
