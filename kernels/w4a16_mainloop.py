"""The shared inner loop of pdqkit's fast W4A16 kernels: stream int4 words, dequantize in registers, tensor-core dot.

Both fast kernels (``w4a16_decode`` — split-K for small M, ``w4a16_prefill`` — large tiles for large M) call
:func:`w4a16_mainloop`, which accumulates ``acc[BM, BN] += x[rows, k] @ W'[cols, k]^T`` over a range of K blocks,
reading the weight **straight from the compressed-tensors layout** (pack-quantized.md §2.1):

* ``weight_packed[N, K/8]`` int32: nibble ``i`` (bits ``4i..4i+3``) of word ``j`` is ``u = q + 8`` of ``k = 8j + i``;
* ``weight_scale[N, K/G]`` in the activation dtype (bf16 or fp16); G = 128 (or 32, 64, a multiple of 128), or G = K for
  channelwise scales (then the scale is applied per element, exactly like compressed-tensors' dequantize).

Dequantized weights are ``W' = RN_dtype((u - 8) * s)`` — the same values as ``pack.packing.dequantize``, Marlin and
Machete (marlin-arithmetic.md §4, §10) — so only the fp32 summation order differs from the reference.

Why the dequant is hand-written PTX (the hardware reason)
--------------------------------------------------------
At decode (M <= 16) the kernel must stream ~0.5 B of weight per MAC at >3 TB/s, i.e. ~50 G words/s across 132 SMs:
the SM has ~4 instruction issues per clock, so the per-element ALU cost decides whether we are memory-bound.
The textbook Triton unpack (shift, mask, int->float convert, scale, float->bf16 convert) costs ~5 instructions per
element, and int->float converts run at a quarter rate on sm_90. Instead, per int32 word (8 codes):

1. ``shr``  once: ``v = w >> 4`` — byte t of ``w`` holds codes (2t, 2t+1) in its low/high nibble, byte t of ``v``
   holds code 2t+1 in its low nibble;
2. ``prmt`` (byte permute) ×4: half-word 0 <- byte t of ``w``, half-word 1 <- byte t of ``v``: codes (2t, 2t+1) now
   sit in the low nibble of each 16-bit half — exactly the (k, k+1) pair a tensor-core fragment register holds;
3. ``lop3`` ×4: ``(p & 0x000F000F) | MAGIC`` turns each nibble into a float: bf16 ``0x4300 | u`` = 128 + u,
   fp16 ``0x6400 | u`` = 1024 + u (exact);
4. ``sub.bf16x2``/``sub.f16x2`` ×4: minus 136 (bf16) / 1032 (fp16) → ``u - 8`` exactly;
5. ``mul.bf16x2``/``mul.f16x2`` ×4 by the (s, s) pair → ``RN((u - 8) * s)``, one rounding, no fp32 round trip.

That is 17 instructions per 8 elements (~2.1/element), on packed 2-wide registers that feed the MMA unchanged.
With the K relabelling of :func:`_kperm` (used by the tuned decode configs) steps 1-2 become three shifts
(``lop3(w >> 4t)`` pairs codes t and t+4): 15 instructions per word; the whole decode loop body is then ~2.7 SASS
instructions per weight (Triton 3.6, sm_90a: 352 instructions per thread per 128x128 block, 240 of them dequant).
Under ``TRITON_INTERPRET=1`` (CPU tests) inline PTX cannot run, so ``USE_ASM=False`` selects a plain-Triton path that
computes the same values in fp32 and rounds once (``(u - 8) * s`` is exact in fp32).

Pipelining: the weight and activation tiles are plain ``tl.load``s that Triton's software pipeliner turns into
multi-stage ``cp.async`` copies (``num_stages``); the 2-byte scale loads are too narrow for ``cp.async``, so the loop
prefetches the next block's scales one iteration ahead by hand.
"""
from __future__ import annotations

import triton
import triton.language as tl


