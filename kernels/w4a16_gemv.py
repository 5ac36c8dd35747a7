"""Batch-1..8 W4A16 GEMV on CUDA cores: no tensor cores, no shared memory, no barrier inside the K loop.

``y[M, N] = x[M, K] @ W'[N, K]^T (+ bias)`` with W' dequantized from the compressed-tensors int4 layout
(see :mod:`kernels.w4a16_mainloop` for the layout and for the exact dequantization ``W' = RN_dtype((u - 8) * s)``).

The hardware reason
-------------------
At M = 1 a W4A16 GEMM is 2 FLOP per 0.5 B of weight: the only job is to stream ``weight_packed`` at HBM speed.
The tensor-core kernel (:mod:`kernels.w4a16_decode`) pays for wgmma with a chain of waits in every K block: the
cp.async ring, the scales' and the activations' trips through shared memory into the MMA operand layouts (four
CTA barriers) and the wgmma wait itself, and at the end a split-K ticket with a GPU-scope memory barrier (ncu, H200,
twentieth session). Here every thread instead:

1. loads whole int32 words of its rows straight into registers (16-byte vector loads, coalesced along K), the next
   one or two K blocks' words issued before the current block is computed (a register pipeline, no shared memory);
2. dequantizes each word with the packed PTX of :mod:`kernels.w4a16_mainloop` (``prmt``/``lop3``/``sub``/``mul`` on
   bf16x2: the same ``RN((u - 8) * s)`` values, two per instruction) and widens them to fp32 (one ``shl`` or
   ``and`` each: a bf16 is the top half of an fp32);
3. multiplies with the activations in fp32 FMAs (the activation of each k is loaded once per block and reused by
   every row the thread holds), accumulating one fp32 partial per word;
4. after the K loop, sums its partials and the block reduces across threads once (``tl.sum``: a fixed tree, so the
   bits do not depend on timing).

That is 17 dequant + 8 widen + 8 FMA instructions per word of 8 weights, ~40 with the addressing (the loop's SASS,
Triton 3.6, sm_90a), and 8 more FMAs per word for every further activation row. A program owns ``BLOCK_N`` whole
rows, so small-N shapes get many small programs (``BLOCK_N`` down to 1), and with ``SPLIT_K`` 1 the output needs no
workspace, ticket or second pass.

Optional split-K (all three GEMVs, :func:`emit` and :func:`split_reduce`): where N is small and K long (E4B's
``down_proj``, 2560 x 8192), even the smallest tiles give too few programs to keep enough loads in flight at 8..16
activation rows. With ``SPLIT_K`` > 1 program (n, m, s) streams only the K blocks of split s, stores its fp32 partial
tile to a workspace and takes a ticket from a per-tile counter, as :mod:`kernels.w4a16_decode` does (CUTLASS's
serial split-K semaphore): the program that draws the last ticket sums the partials **in split order**, adds the
bias, rounds once and stores, so the bits do not depend on which split finished last.

Measured (H200, 2026-11-30, ``bench/gpu/gemv_sweep.py``): at M = 1 this kernel beat the split-K wgmma kernel on all
five E4B shapes (1.12-1.66x) and it is issue-bound (gate_up 1.9 TB/s, and each further row costs time in proportion
to its FMAs). :mod:`kernels.w4a16_gemv_mma` does the multiply-accumulate on tensor cores from the same registers
(~23 instructions per word) and was faster on every row, so the tuned table uses that one; this kernel is what
``gemv_mma`` configs run where inline PTX cannot (the Triton interpreter; bf16 before sm_90), and a ``gemv`` config.

Why the activations and scales are loaded by inline PTX: a ``tl.load`` is a layout anchor in Triton, laid out by
its own pointer's contiguity, and its result may reach the words' layout only through shared memory (a
``convert_layout`` with CTA barriers, in every K block). Seen in the SASS of ahead-of-time sm_90a compiles
(``bench/gpu/sass_loop.py``, Triton 3.6 and 3.9): scales by ``tl.load`` put two barriers and three shared-memory
accesses into the loop of ``BLOCK_N`` 16 / ``BLOCK_K`` 1024 / 4 warps; activations loaded as a ``[WPB]`` vector
converted the dequantized weights instead. An ``ld.global.nc`` in ``inline_asm_elementwise`` is an ordinary
elementwise op that takes the layout of the words it is combined with, and the compiler merges the repeated loads of
a thread's rows (same addresses). ``tests/test_kernels_fast.py`` checks the compiled loops for barriers and
shared-memory accesses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .counters import grow_zeros, pool
from .w4a16_config import effective_split
from .w4a16_mainloop import dequant_ptx_lines, round_to, scale_groups


def _widen_ptx_lines(bf16: bool, pairs: list[str]) -> list[str]:
    """PTX: registers holding two 16-bit floats each -> the values as fp32 in ``$0, $1, ...`` (pair t -> ``$2t``,
    ``$2t+1``), exactly: a bf16 is the top half of an fp32 (``shl`` / ``and``), an fp16 needs a ``cvt`` (through
    ``h0, h1``, which the caller declares)."""
    lines = []
    for t, p in enumerate(pairs):
        if bf16:
            lines += [f"shl.b32 ${2 * t}, {p}, 16;", f"and.b32 ${2 * t + 1}, {p}, 0xFFFF0000;"]
        else:
            lines += [f"mov.b32 {{h0, h1}}, {p};", f"cvt.f32.f16 ${2 * t}, h0;", f"cvt.f32.f16 ${2 * t + 1}, h1;"]
    return lines


def _unpack_f32_ptx(bf16: bool) -> str:
    """PTX for one int32 word + its (s, s) pair -> the word's 8 dequantized weights widened to fp32, in code order:
    :func:`kernels.w4a16_mainloop.dequant_ptx_lines` (natural pairs, 17 instructions), then one instruction per
    value. Operands: ``$0..$7`` fp32 outputs, ``$8`` the word, ``$9`` the pair."""
    core = dequant_ptx_lines(bf16, True, "$8", "$9")
    lines = core[:1] + [".reg .b16 h0, h1;"] + core[1:] + _widen_ptx_lines(bf16, ["p0", "p1", "p2", "p3"])
    return "{\n" + "\n".join(lines) + "\n}"


_PTX_F32_BF16 = tl.constexpr(_unpack_f32_ptx(True))
_PTX_F32_FP16 = tl.constexpr(_unpack_f32_ptx(False))
_CONSTRAINTS_F32 = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,r,r")


def _load_x_ptx(bf16: bool) -> str:
    """PTX: one 16-byte load of the 8 activations of a word (``ld.global.nc``: ``x`` is read-only here), widened
    to fp32 in code order. Operands: ``$0..$7`` fp32 outputs, ``$8`` the 64-bit address."""
    lines = [".reg .b32 a0, a1, a2, a3;", ".reg .b16 h0, h1;", "ld.global.nc.v4.b32 {a0, a1, a2, a3}, [$8];"]
    lines += _widen_ptx_lines(bf16, ["a0", "a1", "a2", "a3"])
    return "{\n" + "\n".join(lines) + "\n}"


_PTX_X_BF16 = tl.constexpr(_load_x_ptx(True))
_PTX_X_FP16 = tl.constexpr(_load_x_ptx(False))
_CONSTRAINTS_X = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,l")


@triton.jit
def scale_column(kb, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr, NG: tl.constexpr):
    """First scale column of K block ``kb``: ``kb * NG`` when a block spans NG groups, ``kb * BLOCK_K // G`` when a
    group spans blocks, 0 for channelwise scales (``GROUP_SIZE`` 0)."""
    if GROUP_SIZE == 0:
        return 0
    elif NG > 1:
        return kb * NG
    else:
        return (kb * BLOCK_K) // GROUP_SIZE


@triton.jit
def _load_scales(p, USE_ASM: tl.constexpr):
    """``*p`` for a tensor of scale pointers, through ``ld.global.nc`` asm so that it takes the layout its use
    needs (see :func:`_load_x`)."""
    if USE_ASM:
        v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [p.to(tl.int64, bitcast=True)],
                                      dtype=tl.int16, is_pure=True, pack=1)
        return v.to(p.dtype.element_ty, bitcast=True)
    else:
        return tl.load(p)


@triton.jit
def group_scales(s_ptrs, col, USE_ASM: tl.constexpr, WPG: tl.constexpr):
    """Scales ``[R, NG]`` (pointers ``s_ptrs + col``) broadcast over each group's ``WPG`` words -> ``[R, NG * WPG]``,
    in registers (a thread's 4-word vector lies inside one group)."""
    s = _load_scales(s_ptrs + col, USE_ASM)
    R: tl.constexpr = s.shape[0]
    NG: tl.constexpr = s.shape[1]
    return tl.reshape(tl.broadcast_to(s[:, :, None], [R, NG, WPG]), [R, NG * WPG])


@triton.jit
def _code_f32(w, shift: tl.constexpr, sf, dtype: tl.constexpr):
    """Code ``shift / 4`` of every word, dequantized as :func:`_dequant_f32`'s plain path does it."""
    return round_to((((w >> shift) & 0xF) - 8).to(tl.float32) * sf, dtype).to(tl.float32)


@triton.jit
def _dequant_f32(w, s, USE_ASM: tl.constexpr):
    """Words ``w`` (int32, any shape) and their scales ``s`` (same shape, activation dtype) -> the 8 dequantized
    weights of every word as eight fp32 tensors (codes 0..7), each exactly ``RN_dtype((u - 8) * s)``."""
    if USE_ASM:
        s16 = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return tl.inline_asm_elementwise(_PTX_F32_BF16 if s.dtype == tl.bfloat16 else _PTX_F32_FP16,
                                         _CONSTRAINTS_F32, [w, s16 | (s16 << 16)], dtype=(tl.float32, ) * 8,
                                         is_pure=True, pack=1)
    else:
        # Plain Triton (interpreter, pre-Hopper bf16): (u - 8) * s is exact in fp32, then one rounding (§4).
        sf = s.to(tl.float32)
        return (_code_f32(w, 0, sf, s.dtype), _code_f32(w, 4, sf, s.dtype), _code_f32(w, 8, sf, s.dtype),
                _code_f32(w, 12, sf, s.dtype), _code_f32(w, 16, sf, s.dtype), _code_f32(w, 20, sf, s.dtype),
                _code_f32(w, 24, sf, s.dtype), _code_f32(w, 28, sf, s.dtype))


@triton.jit
def _widen(p, IS_BF16: tl.constexpr):
    """An int32 holding two 16-bit floats (k, k+1) -> the two values as fp32 (exact)."""
    if IS_BF16:
        lo = (p << 16).to(tl.float32, bitcast=True)
        hi = (p & -65536).to(tl.float32, bitcast=True)      # -65536 == 0xFFFF0000
    else:
        lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((p >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _load_x(x_ptr, xoff, m, M, stride_xm, IS_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """The 8 activations ``x[m, 8j .. 8j+7]`` of every word j in ``xoff`` (its first int32 pair), as fp32.
    Rows ``m >= M`` read row ``M - 1`` instead (their results are not stored)."""
    p = x_ptr + tl.minimum(m, M - 1) * stride_xm + xoff
    if USE_ASM:
        # A plain tl.load would be laid out on its own and reach the weights' layout through shared memory (a
        # barrier per use); the asm load takes the layout of its operand, i.e. the weights'.
        return tl.inline_asm_elementwise(_PTX_X_BF16 if IS_BF16 else _PTX_X_FP16, _CONSTRAINTS_X,
                                         [p.to(tl.int64, bitcast=True)], dtype=(tl.float32, ) * 8, is_pure=True,
                                         pack=1)
    else:
        x0, x1 = _widen(tl.load(p), IS_BF16)
        x2, x3 = _widen(tl.load(p + 1), IS_BF16)
        x4, x5 = _widen(tl.load(p + 2), IS_BF16)
        x6, x7 = _widen(tl.load(p + 3), IS_BF16)
        return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _row_dot(acc, x_ptr, xoff, m, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16: tl.constexpr,
             USE_ASM: tl.constexpr):
    """``acc[r, j] += sum_c W'[r, 8j + c] * x[m, 8j + c]``: 8 fp32 FMAs per word. ``x_ptr`` points at ``x`` viewed as
    int32 pairs; ``xoff`` [words] is each word's first pair (4 pairs per word)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _load_x(x_ptr, xoff, m, M, stride_xm, IS_BF16, USE_ASM)
    acc += d0 * x0
    acc += d1 * x1
    acc += d2 * x2
    acc += d3 * x3
    acc += d4 * x4
    acc += d5 * x5
    acc += d6 * x6
    acc += d7 * x7
    return acc


@triton.jit
def emit(y, bias, out_ptr, ws_ptr, rows, m, M, N, stride_om, pid_k, HAS_BIAS: tl.constexpr, EMU_RN: tl.constexpr,
         SPLIT: tl.constexpr):
    """Store a GEMV program's fp32 dot products ``y`` of weight rows ``rows`` and activation row(s) ``m`` (any shapes
    that broadcast together; entries with ``m >= M`` are dropped): without ``SPLIT`` the output (+ ``bias``, one
    rounding to the output dtype), with ``SPLIT`` split ``pid_k``'s partial (no bias) into the fp32 workspace
    ``ws[pid_k, m, rows]`` of ``[SPLIT_K, M, N]``, for :func:`split_reduce`."""
    ok = (m + rows * 0) < M
    if SPLIT:
        tl.store(ws_ptr + (pid_k * M + m) * N + rows, y, mask=ok)
    else:
        if HAS_BIAS:
            y += bias
        if EMU_RN:
            y = round_to(y, out_ptr.dtype.element_ty)
        tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def split_reduce(ws_ptr, cnt_ptr, bias_ptr, out_ptr, pid_n, pid_m, M, N, stride_om, SPLIT_K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, EMU_RN: tl.constexpr):
    """After every :func:`emit` of a split program: take a ticket for output tile (``pid_m``, ``pid_n``); the
    program that draws the last one sums the tile's ``SPLIT_K`` partials in split order, adds the bias, rounds once,
    stores, and returns the counter to zero (the launch leaves every counter as it found it)."""
    tl.debug_barrier()  # every thread's partial is issued before the ticket (the release below is cumulative)
    tile = pid_m * tl.num_programs(0) + pid_n
    ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLIT_K - 1:
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (r[:, None] < M) & (c[None, :] < N)
        p = ws_ptr + r[:, None] * N + c[None, :]
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(0, SPLIT_K):  # fixed order: the bits do not depend on which split finished last
            total += tl.load(p + s * M * N, mask=ok, other=0.0, cache_modifier=".cg")  # L2: not the stale L1
        if HAS_BIAS:
            total += tl.load(bias_ptr + c).to(tl.float32)[None, :]
        if EMU_RN:
            total = round_to(total, out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * stride_om + c[None, :], total.to(out_ptr.dtype.element_ty), mask=ok)
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def split_range(K, KB_PER_SPLIT, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """``(kb_lo, kb_n)``: the first K block of this program's split (axis 2 of the grid) and how many it streams;
    ``(0, K / BLOCK_K)`` without ``SPLIT``."""
    if SPLIT:
        kb_lo = tl.program_id(2) * KB_PER_SPLIT
        return kb_lo, tl.minimum(KB_PER_SPLIT, K // BLOCK_K - kb_lo)
    else:
        return 0, K // BLOCK_K


@triton.jit
def _finish_row(acc, bias, out_ptr, ws_ptr, rows, m, M, N, stride_om, pid_k, HAS_BIAS: tl.constexpr,
                EMU_RN: tl.constexpr, SPLIT: tl.constexpr):
    emit(tl.sum(acc, axis=1), bias, out_ptr, ws_ptr, rows, m, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)


@triton.jit(do_not_specialize=["M", "N", "stride_sn", "SPLIT_K", "KB_PER_SPLIT"])
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    SPLIT_K, KB_PER_SPLIT,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, IS_BF16: tl.constexpr, EMU_RN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
    NG: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    WPB: tl.constexpr = BLOCK_K // 8          # int32 words per row per K block
    WPG: tl.constexpr = WPB // NG             # words per scale group inside the block
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # N % BLOCK_N == 0 (checked by the wrapper): no masks
    words = tl.arange(0, WPB)
    # The word axis is one contiguous dimension, so Triton spreads a warp's threads along K (16-byte vectors) and
    # gives each thread several rows of the same words: their activations are loaded once and reused.
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + words[None, :]
    s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * stride_sn + tl.arange(0, NG)[None, :]   # one per (row, group)
    # First int32 pair of each word, as a [BLOCK_N, WPB] tensor whose rows repeat: built like ``w_ptrs`` so that it
    # gets the weights' layout (a [WPB] vector would get its own layout and a shared-memory conversion per use);
    # the loads of a thread's repeated rows are the same addresses, which the compiler merges.
    xoff = (rows * 0)[:, None] + words[None, :] * 4

    acc0 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
    acc5 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
    acc6 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
    acc7 = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)

    # Register pipeline: the words of the next PREFETCH blocks are in flight while this block is computed.
    kb_lo, kb_total = split_range(K, KB_PER_SPLIT, BLOCK_K, SPLIT)   # this split's K blocks (all without SPLIT)
    if SPLIT:
        w_ptrs += kb_lo * WPB
        xoff += kb_lo * (BLOCK_K // 2)
    w = tl.load(w_ptrs)
    if PREFETCH == 2:
        w1 = tl.load(w_ptrs + WPB, mask=tl.full([BLOCK_N, WPB], 1, tl.int32) < kb_total, other=0)
    for kb in range(0, kb_total):
        more = tl.full([BLOCK_N, WPB], kb + PREFETCH, tl.int32) < kb_total   # (a tensor mask: the interpreter
        w_next = tl.load(w_ptrs + (kb + PREFETCH) * WPB, mask=more, other=0)  #  takes no scalar one)
        col = scale_column(kb_lo + kb, BLOCK_K, GROUP_SIZE, NG)
        d0, d1, d2, d3, d4, d5, d6, d7 = _dequant_f32(w, group_scales(s_ptrs, col, USE_ASM, WPG), USE_ASM)
        xk = xoff + kb * (BLOCK_K // 2)
        acc0 = _row_dot(acc0, x_ptr, xk, m0, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
        if BLOCK_M > 1:
            acc1 = _row_dot(acc1, x_ptr, xk, m0 + 1, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
        if BLOCK_M > 2:
            acc2 = _row_dot(acc2, x_ptr, xk, m0 + 2, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
            acc3 = _row_dot(acc3, x_ptr, xk, m0 + 3, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
        if BLOCK_M > 4:
            acc4 = _row_dot(acc4, x_ptr, xk, m0 + 4, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
            acc5 = _row_dot(acc5, x_ptr, xk, m0 + 5, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
            acc6 = _row_dot(acc6, x_ptr, xk, m0 + 6, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
            acc7 = _row_dot(acc7, x_ptr, xk, m0 + 7, M, stride_xm, d0, d1, d2, d3, d4, d5, d6, d7, IS_BF16, USE_ASM)
        if PREFETCH == 2:
            w = w1
            w1 = w_next
        else:
            w = w_next

    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows).to(tl.float32)
    _finish_row(acc0, bias, out_ptr, ws_ptr, rows, m0, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
    if BLOCK_M > 1:
        _finish_row(acc1, bias, out_ptr, ws_ptr, rows, m0 + 1, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
    if BLOCK_M > 2:
        _finish_row(acc2, bias, out_ptr, ws_ptr, rows, m0 + 2, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
        _finish_row(acc3, bias, out_ptr, ws_ptr, rows, m0 + 3, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
    if BLOCK_M > 4:
        _finish_row(acc4, bias, out_ptr, ws_ptr, rows, m0 + 4, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
        _finish_row(acc5, bias, out_ptr, ws_ptr, rows, m0 + 5, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
        _finish_row(acc6, bias, out_ptr, ws_ptr, rows, m0 + 6, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
        _finish_row(acc7, bias, out_ptr, ws_ptr, rows, m0 + 7, M, N, stride_om, pid_k, HAS_BIAS, EMU_RN, SPLIT)
    if SPLIT:
        split_reduce(ws_ptr, cnt_ptr, bias_ptr, out_ptr, pid_n, pid_m, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N,
                     HAS_BIAS, EMU_RN)


GEMV_BLOCK_M = (1, 2, 4, 8)


def gemv_operands(name: str, x: torch.Tensor, weight_packed: torch.Tensor, group_size: int, block_m: int,
                  block_n: int, block_k: int, block_ms: tuple[int, ...], prefetch: int):
    """Host side shared by both GEMVs: check the tile, and return ``(x32, out, GROUP_SIZE, NG, grid)``: ``x`` as
    int32 (k, k+1) pairs ``[M, K/2]`` (copied first if its start is not 16-byte aligned: the kernels load 16 bytes
    at a time; K % 128 == 0 keeps every row aligned), the ``[M, N]`` output, the scale constexprs and the grid."""
    m, k = x.shape
    n = weight_packed.shape[0]
    if block_m not in block_ms:
        raise ValueError(f"{name}: block_m must be one of {block_ms}, got {block_m}")
    if prefetch not in (1, 2):
        raise ValueError(f"{name}: prefetch must be 1 or 2 (K blocks of words in flight), got {prefetch}")
    if k % block_k or n % block_n:
        raise ValueError(f"{name}: need K % block_k == 0 and N % block_n == 0, got K={k}, N={n}, "
                         f"block_k={block_k}, block_n={block_n}")
    if x.data_ptr() % 16:
        x = x.clone()
    gk, ng = scale_groups(group_size, k, block_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    return x.view(torch.int32), out, gk, ng, (n // block_n, triton.cdiv(m, block_m))


# The split-K tickets of the GEMVs: the decode family's pool (kernels.counters); launches on one stream run in
# order and each leaves its counters at zero, so the split-K kernels of both modules share the buffers.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = pool("decode")


def split_plan(x32: torch.Tensor, n: int, k: int, block_k: int, split_k: int, grid: tuple[int, int]):
    """Host side of a GEMV's split-K: ``(grid3, split_k, kb_per_split, ws, cnt)``. ``split_k`` is clamped so that
    no split is empty (and to 1 where the workspace's int32 offsets would overflow); ``grid3`` is ``grid`` with
    the splits as its third axis; ``ws`` the fp32 ``[split_k, M, N]`` workspace and ``cnt`` the tile counters
    (with ``split_k`` 1, placeholders the kernel never touches). The returned ``split_k`` is
    :func:`kernels.w4a16_config.effective_split`'s."""
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    m = x32.shape[0]
    kb_total = k // block_k
    split_k = effective_split(kb_total, split_k)
    if split_k * m * n >= 2**31:
        split_k = 1
    kb_per_split = triton.cdiv(kb_total, split_k)
    if split_k == 1:
        return (*grid, 1), 1, kb_total, x32, x32
    cnt = grow_zeros(_COUNTERS, x32.device, grid[0] * grid[1], 4096)
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x32.device)
    return (*grid, split_k), split_k, kb_per_split, ws, cnt


def w4a16_gemv(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, group_size: int, *, block_m: int, block_n: int, block_k: int,
               num_warps: int, prefetch: int = 1, split_k: int = 1, use_asm: bool = True,
               emu_rn: bool = False) -> torch.Tensor:
    """Launch the CUDA-core GEMV. Inputs are assumed validated by :func:`kernels.w4a16.w4a16_gemm`:
    ``x`` [M, K] contiguous bf16/fp16, ``weight_packed`` [N, K/8] int32 contiguous, ``weight_scale`` [N, K/G] of
    ``x.dtype`` contiguous, ``bias`` [N] or None. Needs ``K % block_k == 0`` and ``N % block_n == 0``; ``block_m``
    in (1, 2, 4, 8) activation rows share one dequantization (grid: N / block_n x cdiv(M, block_m) x splits);
    ``prefetch`` (1 or 2): K blocks of words loaded ahead of the one being computed; ``split_k``: K slices per
    output tile (:func:`split_plan`).
    ``emu_rn``: round the output in software (the interpreter's fp32 -> bf16 cast truncates).
    Returns ``[M, N]`` of ``x.dtype``."""
    x32, out, gk, ng, grid = gemv_operands("w4a16_gemv", x, weight_packed, group_size, block_m, block_n, block_k,
                                           GEMV_BLOCK_M, prefetch)
    n, k = weight_packed.shape[0], x.shape[1]
    grid, split_k, kb_per_split, ws, cnt = split_plan(x32, n, k, block_k, split_k, grid)
    _w4a16_gemv_kernel[grid](
        x32, weight_packed, weight_scale, bias if bias is not None else weight_scale, out, ws, cnt,
        x.shape[0], n, k,
        x32.stride(0), weight_packed.stride(0), weight_scale.stride(0), out.stride(0),
        split_k, kb_per_split,
        HAS_BIAS=bias is not None, USE_ASM=use_asm, IS_BF16=x.dtype == torch.bfloat16, EMU_RN=emu_rn,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_SIZE=gk, NG=ng,
        PREFETCH=prefetch, SPLIT=split_k > 1, num_warps=num_warps, num_stages=1,
        enable_fp_fusion=True,  # acc + w * x -> one FFMA (Triton 3.10 turns contraction off by default)
    )
    return out
