"""Batch-1..16 W4A16 GEMV in Gluon: the full-MMA GEMV's arithmetic, its words fed from a TMA ring in shared memory.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)``, the operand contract of :mod:`kernels.w4a16_gemv` (a program owns
``BLOCK_N`` whole weight rows over all of K, ``BLOCK_M`` = 8 or 16 activation rows).

The hardware reason
-------------------
The register GEMVs (:mod:`kernels.w4a16_gemv_mma`, :mod:`kernels.w4a16_gemv_mma8`) load each K block's words
straight into registers one block ahead, so the bytes a warp has in flight are bounded by the registers it can
spare: gate_up at M = 1 moves 2.16 TB/s where a plain read of the same matrix reaches 3.47 TB/s (twentieth
session's read probe), and loading more blocks ahead cost more registers than it gained (twenty-second session).
Here the words travel by TMA into a ring of ``STAGES`` shared-memory slots: ``STAGES`` K blocks of every program
are in flight without a register or an address computation, and a thread's registers hold only the block it
computes. The price is a CTA barrier per K block (every warp has read the slot before it is refilled; Gluon's TMA
issue adds more, with a proxy fence and a CTA memory barrier: 5 ``BAR.SYNC`` per K block in the SASS) and the
shared-memory reads.

The arithmetic is :mod:`kernels.w4a16_gemv_mma8`'s: the eight quads of a warp hold the same words of eight
different weight rows, so every column of ``mma.sync.m16n8k16`` is an activation row. Lane ``4g + t`` holds words
``4t..4t+3`` of a 16-word (128-wide) K chunk of row ``g`` of the first half of the program's rows (R1, the MMA's
row g) and of the second half (R2, row g + 8); it dequantizes them (17 instructions per word) and passes, for each
word, two codes pairs of R1 and R2 as A and the word's 8 activations of activation row ``m0 + g`` as B, two MMAs per
word (codes 0-3, then 4-7). The four words of a lane's 16-byte vector chain into one accumulator set. ``D[g, c]``
is then R1's partial dot product with activation row ``m0 + c`` over the chunk. Activation rows past M are not
loaded (zeros), so M = 1 costs no activation traffic for the seven idle columns.

The layout is given explicitly (Gluon): :func:`half_layout` for the ``[BLOCK_N/2, BLOCK_K/8]`` word tile of a row
half, :func:`vec_layout` for the ``[BLOCK_N/2, BLOCK_K/128, 4]`` (row, chunk, vector) tensors left after the four
words of every vector are split off in registers. Warps take the K chunks first, then groups of 8 rows; after the
K loop the chunks are summed (across warps through shared memory: a fixed ``gl.sum`` tree).

Measured (H200, 2026-12-01, ``bench/results/h200-2026-12-01m/``, ``bench/gpu/gemv_tma_sweep.py``): correct, but
0.63-1.09x the tuned table's kernels (geomean 0.88x over six E4B shapes x M = 1..16), and a deeper ring made it
slower, not faster. It is therefore **not in the dispatcher**: an experiment kept with its sweep and tests.

Precision: as the other tensor-core GEMVs (16-bit products exact, fp32 sums; only the order differs). Needs sm_90
(TMA, and the bf16x2 dequant).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the PTX strings of the register GEMV (constexprs, which Gluon shares with Triton's language)
from .w4a16_gemv_mma import _PTX_MMA_BF16, _PTX_MMA_FP16, _PTX_PAIRS_BF16, _PTX_PAIRS_FP16

# Triton >= 3.7 renamed tma.async_copy_global_to_shared to tma.async_load and gl.thread_barrier to gl.barrier.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# 16 bytes of activations at $4 where $5 (the activation row) < $6 (M), zeros otherwise: no traffic for idle columns
_PTX_LOAD4_IF = gl.constexpr("{\n.reg .pred p;\nsetp.lt.s32 p, $5, $6;\nmov.b32 $0, 0;\nmov.b32 $1, 0;\n"
                             "mov.b32 $2, 0;\nmov.b32 $3, 0;\n@p ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];\n}")


@triton.constexpr_function
def _log2(v):
    return v.bit_length() - 1


@triton.constexpr_function
def _split_bits(half: int, kc: int, num_warps: int):
    """Which of the (chunk, row-group) index bits go to warps and which stay in registers: warps take chunk bits
    first, then row-group bits (``[("c" | "r", bit), ...]`` for each)."""
    bits = [("c", i) for i in range(_log2(kc))] + [("r", i) for i in range(_log2(half // 8))]
    nw = _log2(num_warps)
    if nw > len(bits):
        raise ValueError(f"gemv_tma: {num_warps} warps need (block_n/16) * (block_k/128) >= {num_warps}")
    return bits[:nw], bits[nw:]


@triton.constexpr_function
def half_layout(HALF, KC, NW):
    """Layout of a row half's ``[HALF, 16 * KC]`` word tile: registers hold a lane's 4-word vector (word bits 0-1),
    lanes t (word bits 2-3) and g (row bits 0-2), then warps and registers the chunks and row groups."""
    warp_bits, reg_bits = _split_bits(HALF, KC, NW)

    def base(b):
        return [0, 16 << b[1]] if b[0] == "c" else [8 << b[1], 0]
    reg = [[0, 1], [0, 2]] + [base(b) for b in reg_bits]
    lane = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout(reg, lane, [base(b) for b in warp_bits], [], [HALF, 16 * KC])


@triton.constexpr_function
def vec_layout(HALF, KC, NW):
    """Layout of the ``[HALF, KC, 4]`` (row, chunk, vector t) tensors: :func:`half_layout` without the two word
    bits of a vector."""
    warp_bits, reg_bits = _split_bits(HALF, KC, NW)

    def base(b):
        return [0, 1 << b[1], 0] if b[0] == "c" else [8 << b[1], 0, 0]
    lane = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    return gl.DistributedLinearLayout([base(b) for b in reg_bits], lane, [base(b) for b in warp_bits], [],
                                      [HALF, KC, 4])


@gluon.jit
def _words4(w, L4: gl.constexpr):
    """``[HALF, 16 * KC]`` words (:func:`half_layout`) -> the four words of every vector, each ``[HALF, KC, 4]``
    (:func:`vec_layout`): register renaming only."""
    HALF: gl.constexpr = w.shape[0]
    KC: gl.constexpr = w.shape[1] // 16
    even, odd = gl.split(gl.reshape(w, [HALF, KC, 4, 2, 2]))   # word bit 0: words (0, 2) and (1, 3)
    w0, w2 = gl.split(even)
    w1, w3 = gl.split(odd)
    return (gl.convert_layout(w0, L4, assert_trivial=True), gl.convert_layout(w1, L4, assert_trivial=True),
            gl.convert_layout(w2, L4, assert_trivial=True), gl.convert_layout(w3, L4, assert_trivial=True))


@gluon.jit
def _pairs(w, s2, IS_BF16: gl.constexpr):
    """Word + (s, s) pair -> four packed pairs, codes (0,1), (2,3), (4,5), (6,7), each RN((u - 8) * s)."""
    return gl.inline_asm_elementwise(_PTX_PAIRS_BF16 if IS_BF16 else _PTX_PAIRS_FP16, "=r,=r,=r,=r,r,r", [w, s2],
                                     dtype=(gl.int32, ) * 4, is_pure=True, pack=1)


@gluon.jit
def _mma(c0, c1, c2, c3, a0, a1, a2, a3, b0, b1, IS_BF16: gl.constexpr):
    # (is_pure=False: never merge or drop a warp-collective instruction)
    return gl.inline_asm_elementwise(_PTX_MMA_BF16 if IS_BF16 else _PTX_MMA_FP16, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                                     [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(gl.float32, ) * 4,
                                     is_pure=False, pack=1)


@gluon.jit
def _col_mma(acc, x_ptr, xo, mrow, M, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3, IS_BF16: gl.constexpr):
    """Two MMAs of one word (rows R1 ``pa*``, R2 ``pb*``) against activation row ``mrow`` at int32 offsets ``xo``."""
    c0, c1, c2, c3 = acc
    x0, x1, x2, x3 = gl.inline_asm_elementwise(_PTX_LOAD4_IF, "=r,=r,=r,=r,l,r,r",
                                               [(x_ptr + xo).to(gl.int64, bitcast=True), mrow, M],
                                               dtype=(gl.int32, ) * 4, is_pure=True, pack=1)
    c0, c1, c2, c3 = _mma(c0, c1, c2, c3, pa0, pb0, pa1, pb1, x0, x1, IS_BF16)
    c0, c1, c2, c3 = _mma(c0, c1, c2, c3, pa2, pb2, pa3, pb3, x2, x3, IS_BF16)
    return c0, c1, c2, c3


@gluon.jit
def _word(acc_a, acc_b, x_ptr, xa, xb, ma, mb, M, wl, wh, sl, sh, BM: gl.constexpr, IS_BF16: gl.constexpr):
    pa0, pa1, pa2, pa3 = _pairs(wl, sl, IS_BF16)
    pb0, pb1, pb2, pb3 = _pairs(wh, sh, IS_BF16)
    acc_a = _col_mma(acc_a, x_ptr, xa, ma, M, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3, IS_BF16)
    if BM > 8:
        acc_b = _col_mma(acc_b, x_ptr, xb, mb, M, pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3, IS_BF16)
    return acc_a, acc_b


@gluon.jit
def _scales(s_ptr, srow, col0, kb, BK: gl.constexpr, GROUP_SIZE: gl.constexpr):
    """(s, s) pairs of every vector of K block ``kb``: ``srow`` [HALF, 1, 1] scale row offsets, ``col0``
    [1, KC, 4] the vector's K offset in the block."""
    if GROUP_SIZE == 0:
        s = gl.load(s_ptr + srow + col0 * 0)
    else:
        s = gl.load(s_ptr + srow + (kb * BK + col0) // GROUP_SIZE)
    s16 = s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return s16 | (s16 << 16)


@gluon.jit
def _issue(w_desc, w_smem, bars, i, kb, off_n, pred, STAGES: gl.constexpr, BK: gl.constexpr, HALF: gl.constexpr):
    """TMA copies of K block ``kb``'s two row halves (this CTA's ``i``-th block) into ring slot ``i % STAGES``."""
    slot = i % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, 2 * w_desc.block_type.nbytes, pred=pred)
    _tma_load(w_desc, [off_n, kb * (BK // 8)], bar, w_smem.index(2 * slot), pred=pred)
    _tma_load(w_desc, [off_n + HALF, kb * (BK // 8)], bar, w_smem.index(2 * slot + 1), pred=pred)


@gluon.jit
def _store_col(c, bias, out_ptr, rows, m, M, N, stride_om, HAS_BIAS: gl.constexpr):
    """``c`` [HALF, KC, 4] partial sums -> ``out[m[t], rows]`` (m [1, 4], rows [HALF, 1])."""
    y = gl.sum(c, axis=1)
    if HAS_BIAS:
        y += bias
    gl.store(out_ptr + m.to(gl.int64) * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=(m < M) & (rows < N))


@gluon.jit(do_not_specialize=["M", "N", "stride_sn"])
def _w4a16_gemv_tma_kernel(
    w_desc, x_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_sn, stride_om,
    HAS_BIAS: gl.constexpr, IS_BF16: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
    GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr,
):
    NW: gl.constexpr = gl.num_warps()
    HALF: gl.constexpr = BN // 2
    KC: gl.constexpr = BK // 128
    LH: gl.constexpr = half_layout(HALF, KC, NW)
    L4: gl.constexpr = vec_layout(HALF, KC, NW)
    LR: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L4))   # [HALF]
    LC: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, L4))   # [KC]
    LT: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L4))   # [4]
    off_n = gl.program_id(0) * BN
    m0 = gl.program_id(1) * BM

    w_smem = gl.allocate_shared_memory(gl.int32, [2 * STAGES, HALF, BK // 8], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    num_k = K // BK
    for i in gl.static_range(STAGES):
        _issue(w_desc, w_smem, bars, i, i, off_n, i < num_k, STAGES, BK, HALF)

    r = gl.arange(0, HALF, layout=LR)
    ch = gl.arange(0, KC, layout=LC)
    t = gl.arange(0, 4, layout=LT)
    r3 = gl.expand_dims(gl.expand_dims(r, 1), 2)                        # [HALF, 1, 1]
    col0 = gl.expand_dims(gl.expand_dims(ch, 0), 2) * 128 + gl.expand_dims(gl.expand_dims(t, 0), 1) * 32  # K offs
    rows_lo = gl.minimum(off_n + r3, N - 1)
    sl_row = rows_lo * stride_sn
    sh_row = gl.minimum(off_n + HALF + r3, N - 1) * stride_sn
    # activation row of the lane's quad (g = row bits 0-2), and the int32 offset of its vector's first word
    ma = m0 + r3 % 8
    mb = ma + 8
    xa = gl.minimum(ma, M - 1) * stride_xm + col0 // 2
    xb = gl.minimum(mb, M - 1) * stride_xm + col0 // 2

    z = gl.zeros([HALF, KC, 4], gl.float32, layout=L4)
    acc_a = (z, z, z, z)
    acc_b = (z, z, z, z)
    sl = _scales(s_ptr, sl_row, col0, 0, BK, GROUP_SIZE)
    sh = _scales(s_ptr, sh_row, col0, 0, BK, GROUP_SIZE)
    for i in range(num_k):
        slot = i % STAGES
        kn = gl.minimum(i + 1, num_k - 1)
        sl_next = _scales(s_ptr, sl_row, col0, kn, BK, GROUP_SIZE)
        sh_next = _scales(s_ptr, sh_row, col0, kn, BK, GROUP_SIZE)
        # Every warp has block i - 1's words in registers: refill that slot with block i - 1 + STAGES. Issued here,
        # before this block's wait, because ptxas hoists register-only work above a barrier: issued after the
        # loads below, the copy sank behind the whole block's dequantization and MMAs (SASS, first version).
        _cta_barrier()
        prev = i - 1 + STAGES
        _issue(w_desc, w_smem, bars, prev, prev, off_n, (i > 0) & (prev < num_k), STAGES, BK, HALF)
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        wl = w_smem.index(2 * slot).load(LH)
        wh = w_smem.index(2 * slot + 1).load(LH)
        wl0, wl1, wl2, wl3 = _words4(wl, L4)
        wh0, wh1, wh2, wh3 = _words4(wh, L4)
        xka = xa + i * (BK // 2)
        xkb = xb + i * (BK // 2)
        acc_a, acc_b = _word(acc_a, acc_b, x_ptr, xka, xkb, ma, mb, M, wl0, wh0, sl, sh, BM, IS_BF16)
        acc_a, acc_b = _word(acc_a, acc_b, x_ptr, xka + 4, xkb + 4, ma, mb, M, wl1, wh1, sl, sh, BM, IS_BF16)
        acc_a, acc_b = _word(acc_a, acc_b, x_ptr, xka + 8, xkb + 8, ma, mb, M, wl2, wh2, sl, sh, BM, IS_BF16)
        acc_a, acc_b = _word(acc_a, acc_b, x_ptr, xka + 12, xkb + 12, ma, mb, M, wl3, wh3, sl, sh, BM, IS_BF16)
        sl = sl_next
        sh = sh_next
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    # c0/c1: rows R1 x activation rows m0 + 2t / + 1; c2/c3: rows R2 (then the same for m0 + 8 with BM 16)
    LS: gl.constexpr = gl.SliceLayout(1, L4)
    rows = off_n + gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(1, LS)), 1)   # [HALF, 1]
    mcol = m0 + 2 * gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LS)), 0)     # [1, 4]
    b_lo = gl.zeros([HALF, 1], gl.float32, layout=LS)
    b_hi = gl.zeros([HALF, 1], gl.float32, layout=LS)
    if HAS_BIAS:
        b_lo = gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
        b_hi = gl.load(bias_ptr + rows + HALF, mask=rows + HALF < N, other=0.0).to(gl.float32)
    c0, c1, c2, c3 = acc_a
    _store_col(c0, b_lo, out_ptr, rows, mcol, M, N, stride_om, HAS_BIAS)
    _store_col(c1, b_lo, out_ptr, rows, mcol + 1, M, N, stride_om, HAS_BIAS)
    _store_col(c2, b_hi, out_ptr, rows + HALF, mcol, M, N, stride_om, HAS_BIAS)
    _store_col(c3, b_hi, out_ptr, rows + HALF, mcol + 1, M, N, stride_om, HAS_BIAS)
    if BM > 8:
        c0, c1, c2, c3 = acc_b
        _store_col(c0, b_lo, out_ptr, rows, mcol + 8, M, N, stride_om, HAS_BIAS)
        _store_col(c1, b_lo, out_ptr, rows, mcol + 9, M, N, stride_om, HAS_BIAS)
        _store_col(c2, b_hi, out_ptr, rows + HALF, mcol + 8, M, N, stride_om, HAS_BIAS)
        _store_col(c3, b_hi, out_ptr, rows + HALF, mcol + 9, M, N, stride_om, HAS_BIAS)


