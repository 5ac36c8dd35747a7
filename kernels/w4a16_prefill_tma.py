"""Prefill-shaped W4A16 GEMM in Gluon: a TMA ring, weights dequantized straight into wgmma's register A operand.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)``, W' = RN((u - 8) * s) read straight from the compressed-tensors
layout (``weight_packed[N, K/8]`` int32, ``weight_scale[N, K/G]``; see :mod:`kernels.w4a16_mainloop`).

The hardware reason for this kernel
-----------------------------------
The Triton-language tiled kernel (:mod:`kernels.w4a16_prefill`) reaches ~320-440 TFLOP/s at M = 256 on the H200:
its activations (or dequantized weights) go global -> shared memory -> registers -> shared memory again, with
four CTA barriers per K block. Gluon (Triton's lower-level language) gives the pieces Machete is built from:

* **TMA ring.** The activation boxes ``x[BM, 64]`` and the word tile ``w[BN, BK/8]`` of the next ``STAGES - 1``
  K blocks are in flight as TMA copies (one mbarrier per slot): no address registers, no per-thread ``cp.async``.
* **Weights as the A operand, in registers.** wgmma computes ``acc^T[BN, BM] += W'[BN, BK] @ x^T[BK, BM]``. A may
  come from registers, so the dequantized weights never touch shared memory, and B (the activations) is read by
  the tensor cores straight from the TMA box (natural K order, 128-byte swizzle): no K relabelling, no re-store.
* **Each thread dequantizes only its own fragment.** wgmma's A fragment gives lane ``l`` the k pairs
  ``(2t, 2t+1)`` (t = l % 4) of every 8-wide k step, i.e. byte ``t`` of every int32 word of its two rows. The word
  tile is read from shared memory with the four lanes of a quad sharing each word (a broadcast read), and one
  ``prmt`` picks byte ``t``: 5 instructions per (k, k+1) pair (``shr``, ``prmt``, ``lop3`` to bf16 ``128 + u``,
  ``sub`` 136, ``mul`` by (s, s)), 2.5 per weight. The result's register layout is the fragment's own, checked at
  compile time by ``convert_layout(..., assert_trivial=True)`` (:func:`word_layout`).
* **A full wait after each K block's wgmma.** ptxas does not keep a register A operand alive for an
  asynchronous wgmma: it allocates the next block's dequantization into the registers the running wgmma still
  reads. The wait's ``deps`` reach ptxas only as a PTX comment, and a later use of the operand after the wait
  (compiled only) either made ptxas serialize every wgmma (C7514) or made it keep a copy elsewhere while still
  reusing the wgmma's registers. Measured twice on the H200: the first version of this kernel, and a re-run that
  refilled a ring slot only after its wgmma had retired (710 of 968 overlapped outputs differed from the serial
  ones, on every tiling; ``bench/results/h200-2026-12-01b``, with the SASS). That overlapped version, wrong
  results included, was only 1.05x the serial one (geomean of the best tilings over 20 shape/M rows). So each CTA
  is serial in itself, and dequantization can overlap the tensor cores only across CTAs: with 4 warps and
  60-147 KB of ring, 1-3 share an SM. A version that staged the dequantized tile in shared memory to keep one
  wgmma in flight was slower on every shape that it did not lose to dequantize + cuBLAS anyway
  (``bench/results/h200-2026-12-01/dev``). Within a CTA they overlap in :mod:`kernels.w4a16_prefill_wsp`: two
  consumer warpgroups, each serial, that drift apart (faster where its grid fills the GPU).

One CTA barrier per K block (Gluon adds three more around the TMA issue) orders every warp's reads of a ring slot
before the TMA that refills it.

Determinism: fixed K order: the bits depend only on the K order of the k16 MMA chain per output, and with the
optional serial split-K (for grids that leave SMs idle) on the split count too: the partials are summed in split
order, whichever split finishes last.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .counters import grow_zeros, pool
from .w4a16_prefill import grouped_tile

BOX_K = 64   # activation columns per TMA box: one 128-byte swizzled row of bf16 (the widest swizzle TMA has)
SUB_K = gl.constexpr(BOX_K)
# Triton >= 3.7 renamed tma.async_copy_global_to_shared to tma.async_load (the GPU image has 3.6, CI 3.9)
# and gl.thread_barrier to gl.barrier.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

_PTX_SRC = {
    # word $2, byte selector $3 (0x4400 + 0x1111 t), scale pair $4 -> codes (2t, 2t+1) as RN((u - 8) * s)
    True: "{\n.reg .b32 v, p, c;\nmov.b32 c, 0x43084308;\nshr.u32 v, $2, 4;\nprmt.b32 p, $2, v, $3;\n"
          "lop3.b32 p, p, 0x000F000F, 0x43004300, 0xEA;\nsub.rn.bf16x2 p, p, c;\n"
          "mul.rn.bf16x2 p, p, $4;\nmov.b32 {$0, $1}, p;\n}",
    False: "{\n.reg .b32 v, p, c;\nmov.b32 c, 0x64086408;\nshr.u32 v, $2, 4;\nprmt.b32 p, $2, v, $3;\n"
           "lop3.b32 p, p, 0x000F000F, 0x64006400, 0xEA;\nsub.rn.f16x2 p, p, c;\n"
           "mul.rn.f16x2 p, p, $4;\nmov.b32 {$0, $1}, p;\n}",
}
_PTX_BF16 = gl.constexpr(_PTX_SRC[True])
_PTX_FP16 = gl.constexpr(_PTX_SRC[False])


@triton.constexpr_function
def _log2(v):
    return v.bit_length() - 1


@triton.constexpr_function
def word_layout(BN, BK, num_warps):
    """Layout of the ``[BN, BK/8, 4]`` (row n, word j, byte t) tensor whose element is code pair (8j + 2t, +1):
    exactly wgmma's A fragment for ``[BN, BK]`` once the pair is joined (k = 8j + 2t + h). Lanes: t (2 bits), then
    rows 0..7; registers: row + 8, then the words; warps: 16-row slabs."""
    reg = [[8, 0, 0]] + [[0, 1 << i, 0] for i in range(_log2(BK // 8))]
    lane = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << i, 0, 0] for i in range(_log2(num_warps))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [BN, BK // 8, 4])


@gluon.jit
def _issue(x_desc, w_desc, x_smem, w_smem, bars, i, kb, off_m, off_n, pred, STAGES: gl.constexpr,
           BK: gl.constexpr):
    """TMA copies of K block ``kb`` (BK/64 activation boxes of 64 columns, one word box), this CTA's ``i``-th, into
    ring slot ``i % STAGES``; the slot's mbarrier completes when all their bytes have landed."""
    SUB: gl.constexpr = BK // SUB_K
    slot = i % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, SUB * x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
    for h in gl.static_range(SUB):
        _tma_load(x_desc, [off_m, kb * BK + h * SUB_K], bar, x_smem.index(slot * SUB + h), pred=pred)
    _tma_load(w_desc, [off_n, kb * (BK // 8)], bar, w_smem.index(slot), pred=pred)


@gluon.jit
def _scale_pairs(s_ptr, rows, col, stride_sn):
    """(s, s) packed in one int32 per row: the ``mul.bf16x2`` / ``mul.f16x2`` operand."""
    s = gl.load(s_ptr + rows * stride_sn + col)
    s16 = s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return s16 | (s16 << 16)


@gluon.jit
def _dequant(w, sel, s2, BN: gl.constexpr, BK: gl.constexpr, IS_BF16: gl.constexpr):
    """Words ``[BN, BK/8]`` (layout ``SliceLayout(2, word_layout)``) -> ``[BN, BK]`` W' in the layout that
    :func:`word_layout` gives after the join: each thread computes only its own fragment pairs."""
    args = [gl.expand_dims(w, 2), sel, gl.expand_dims(gl.expand_dims(s2, 1), 2)]
    if IS_BF16:
        lo, hi = gl.inline_asm_elementwise(_PTX_BF16, "=h,=h,r,r,r", args, dtype=(gl.bfloat16, gl.bfloat16),
                                           is_pure=True, pack=1)
    else:
        lo, hi = gl.inline_asm_elementwise(_PTX_FP16, "=h,=h,r,r,r", args, dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=1)
    return gl.reshape(gl.join(lo, hi), [BN, BK])


@gluon.jit
def _block_scales(s_ptr, rows, kb, stride_sn, BK: gl.constexpr, GROUP_SIZE: gl.constexpr):
    """Scale pairs of K block ``kb`` for ``rows`` (GROUP_SIZE 0: channelwise, one column)."""
    if GROUP_SIZE == 0:
        return _scale_pairs(s_ptr, rows, 0, stride_sn)
    else:
        return _scale_pairs(s_ptr, rows, (kb * BK) // GROUP_SIZE, stride_sn)


@gluon.jit
def _next_scales(s2, s_ptr, rows, kb, stride_sn, BK: gl.constexpr, GROUP_SIZE: gl.constexpr):
    """:func:`_block_scales` of block ``kb``, loaded one iteration ahead (2-byte loads: too narrow for TMA); the
    channelwise ones are loaded once, so ``s2`` is kept."""
    if GROUP_SIZE == 0:
        return s2
    else:
        return _block_scales(s_ptr, rows, kb, stride_sn, BK, GROUP_SIZE)


@gluon.jit
def _mma_block(wd, x_smem, slot, acc, a_layout: gl.constexpr, SUB: gl.constexpr):
    """``acc += wd @ x^T`` for one K block (``wd`` ``[RW, 64 * SUB]`` dequantized weights, ``x_smem`` slot
    ``slot``'s SUB activation boxes), then wait for it before anything else runs: ptxas does not keep a register A
    operand alive for an asynchronous wgmma (measured: with one wgmma left in flight, the next block's
    dequantization overwrote it and the results were wrong)."""
    RW: gl.constexpr = wd.shape[0]
    if SUB == 1:
        a = gl.convert_layout(wd, a_layout, assert_trivial=True)
        acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
    else:
        # k bit 6 is a register bit of the word layout: splitting the two 64-wide halves moves no data
        a0, a1 = gl.split(gl.permute(gl.reshape(wd, [RW, 2, SUB_K]), (0, 2, 1)))
        a0 = gl.convert_layout(a0, a_layout, assert_trivial=True)
        a1 = gl.convert_layout(a1, a_layout, assert_trivial=True)
        acc = warpgroup_mma(a0, x_smem.index(slot * 2).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a1, x_smem.index(slot * 2 + 1).permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))


@gluon.jit
def _w4a16_prefill_tma_kernel(
    x_desc, w_desc, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_sn, stride_om, split_k, kb_per_split,
    HAS_BIAS: gl.constexpr, IS_BF16: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
    GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, SPLIT: gl.constexpr,
):
    NW: gl.constexpr = gl.num_warps()
    SUB: gl.constexpr = BK // SUB_K
    pid_m, pid_n = grouped_tile(gl.program_id(0), M, N, BM, BN, GROUP_M)   # the Triton kernel's tile order
    off_m = pid_m * BM
    off_n = pid_n * BN

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    L3: gl.constexpr = word_layout(BN, BK, NW)
    LW: gl.constexpr = gl.SliceLayout(2, L3)                     # words [BN, BK/8], shared by a quad's 4 lanes
    LROW: gl.constexpr = gl.SliceLayout(1, LW)                   # [BN] rows (scales)
    LT: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, L3))  # [4] byte index t

    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SUB, BM, SUB_K], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK // 8], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    # this CTA's K blocks: all of them, or split program_id(1)'s share
    kb_lo = gl.program_id(1) * kb_per_split
    kb_hi = gl.minimum(kb_lo + kb_per_split, K // BK)
    num_k = kb_hi - kb_lo
    for i in gl.static_range(STAGES - 1):
        _issue(x_desc, w_desc, x_smem, w_smem, bars, i, kb_lo + i, off_m, off_n, i < num_k, STAGES, BK)

    rows = gl.minimum(off_n + gl.arange(0, BN, layout=LROW), N - 1)
    t = gl.arange(0, 4, layout=LT)
    sel = gl.expand_dims(gl.expand_dims(0x4400 + 0x1111 * t, 0), 0)          # [1, 1, 4] prmt selectors
    s2 = _block_scales(s_ptr, rows, kb_lo, stride_sn, BK, GROUP_SIZE)

    acc = gl.zeros([BN, BM], gl.float32, layout=mma)
    for i in range(num_k):
        kb = kb_lo + i
        slot = i % STAGES
        s2_next = _next_scales(s2, s_ptr, rows, gl.minimum(kb + 1, kb_hi - 1), stride_sn, BK, GROUP_SIZE)
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        wd = _dequant(w_smem.index(slot).load(LW), sel, s2, BN, BK, IS_BF16)
        # Every warp is past block kb-1 (its words read, its wgmma retired below): refill that slot.
        _cta_barrier()
        nxt = i + STAGES - 1
        _issue(x_desc, w_desc, x_smem, w_smem, bars, nxt, kb_lo + nxt, off_m, off_n, nxt < num_k, STAGES, BK)
        # Waited for inside: dequantization and MMA overlap only across the CTAs on an SM (1-3 fit: 60-147 KB of
        # ring each).
        acc = _mma_block(wd, x_smem, slot, acc, a_layout, SUB)
        s2 = s2_next
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    # acc^T[BN, BM] -> out[M, N]
    n_idx = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    m_idx = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    store_acc(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, gl.program_id(0), gl.num_programs(0), n_idx, m_idx, M, N,
              stride_om, split_k, HAS_BIAS, SPLIT)


@gluon.jit
def store_acc(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, ticket_idx, n_tickets, n_idx, m_idx, M, N, stride_om,
              split_k, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr):
    """Store ``acc^T[n, m]`` (fp32 ``[RN, BM]``, rows ``n_idx``, columns ``m_idx``) to ``out[m, n]`` (+ bias),
    rounding once.

    With ``SPLIT`` (serial split-K, as in :mod:`kernels.w4a16_decode`): every split stores its fp32 partial tile to
    ``ws[split, ticket, RN, BM]`` and takes a ticket from ``cnt[ticket_idx]`` (acq_rel, GPU scope, after a barrier
    of the calling warps); the one that draws the last sums all partials **in split order**, so the bits do not
    depend on which split finished last, and resets the counter to 0. The workspace holds whole tiles in the
    accumulator's own order, so its addresses are the thread's base plus constants (no masks, few registers)."""
    RN: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    if SPLIT:
        local = (gl.expand_dims(gl.arange(0, RN, layout=n_idx.type.layout), 1) * BM
                 + gl.expand_dims(gl.arange(0, BM, layout=m_idx.type.layout), 0))
        tile = ws_ptr + ticket_idx * (RN * BM)
        split_stride = n_tickets * (RN * BM)
        gl.store(tile + gl.program_id(1) * split_stride + local, acc)
        _cta_barrier()   # every calling warp's partial is issued before the ticket (the release is cumulative)
        ticket = gl.atomic_add(cnt_ptr + ticket_idx, 1, sem="acq_rel", scope="gpu")
        if ticket == split_k - 1:
            acc = gl.load(tile + local, cache_modifier=".cg")
            for s in range(1, split_k):
                acc += gl.load(tile + s * split_stride + local, cache_modifier=".cg")
            _store_out(acc, out_ptr, bias_ptr, n_idx, m_idx, M, N, stride_om, HAS_BIAS)
            gl.atomic_xchg(cnt_ptr + ticket_idx, 0, sem="relaxed", scope="gpu")
    else:
        _store_out(acc, out_ptr, bias_ptr, n_idx, m_idx, M, N, stride_om, HAS_BIAS)


@gluon.jit
def store_parts(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, ticket_idx, own, first, rest, rest_stride, n_parts,
                n_idx, m_idx, M, N, stride_om, HAS_BIAS: gl.constexpr):
    """One of ``n_parts`` fp32 partial tiles of one output tile (``prefill_wsp``'s stream-K; :func:`store_acc`
    is the same protocol for split-K, with the split's parts at a fixed stride): store it to workspace tile
    ``own`` (workspace tiles are ``RN x BM`` floats each), take a ticket from ``cnt[ticket_idx]`` (acq_rel, GPU
    scope, after a barrier of the calling warps); the caller that draws the last sums the parts in a fixed order,
    tile ``first`` then tiles ``rest + s * rest_stride`` for s = 0 .. n_parts - 2, stores the result like
    :func:`store_acc` and resets the counter to 0. The workspace holds whole tiles in the accumulator's own order,
    so its addresses are the thread's base plus constants (no masks, few registers)."""
    RN: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    local = (gl.expand_dims(gl.arange(0, RN, layout=n_idx.type.layout), 1) * BM
             + gl.expand_dims(gl.arange(0, BM, layout=m_idx.type.layout), 0))
    gl.store(ws_ptr + own * (RN * BM) + local, acc)
    _cta_barrier()   # every calling warp's partial is issued before the ticket (the release is cumulative)
    ticket = gl.atomic_add(cnt_ptr + ticket_idx, 1, sem="acq_rel", scope="gpu")
    if ticket == n_parts - 1:
        acc = gl.load(ws_ptr + first * (RN * BM) + local, cache_modifier=".cg")
        for s in range(0, n_parts - 1):
            acc += gl.load(ws_ptr + (rest + s * rest_stride) * (RN * BM) + local, cache_modifier=".cg")
        _store_out(acc, out_ptr, bias_ptr, n_idx, m_idx, M, N, stride_om, HAS_BIAS)
        gl.atomic_xchg(cnt_ptr + ticket_idx, 0, sem="relaxed", scope="gpu")


@gluon.jit
def _store_out(acc, out_ptr, bias_ptr, n_idx, m_idx, M, N, stride_om, HAS_BIAS: gl.constexpr):
    if HAS_BIAS:
        acc += gl.expand_dims(gl.load(bias_ptr + n_idx, mask=n_idx < N, other=0.0).to(gl.float32), 1)
    mask = gl.expand_dims(n_idx < N, 1) & gl.expand_dims(m_idx < M, 0)
    ptrs = out_ptr + gl.expand_dims(m_idx.to(gl.int64), 0) * stride_om + gl.expand_dims(n_idx, 1)
    gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def check_launch(kernel: str, k: int, group_size: int, block_m: int, block_n: int, block_k: int, split_k: int):
    """Refuse, before anything is launched, a tiling the Gluon prefill kernels cannot run (``kernel`` names the
    launcher in the message)."""
    if block_k not in (64, 128) or k % block_k or not (group_size >= k or group_size % block_k == 0):
        raise ValueError(f"{kernel}: block_k must be 64 or 128 and divide K={k} and the group size {group_size} "
                         f"(or the group be channelwise), got block_k={block_k}")
    if block_n not in (64, 128) or block_m % 16 or not 16 <= block_m <= 256 or split_k < 1:
        raise ValueError(f"{kernel}: block_n must be 64 or 128, block_m a multiple of 16 in 16..256 and split_k >= 1, "
                         f"got {block_n}, {block_m}, {split_k}")


def descriptors(x: torch.Tensor, weight_packed: torch.Tensor, block_m: int, block_n: int, block_k: int):
    """TMA descriptors of the activations ``[M, K]`` (box ``[block_m, 64]``, 128-byte swizzle) and the words
    ``[N, K/8]`` (box ``[block_n, block_k / 8]``)."""
    xl = gl.NVMMASharedLayout.get_default_for([block_m, BOX_K], gl.bfloat16 if x.dtype == torch.bfloat16
                                              else gl.float16)
    wl = gl.NVMMASharedLayout.get_default_for([block_n, block_k // 8], gl.int32)
    return (TensorDescriptor.from_tensor(x, [block_m, BOX_K], xl),
            TensorDescriptor.from_tensor(weight_packed, [block_n, block_k // 8], wl))


def w4a16_prefill_tma(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, group_size: int, *, block_m: int = 128, block_n: int = 64,
                     block_k: int = 128, num_stages: int = 4, group_m: int = 8, split_k: int = 1) -> torch.Tensor:
    """Launch the Gluon prefill kernel (sm_90: wgmma, TMA).

    * ``x`` ``[M, K]`` bf16/fp16, contiguous, 16-byte aligned; ``weight_packed`` ``[N, K/8]`` int32 contiguous,
      16-byte aligned; ``weight_scale`` ``[N, K/G]`` of x's dtype, G a multiple of ``block_k`` or G = K.
    * ``block_m`` (activation rows, wgmma's N) a multiple of 16 in 16..256; ``block_n`` (weight rows) 64 or 128:
      one warp per 16 rows; ``block_k`` 64 or 128 (one or two 64-wide activation boxes per stage).
    * ``split_k`` > 1: serial split-K, each split a contiguous run of K blocks (:func:`store_acc`); clamped so
      that no split is empty (1 if the workspace would pass 2^31 floats).

    Returns ``[M, N]`` of x's dtype."""
    m, k = x.shape
    n = weight_packed.shape[0]
    check_launch("w4a16_prefill_tma", k, group_size, block_m, block_n, block_k, split_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    x_desc, w_desc = descriptors(x, weight_packed, block_m, block_n, block_k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k, kb_per_split, ws, cnt = split_workspace(x, k // block_k, split_k, tiles, block_n * block_m)
    _w4a16_prefill_tma_kernel[(tiles, split_k)](
        x_desc, w_desc, weight_scale, bias if bias is not None else weight_scale, out, ws, cnt,
        m, n, k, weight_scale.stride(0), out.stride(0), split_k, kb_per_split,
        HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16, BM=block_m, BN=block_n, BK=block_k,
        GROUP_SIZE=0 if group_size >= k else group_size, STAGES=num_stages, GROUP_M=group_m, SPLIT=split_k > 1,
        num_warps=block_n // 16,
    )
    return out


# The split-K tickets: device -> every counter buffer handed out there (kernels.counters.grow_zeros).
_COUNTERS: dict[torch.device, list[torch.Tensor]] = pool("prefill")


def split_workspace(x: torch.Tensor, kb_total: int, split_k: int, tickets: int, tile_elems: int):
    """``(split_k, kb_per_split, ws, cnt)`` of a serial split-K launch (:func:`store_acc`): ``split_k`` clamped so
    that no split is empty, the fp32 partial tiles ``ws[split_k, tickets, tile_elems]`` (a typed stand-in when there
    is no split) and a zeroed ticket counter per tile (shared by every launch on the device: one stream, as HF and
    vLLM run)."""
    if split_k * tickets * tile_elems >= 2**31:   # int32 workspace offsets; split-K is for small grids anyway
        split_k = 1
    kb_per_split = triton.cdiv(kb_total, max(1, min(split_k, kb_total)))
    split_k = triton.cdiv(kb_total, kb_per_split)
    cnt = grow_zeros(_COUNTERS, x.device, tickets, 4096)
    ws = (torch.empty(split_k * tickets * tile_elems, dtype=torch.float32, device=x.device) if split_k > 1
          else cnt.view(torch.float32))   # not touched without a split (a typed pointer for the compiled-out branch)
    return split_k, kb_per_split, ws, cnt