def scale_groups(group_size: int, k: int, block_k: int) -> tuple[int, int]:
    """The ``(GROUP_SIZE, NG)`` constexprs every kernel here takes: ``GROUP_SIZE`` is G, or 0 when one scale column
    covers all of K (channelwise); ``NG`` the scale groups per K block (``block_k // G`` when G < block_k, else 1)."""
    gk = 0 if group_size >= k else group_size
    return gk, (block_k // gk if 0 < gk < block_k else 1)


def dequant_ptx_lines(bf16: bool, natural_pairs: bool, word: str, scale2: str) -> list[str]:
    """The PTX core of every pdqkit dequantization: int32 ``word`` + the (s, s) pair ``scale2`` -> four packed
    16-bit pairs in registers ``p0..p3``, each ``RN((u - 8) * s)`` (declares ``v, p0..p3, c``; callers add outputs).

    ``natural_pairs``: pair t holds codes (2t, 2t+1) (``prmt`` builds it: 17 instructions per word).
    Otherwise pair t holds codes (t, t+4) straight from ``lop3(w >> 4t)`` (15 instructions per word) — used with
    the K relabelling of :func:`_kperm`, which makes exactly that pair the fragment's (k, k+1).
    """
    magic, bias, ty = ("0x43004300", "0x43084308", "bf16x2") if bf16 else ("0x64006400", "0x64086408", "f16x2")
    lines = [".reg .b32 v, p0, p1, p2, p3, c;", f"mov.b32 c, {bias};"]
    if natural_pairs:
        lines.append(f"shr.u32 v, {word}, 4;")
        lines += [f"prmt.b32 p{t}, {word}, v, 0x{4 + t}{4 + t}{t}{t};" for t in range(4)]
    else:
        lines.append(f"mov.b32 p0, {word};")
        lines += [f"shr.u32 p{t}, {word}, {4 * t};" for t in range(1, 4)]
    lines += [f"lop3.b32 p{t}, p{t}, 0x000F000F, {magic}, 0xEA;" for t in range(4)]   # (p & mask) | magic
    lines += [f"sub.rn.{ty} p{t}, p{t}, c;" for t in range(4)]                       # (B + u) - (B + 8)
    lines += [f"mul.rn.{ty} p{t}, p{t}, {scale2};" for t in range(4)]                # RN((u - 8) * s)
    return lines


def _unpack_ptx(bf16: bool, natural_pairs: bool) -> str:
    """PTX for one int32 word -> 8 dequantized 16-bit values (:func:`dequant_ptx_lines`), as four packed (lo, hi)
    register pairs. Operands: ``$0..$7`` the eight dequantized codes in code order, ``$8`` the word, ``$9`` the
    scale pair."""
    lines = dequant_ptx_lines(bf16, natural_pairs, "$8", "$9")
    # outputs in code order: pair t holds codes (2t, 2t+1) or (t, t+4)
    lines += [f"mov.b32 {{${2 * t}, ${2 * t + 1}}}, p{t};" if natural_pairs else f"mov.b32 {{${t}, ${t + 4}}}, p{t};"
              for t in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


_PTX_BF16_NAT = tl.constexpr(_unpack_ptx(True, True))
_PTX_BF16_T4 = tl.constexpr(_unpack_ptx(True, False))
_PTX_FP16_NAT = tl.constexpr(_unpack_ptx(False, True))
_PTX_FP16_T4 = tl.constexpr(_unpack_ptx(False, False))
_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r")


@triton.jit
def _unpack_asm(w, s2, IS_BF16: tl.constexpr, NAT_PAIRS: tl.constexpr):
    """Codes 0..7 of every word as eight tensors (n0, ..., n7) of the activation dtype."""
    if IS_BF16:
        return tl.inline_asm_elementwise(_PTX_BF16_NAT if NAT_PAIRS else _PTX_BF16_T4, _CONSTRAINTS, [w, s2],
                                         dtype=(tl.bfloat16, ) * 8, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_PTX_FP16_NAT if NAT_PAIRS else _PTX_FP16_T4, _CONSTRAINTS, [w, s2],
                                         dtype=(tl.float16, ) * 8, is_pure=True, pack=1)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even, also under TRITON_INTERPRET (whose fp32->bf16 cast truncates):
    for bf16 the rounding is done on the fp32 bits first, so the final cast is exact (finite values). NaN stays
    NaN: the bit trick would carry a NaN's payload into the exponent or the sign (the GPU's NaN 0x7FFFFFFF became
    -0.0) or drop a payload held in the low bits (inf), so a corrupt scale would silently act as a zero weight."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, float("nan"), bits.to(tl.float32, bitcast=True))  # a quiet NaN: truncation keeps it
    return v.to(dtype)


@triton.jit
def dequant_block(w, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr,
                  NAT_PAIRS: tl.constexpr):
    """``w`` int32 ``[BLOCK_N, NG, WPG]`` words, ``s`` ``[BLOCK_N, NG]`` scales (activation dtype) →
    ``[BLOCK_N, BLOCK_K]`` dequantized weights in natural k order (NG groups of WPG words each)."""
    if USE_ASM:
        s16 = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        s2 = (s16 | (s16 << 16))[:, :, None]
        n0, n1, n2, n3, n4, n5, n6, n7 = _unpack_asm(w, s2, s.dtype == tl.bfloat16, NAT_PAIRS)
        # Three joins put the 8 codes of a word on three new axes (e, f, g) with k = 4e + 2f + g: natural order.
        wd = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    else:
        shifts = tl.arange(0, 8) * 4
        u = (w[:, :, :, None] >> shifts[None, None, None, :]) & 0xF
        # (u - 8) * s is exact in fp32 (<= 14 significant bits): one rounding to the activation dtype, as in §4.
        wd = round_to(((u - 8).to(tl.float32) * s.to(tl.float32)[:, :, None, None]), s.dtype)
    return tl.reshape(wd, [BLOCK_N, BLOCK_K])


@triton.jit
def _kperm(t, BLOCK_K: tl.constexpr):
    """Relabel the K axis of a ``[R, BLOCK_K]`` operand so that each thread's mma fragment is whole int32 words.

    Triton's 16-bit mma/wgmma register fragments give lane ``l`` the k pairs ``2(l%4)+{0,1}`` and ``+8`` of every
    16-wide k step: with natural k order every lane would need one byte of every word, so Triton routes the
    dequantized tile through shared memory (st.shared + ldmatrix). A dot product does not care how K is labelled
    as long as both operands use the same labels, so we relabel k inside the block (a permutation of the index
    bits a0..a(b-1), BLOCK_K = 2^b):

    * logical bit 0 (the two halves of a fragment register) <- a2: codes (t, t+4) of a word, i.e. exactly what
      ``lop3(w >> 4t)`` leaves in one register (no byte permutes needed);
    * logical bits 1, 2 (chosen by the lane) <- the two top bits: lane ``l%4`` owns the contiguous quarter
      ``[(l%4)·BK/4, (l%4+1)·BK/4)`` of the block — whole words, 16-byte loads, for the weights and activations;
    * the other (register) bits <- a0, a1, a3, ..., in that order.

    Triton turns the reshape/permute into a relabelling of registers: no data moves.
    """
    R: tl.constexpr = t.shape[0]
    if BLOCK_K == 64:      # dims [R, a5..a0] -> (a3, a1, a0, a5, a4, a2)
        t = tl.permute(tl.reshape(t, [R, 2, 2, 2, 2, 2, 2]), (0, 3, 5, 6, 1, 2, 4))
    elif BLOCK_K == 128:   # dims [R, a6..a0] -> (a4, a3, a1, a0, a6, a5, a2)
        t = tl.permute(tl.reshape(t, [R, 2, 2, 2, 2, 2, 2, 2]), (0, 3, 4, 6, 7, 1, 2, 5))
    else:                  # dims [R, a7..a0] -> (a5, a4, a3, a1, a0, a7, a6, a2)
        tl.static_assert(BLOCK_K == 256, "BLOCK_K must be 64, 128 or 256")
        t = tl.permute(tl.reshape(t, [R, 2, 2, 2, 2, 2, 2, 2, 2]), (0, 3, 4, 5, 7, 8, 1, 2, 6))
    return tl.reshape(t, [R, BLOCK_K])


@triton.jit
def w4a16_mainloop(acc, x_ptr, w_ptr, s_ptr, offs_m, row_ok, offs_n, stride_xm, stride_wn, stride_sn,
                   kb_lo, kb_hi,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr, NG: tl.constexpr,
                   USE_ASM: tl.constexpr, DOT_F32: tl.constexpr, KPERM: tl.constexpr, W_IS_A: tl.constexpr):
    """``acc += x[offs_m, kb*BK : (kb+1)*BK] @ W'[offs_n, same]^T`` for kb in [kb_lo, kb_hi), kb_lo < kb_hi.

    * ``offs_m``/``offs_n`` are already clamped to valid rows/columns (callers use ``% M`` / ``% N``), so no load
      needs a mask for correctness; ``row_ok`` (rows < M) still masks the activation loads so that a decode tile
      of 16 rows with M = 1 reads one activation row, not sixteen copies of it (masked cp.async reads nothing).
    * ``GROUP_SIZE``: G (elements per scale along K), or 0 for channelwise (one scale column).
      ``NG`` = scale groups per K block: ``BLOCK_K // G`` when G < BLOCK_K, else 1.
    * ``W_IS_A``: the weight tile is the MMA's A operand and ``acc`` is ``[BLOCK_N, BLOCK_M]`` (transposed). With
      BLOCK_N >= 64 Triton then issues wgmma with the dequantized weights straight from registers (as Machete
      does), and the tiny activation tile is the shared-memory operand. Otherwise ``acc`` is ``[BLOCK_M, BLOCK_N]``.
    * ``KPERM``: relabel K (see :func:`_kperm`); ``DOT_F32``: interpreter-only fp32 dot (bf16 is raw uint16 there).
    """
    PREC: tl.constexpr = "ieee" if DOT_F32 else "tf32"   # (ignored for 16-bit operands)
    WPB: tl.constexpr = BLOCK_K // 8          # int32 words per row per K block
    WPG: tl.constexpr = WPB // NG             # words per scale group inside the block
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WPB)
    offs_g = tl.arange(0, NG)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_w[None, :]
    s_ptrs = s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
    # scale column of block kb: kb*NG (+g) when a block spans NG groups, kb*BK//G when a group spans blocks.
    if GROUP_SIZE == 0:
        s = tl.load(s_ptrs)
    elif NG > 1:
        s = tl.load(s_ptrs + kb_lo * NG)
    else:
        s = tl.load(s_ptrs + (kb_lo * BLOCK_K) // GROUP_SIZE)
    last = kb_hi - 1
    for kb in range(kb_lo, kb_hi):
        w = tl.load(w_ptrs + kb * WPB)
        x = tl.load(x_ptrs + kb * BLOCK_K, mask=row_ok[:, None], other=0.0)
        # Prefetch the next block's scales now (clamped, so in bounds); they are used one iteration later.
        if GROUP_SIZE == 0:
            s_next = s
        elif NG > 1:
            s_next = tl.load(s_ptrs + tl.minimum(kb + 1, last) * NG)
        else:
            s_next = tl.load(s_ptrs + (tl.minimum(kb + 1, last) * BLOCK_K) // GROUP_SIZE)
        wd = dequant_block(tl.reshape(w, [BLOCK_N, NG, WPG]), s, BLOCK_N, BLOCK_K, USE_ASM, not KPERM)
        if KPERM:
            x = _kperm(x, BLOCK_K)
            wd = _kperm(wd, BLOCK_K)
        if DOT_F32:
            x = x.to(tl.float32)
            wd = wd.to(tl.float32)
        if W_IS_A:   # acc^T[BN, BM] += W'[BN, BK] @ x^T[BK, BM]
            acc = tl.dot(wd, tl.trans(x), acc, input_precision=PREC)
        else:        # acc[BM, BN] += x[BM, BK] @ W'^T[BK, BN]
            acc = tl.dot(x, tl.trans(wd), acc, input_precision=PREC)
        s = s_next
    return acc


@triton.jit
def store_tile(out_ptr, bias_ptr, acc, rows, cols, M, N, stride_om, HAS_BIAS: tl.constexpr, EMU_RN: tl.constexpr):
    """``out[rows, cols] = RN(acc + bias)`` for the in-range part of the tile (fp32 ``acc [BM, BN]``);
    ``EMU_RN``: round via :func:`round_to` (interpreter), else the hardware conversion (RN as well)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if EMU_RN:
        y = round_to(acc, out_ptr.dtype.element_ty)
    else:
        y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], y, mask=mask)