GEMV_TMA_BLOCK_M = (8, 16)


def gemv_tma_ok(block_n: int, block_k: int, num_warps: int) -> bool:
    """Tilings :func:`w4a16_gemv_tma` runs: ``block_n`` a power of two >= 16, ``block_k`` a power of two in
    128..1024, at least one (chunk, 8-row group) per warp, and at most 32 words per thread (sm_90a compiles with
    Triton 3.9: 64 words spill at 16 activation rows, 128 at 8)."""
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (block_n, block_k, num_warps))
    return (pow2 and block_n >= 16 and 128 <= block_k <= 1024 and (block_n // 16) * (block_k // 128) >= num_warps
            and block_n * block_k // 8 <= 32 * 32 * num_warps)


def word_descriptor(weight_packed: torch.Tensor, block_n: int, block_k: int) -> TensorDescriptor:
    """TMA descriptor of ``weight_packed [N, K/8]`` with a ``[block_n / 2, block_k / 8]`` box (one row half of a
    K block), unswizzled: the word tile is read back row by row in :func:`half_layout`."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return TensorDescriptor.from_tensor(weight_packed, [block_n // 2, block_k // 8], layout)


def w4a16_gemv_tma(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, group_size: int, *, block_m: int, block_n: int, block_k: int,
                   num_warps: int, num_stages: int = 4) -> torch.Tensor:
    """Launch the TMA-fed GEMV (CUDA sm_90 only). ``x`` ``[M, K]`` bf16/fp16; ``weight_packed`` ``[N, K/8]`` int32,
    contiguous, 16-byte aligned (any N: the rows past N read zeros and are not stored); ``weight_scale`` ``[N, K/G]``
    of x's dtype, contiguous, G = 32, 64, a multiple of 128 or K (channelwise); ``group_size`` G (-1 or >= K:
    channelwise); ``bias`` None or ``[N]`` of x's dtype; ``block_m`` 8 or 16; ``block_k`` divides K
    (:func:`gemv_tma_ok` for the tiling); ``num_stages``: K blocks in flight per program. Returns ``[M, N]`` of x's
    dtype. Bad operands raise ``ValueError`` before anything is launched."""
    from .w4a16 import check_w4a16_args

    n, k, group = check_w4a16_args(x, weight_packed, weight_scale, bias, name="w4a16_gemv_tma", any_n=True)
    if x.dim() != 2:
        raise ValueError(f"w4a16_gemv_tma: x must be [M, K], got {tuple(x.shape)}")
    if group_size != group and not (group == k and (group_size == -1 or group_size >= k)):
        raise ValueError(f"w4a16_gemv_tma: group size {group_size} disagrees with weight_scale's "
                         f"{weight_scale.shape[1]} columns per row (group {group})")
    m = x.shape[0]
    if block_m not in GEMV_TMA_BLOCK_M:
        raise ValueError(f"w4a16_gemv_tma: block_m must be one of {GEMV_TMA_BLOCK_M}, got {block_m}")
    if not gemv_tma_ok(block_n, block_k, num_warps) or k % block_k or num_stages < 1:
        raise ValueError(f"w4a16_gemv_tma: unsupported tiling block_n={block_n}, block_k={block_k}, "
                         f"num_warps={num_warps}, num_stages={num_stages} for K={k}")
    if weight_packed.data_ptr() % 16:
        raise ValueError("w4a16_gemv_tma: weight_packed must start on a 16-byte boundary (TMA)")
    if x.stride() != (k, 1) or x.data_ptr() % 16:   # (a [1, K] view may be "contiguous" with stride(0) 1)
        x = x.clone(memory_format=torch.contiguous_format)   # 16-byte activation loads; K % 128 keeps rows aligned
    x32 = x.view(torch.int32)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _w4a16_gemv_tma_kernel[grid](
        word_descriptor(weight_packed, block_n, block_k), x32, weight_scale,
        bias.contiguous() if bias is not None else weight_scale, out,
        m, n, k, x32.stride(0), weight_scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16, BM=block_m, BN=block_n, BK=block_k,
        GROUP_SIZE=0 if group == k else group, STAGES=num_stages, num_warps=num_warps,
    )
    return out

