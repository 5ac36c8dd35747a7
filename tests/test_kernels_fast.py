"""CPU tests of pdqkit's fast W4A16 GEMM (kernels/w4a16*.py, kernels/ops.py, kernels/linear.py).

Reference (independent of the kernels): ``pack.packing.dequantize`` -> fp32 matmul (+ bias) -> one rounding; pass
criterion marlin-arithmetic.md §9B: |y - y_ref| <= ulp(max(|y|,|y_ref|)) + 2^-16 * sum|x*w|.
The Triton kernels themselves run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before
Triton is imported, and must not leak into other test modules). GPU tests: tests/test_kernels_fast_gpu.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pack.packing import dequantize, pack_int4

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ reference
def reference(x, wp, s, bias=None):
    n, k = wp.shape[0], wp.shape[1] * 8
    y = x.reshape(-1, k).float() @ dequantize(wp, s, (n, k)).float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def ulp(a, dtype):
    p, tiny = (7, 2.0**-133) if dtype == torch.bfloat16 else (10, 2.0**-24)
    _, e = torch.frexp(a.float())
    return torch.clamp(torch.ldexp(torch.ones_like(a, dtype=torch.float32), e - 1 - p), min=tiny)


def tolerance_ratio(y, x, wp, s, bias=None) -> float:
    """max |y - y_ref| / (ulp + 2^-16 sum|x w|); <= 1 passes."""
    n, k = wp.shape[0], wp.shape[1] * 8
    w = dequantize(wp, s, (n, k)).float()
    ref = reference(x, wp, s, bias).float().reshape(-1, n)
    yf = y.float().reshape(-1, n)
    bound = ulp(torch.maximum(yf.abs(), ref.abs()), y.dtype) + (x.reshape(-1, k).float().abs() @ w.abs().t()) * 2.0**-16
    return float(((yf - ref).abs() / bound).max())


def problem(m, n, k, group=128, dtype=torch.bfloat16, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    wp = pack_int4(torch.randint(-8, 8, (n, k), generator=g))
    groups = 1 if group == -1 else k // group
    s = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, wp, s, b


# ------------------------------------------------------------------------------------------------ helpers
def test_ulp_matches_nextafter():
    for dtype in (torch.bfloat16, torch.float16):
        a = (torch.randn(1000) * 100).to(dtype)
        nxt = torch.nextafter(a.abs().float(), torch.tensor(float("inf"))).to(dtype)
        # the next representable value of |a| in dtype is |a| + ulp(|a|)
        up = (a.abs().float() + ulp(a.abs(), dtype)).to(dtype)
        assert torch.equal(up[a != 0], torch.maximum(nxt, up)[a != 0])


def test_tolerance_catches_one_wrong_code():
    x, wp, s, _ = problem(4, 64, 256)
    y = reference(x, wp, s)
    assert tolerance_ratio(y, x, wp, s) == 0.0
    wrong = wp.clone()
    wrong[3, 5] ^= 0x7  # change three bits of one code: a weight error far above the tolerance
    assert tolerance_ratio(reference(x, wrong, s), x, wp, s) > 1.0


# ------------------------------------------------------------------------------------------------ CPU fallback
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_cpu_path_is_the_reference(dtype):
    from kernels.w4a16 import w4a16_gemm

    x, wp, s, b = problem(6, 128, 384, dtype=dtype, bias=True)
    x3 = x.reshape(2, 3, 384)
    y = w4a16_gemm(x3, wp, s, b)
    assert y.shape == (2, 3, 128) and y.dtype == dtype
    assert torch.equal(y, reference(x3, wp, s, b))
    assert w4a16_gemm(x[:0], wp, s).shape == (0, 128)


@pytest.mark.parametrize("mutate, msg", [
    (lambda x, wp, s, b: (x.float(), wp, s, b), "bfloat16 or float16"),
    (lambda x, wp, s, b: (x, wp.to(torch.int64), s, b), "int32"),
    (lambda x, wp, s, b: (x[:, :-128], wp, s, b), "last dim"),
    (lambda x, wp, s, b: (x[:, :320], wp[:, :40], s[:, :2], b), "K % 128"),
    (lambda x, wp, s, b: (x, wp[:96], s[:96], b), "N % 64"),
    (lambda x, wp, s, b: (x, wp, s.half(), b), "dtype"),
    (lambda x, wp, s, b: (x, wp, s[:, :3], b), "weight_scale must be"),
    (lambda x, wp, s, b: (x, wp, s, torch.zeros(64, dtype=x.dtype)), "bias"),
    (lambda x, wp, s, b: (x, wp.t().contiguous().t(), s, b), "contiguous"),
    (lambda x, wp, s, b: (x[:, :384], wp[:, :48].contiguous(), s[:, :4].contiguous(), b), "group size 96 unsupported"),
    (lambda x, wp, s, b: (x[:, :0], wp[:, :0].contiguous(), s[:, :0].contiguous(), b), "N and K positive"),
])
def test_bad_inputs_raise(mutate, msg):
    from kernels.w4a16 import w4a16_gemm

    x, wp, s, b = problem(3, 128, 512)
    with pytest.raises(ValueError, match=msg):
        w4a16_gemm(*mutate(x, wp, s, b))


# ------------------------------------------------------------------------------------------------ interpreter
_INTERP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {repo!r})
    from kernels.w4a16 import w4a16_gemm, w4a16_reference
    from kernels.w4a16_config import W4A16Config as C
    from tests.test_kernels_fast import problem, tolerance_ratio
    cases = [
        # (config, M, N, K, group, bias)
        (C("decode", 16, 64, 128, split_k=3, kperm=True, w_is_a=True), 5, 128, 512, 128, True),
        (C("decode", 16, 64, 128, split_k=1, kperm=True, w_is_a=True), 1, 64, 256, 128, False),
        (C("decode", 16, 64, 64, split_k=2, kperm=True, w_is_a=False), 17, 64, 384, 128, True),
        (C("decode", 32, 64, 256, split_k=2, kperm=True, w_is_a=True), 3, 128, 512, 128, False),
        (C("decode", 16, 128, 128, split_k=4, kperm=False, w_is_a=False), 2, 64, 1024, 128, False),
        (C("decode", 16, 64, 128, split_k=2, kperm=True, w_is_a=True), 4, 64, 512, -1, True),
        (C("decode", 16, 64, 256, split_k=1, kperm=False, w_is_a=True), 9, 64, 512, 64, False),
        (C("prefill", 32, 64, 64, kperm=False, w_is_a=False), 33, 128, 256, 128, True),
        (C("prefill", 16, 64, 128, kperm=True, w_is_a=True), 7, 192, 256, 128, False),
        (C("prefill", 16, 128, 256, kperm=True, w_is_a=False), 20, 64, 512, -1, False),
        (C("dequant_mm"), 3, 64, 256, 128, True),
        # the GEMVs (gemv_mma runs the CUDA-core kernel of the same tiling here: no inline PTX in the interpreter)
        (C("gemv", 1, 8, 256, num_warps=2, num_stages=2), 1, 64, 768, 128, True),
        (C("gemv", 4, 16, 512, num_warps=4, num_stages=3), 7, 64, 1536, 64, False),
        (C("gemv", 8, 2, 256, num_warps=1, num_stages=3), 5, 64, 512, -1, True),
        (C("gemv", 2, 4, 256, num_warps=1, num_stages=2), 3, 128, 1024, 512, False),
        (C("gemv_mma", 2, 4, 512, num_warps=2, num_stages=3), 2, 64, 1024, 128, True),
        (C("gemv_mma8", 16, 16, 128, num_warps=1, num_stages=3, chain=True), 13, 64, 384, 32, True),
        # the Gluon prefill kernel cannot be interpreted: the dispatcher runs the Triton tiled kernel instead
        (C("prefill_tma", 64, 64, 128, num_warps=4, num_stages=3), 70, 128, 256, 128, True),
        (C("prefill_wsp", 128, 128, 128, split_k=2, num_warps=4, num_stages=3), 70, 128, 256, 128, True),
        # the GEMVs with split-K: unequal splits (5 K blocks in 2, 2, 1), a split clamped to the K blocks there
        # are, a split starting at an odd block inside a scale group of two blocks, the fallback's 8-row programs
        (C("gemv", 4, 16, 256, split_k=3, num_warps=4, num_stages=2), 7, 64, 1280, 128, True),
        (C("gemv_mma", 2, 4, 512, split_k=8, num_warps=2, num_stages=3), 2, 64, 1024, -1, False),
        (C("gemv", 2, 8, 256, split_k=2, num_warps=1, num_stages=3), 3, 128, 1536, 512, True),
        (C("gemv_mma8", 16, 16, 256, split_k=2, num_warps=2, num_stages=3, chain=True), 13, 64, 768, 64, True),
    ]
    import kernels.w4a16_gemv as gemv_mod
    launched, plan = [], gemv_mod.split_plan
    def _record(*a, **kw):   # the K slices every GEMV launch made (the interpreter runs the CUDA-core GEMV)
        r = plan(*a, **kw)
        launched.append(r[1])
        return r
    gemv_mod.split_plan = _record
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        for i, (cfg, m, n, k, g, bias) in enumerate(cases):
            x, wp, s, b = problem(m, n, k, group=g, dtype=dtype, seed=i, bias=bias)
            y = w4a16_gemm(x, wp, s, b, config=cfg)
            out.append(dict(case=i, dtype=str(dtype), shape=list(y.shape), ratio=tolerance_ratio(y, x, wp, s, b),
                            cfg=repr(cfg)))
        # a strided bias (the kernels index bias[cols] without a stride: the wrapper makes it contiguous)
        x, wp, s, _ = problem(3, 128, 256, dtype=dtype, seed=99)
        b = torch.randn(256, generator=torch.Generator().manual_seed(5)).to(dtype)[::2]
        for cfg in cases[0][0], cases[7][0], cases[10][0], cases[11][0]:
            y = w4a16_gemm(x, wp, s, b, config=cfg)
            out.append(dict(case="strided bias", dtype=str(dtype), shape=list(y.shape), cfg=repr(cfg),
                            ratio=tolerance_ratio(y, x, wp, s, b.contiguous())))
    # activations that start 2 bytes past an aligned address (the GEMVs load them as int32 pairs / 16-byte vectors)
    for dtype in (torch.float16, torch.bfloat16):
        x, wp, s, _ = problem(3, 64, 512, dtype=dtype, seed=7)
        xo = torch.cat([torch.zeros(1, dtype=dtype), x.flatten()])[1:].view(3, 512)
        y = w4a16_gemm(xo, wp, s, None, config=cases[12][0])
        out.append(dict(case="offset x", dtype=str(dtype), shape=list(y.shape), cfg=repr(cases[12][0]),
                        ratio=tolerance_ratio(y, x, wp, s)))
    # a forced config that cannot run this K is refused, not launched over part of K
    x, wp, s, _ = problem(2, 64, 384)
    try:
        w4a16_gemm(x, wp, s, None, config=C("decode", 16, 64, 256, split_k=1, kperm=True, w_is_a=True))
        refused = ""
    except ValueError as e:
        refused = str(e)
    print("REFUSED " + refused)
    print("RESULT " + json.dumps(out))
    from kernels.w4a16 import census
    print("CENSUS " + json.dumps(census()))
    # the split-K launches (decode and the GEMVs) left every tile counter at zero
    from kernels.counters import pool
    bufs = [b for bs in pool("decode").values() for b in bs]
    print("COUNTERS " + json.dumps([len(bufs), sum(int(b.abs().sum()) for b in bufs)]))
    print("SPLITS " + json.dumps(launched))
    # round_to, the software fp32 -> bf16 rounding of the plain-Triton dequantization (GPUs before sm_90, and the
    # interpreter), on every bit pattern class: it must round like torch (RNE, overflow to inf) and keep NaN NaN.
    # The GPU's canonical NaN 0x7FFFFFFF once carried into the sign bit and came out as -0.0.
    import triton, triton.language as tl
    from kernels.w4a16_mainloop import round_to

    @triton.jit
    def _round(src, dst, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        v = tl.load(src + i, mask=i < n)
        tl.store(dst + i, round_to(v, tl.bfloat16).to(tl.int16, bitcast=True), mask=i < n)

    words = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x3F808000,
             0x3F818000, 0x3F808001, 0x00008000, 0x80000000, 0x00000001, 0x3F800000]
    src = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32).view(torch.float32)
    dst = torch.empty(len(words), dtype=torch.int16)
    _round[(1,)](src, dst, len(words), BLOCK=16)
    got, want = dst.view(torch.bfloat16).float(), src.to(torch.bfloat16).float()
    nan = [dict(word=hex(w), got=str(g.item()), want=str(e.item()), ok=bool((g.isnan() and e.isnan()) or
            (g.view(torch.int32) == e.view(torch.int32)))) for w, g, e in zip(words, got, want)]
    print("NAN " + json.dumps(nan))
""")


def test_triton_kernels_under_interpreter():
    """Every kernel family / K labelling / operand order / split-K, the GEMV with every ``block_m`` and both
    pipeline depths, fp16 and bf16 (fp32 dot in the interpreter), group 128, 64, 512 (> BLOCK_K) and channelwise,
    bias, odd M and M not a multiple of ``block_m`` — through Triton's interpreter on the CPU."""
    # "true", not "1": pdqkit must read TRITON_INTERPRET as Triton does (1/true/yes/on)
    env = dict(os.environ, TRITON_INTERPRET="true", PYTHONPATH=str(REPO), PDQKIT_W4A16_CENSUS="1")
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT.format(repo=str(REPO))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 2 * 23 + 2 * 4 + 2
    refused = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REFUSED "))
    assert "cannot run K=384 with group size 128" in refused, refused
    bad = [r for r in results if not r["ratio"] <= 1.0]
    assert not bad, bad
    # the launch census names the kernel that actually ran: the Gluon and inline-PTX kernels cannot run in the
    # interpreter, so their configs ran on the Triton tiled kernel / the CUDA-core GEMV, and the census says so
    cen = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("CENSUS "))[len("CENSUS "):])
    assert cen["prefill 128x256 [fallback for prefill_wsp bm128 bn128 bk128 w4 st3 sk2]"] == \
        {"calls": 2, "m_min": 70, "m_max": 70}
    assert cen["prefill 128x256 [fallback for prefill_tma bm64 bn64 bk128 w4 st3]"]["calls"] == 2
    assert cen["gemv 64x384 [fallback for gemv_mma8 bm16 bn16 bk128 w1 st3 chain]"]["calls"] == 2
    assert cen["gemv 64x1024 [fallback for gemv_mma bm2 bn4 bk512 w2 st3]"] == {"calls": 2, "m_min": 2, "m_max": 2}
    assert cen["gemv 64x768 [fallback for gemv_mma8 bm16 bn16 bk256 w2 st3 sk2 chain]"]["calls"] == 2
    assert cen["gemv 128x1536 [gemv bm2 bn8 bk256 w1 st3 sk2]"]["calls"] == 2
    n_bufs, left = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTERS "))[9:])
    assert n_bufs >= 1 and left == 0
    # the four split GEMV cases launched 3, 2, 2 and 2 slices (5 blocks in 3; 8 asked over 2; 6 in 2; 3 in 2), twice
    splits = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("SPLITS "))[7:])
    assert sorted(s for s in splits if s > 1) == [2] * 6 + [3] * 2, splits
    # one tile config on one shape at two M (case 7 at M = 33, the strided-bias run at M = 3): one entry
    assert cen["prefill 128x256 [prefill bm32 bn64 bk64 w4 st3]"] == {"calls": 4, "m_min": 3, "m_max": 33}
    assert sum(e["calls"] for e in cen.values()) == len(results)   # the refused config is not counted
    nan = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("NAN "))[len("NAN "):])
    assert len(nan) == 14 and all(r["ok"] for r in nan), [r for r in nan if not r["ok"]]


@pytest.mark.parametrize("kernel,bm,bn,bk,warps,dtype,chain", [
    ("gemv_mma", 1, 16, 1024, 4, "bf16", False), ("gemv_mma", 2, 8, 512, 2, "fp16", False),
    ("gemv_mma", 4, 2, 256, 1, "bf16", False), ("gemv_mma", 2, 8, 1024, 2, "bf16", True),
    ("gemv_mma", 4, 16, 512, 4, "fp16", True),
    ("gemv", 1, 16, 1024, 4, "bf16", False), ("gemv", 2, 8, 512, 2, "fp16", False),
    ("gemv_mma8", 8, 16, 512, 4, "bf16", False), ("gemv_mma8", 16, 32, 256, 2, "fp16", True),
    ("gemv_mma8", 16, 64, 128, 4, "bf16", False),
])
def test_gemv_k_loop_has_no_barrier_or_shared_memory(kernel, bm, bn, bk, warps, dtype, chain):
    """The GEMVs' design property, checked on the SASS of an ahead-of-time sm_90a compile (Triton's own ptxas, no
    GPU): the K loop has no CTA barrier and no shared-memory access (activations and scales reach the words' layout
    through asm loads, not a convert_layout; with ``chain`` the vector's words are split in registers), and
    gemv_mma issues one MMA per word and activation row, gemv_mma8 one per word and 8 activation rows."""
    from bench.gpu.sass_loop import compile_gemv, loop_stats

    st = loop_stats(compile_gemv(kernel, bm, bn, bk, warps, dtype, chain=chain))
    assert st["barriers"] == 0 and st["shared"] == 0, st
    words = bn * bk // 8 // (32 * warps)
    if kernel == "gemv_mma":
        assert st["opcodes"]["HMMA"] == words * bm, st
    elif kernel == "gemv_mma8":
        assert st["opcodes"]["HMMA"] == words * bm // 8, st
    else:
        assert st["opcodes"]["FFMA"] >= 8 * words * bm and st["opcodes"]["HMMA"] == 0, st


@pytest.mark.parametrize("bm,bn,bk,warps,stages,dtype,group", [
    (8, 16, 512, 1, 2, "bf16", 128), (8, 32, 512, 4, 2, "bf16", 128), (16, 32, 512, 4, 3, "fp16", 128),
    (8, 64, 256, 2, 6, "bf16", 0), (16, 16, 1024, 2, 4, "fp16", 64), (8, 32, 1024, 8, 2, "bf16", 256),
    (16, 64, 512, 4, 2, "bf16", 128),
])
def test_gemv_tma_k_loop_reads_words_from_its_tma_ring(bm, bn, bk, warps, stages, dtype, group):
    """The TMA-fed GEMV's design, checked on the SASS of ahead-of-time sm_90a compiles (no GPU): compiling at all
    proves that the four words of each 16-byte vector split into :func:`vec_layout` by register renaming
    (``convert_layout(..., assert_trivial=True)``; which word is which is checked on the GPU only); in the K loop
    the words arrive through shared memory (one 16-byte ``LDS`` per vector), both row halves' TMA copies are issued
    before the loop reads the slot (the refill of the previous block's slot, before this block's wait: issued after
    the reads, ptxas sank it behind the block's MMAs) behind the async-proxy fence that orders the slot's earlier
    reads before the copy, one MMA per word and 8 activation rows, and no register spills."""
    import re

    from bench.gpu.sass_loop import compile_gemv_tma, loop_stats, sass_text
    from kernels.w4a16_gemv_tma import gemv_tma_ok

    assert gemv_tma_ok(bn, bk, warps)   # only tilings the launcher runs
    compiled = compile_gemv_tma(bm, bn, bk, warps, stages, dtype, group, k=4096, bias=group == 0)
    st = loop_stats(compiled, "HMMA")
    words = bn * bk // 8 // (32 * warps)
    assert st["opcodes"]["HMMA"] == words * bm // 8, st
    assert st["opcodes"]["LDS"] == words // 4 and st["opcodes"]["STS"] == 0, st
    assert st["opcodes"]["UTMALDG"] == 2, st
    seq = st["sequence"]
    assert max(i for i, op in enumerate(seq) if op == "UTMALDG") < seq.index("LDS"), seq
    assert "FENCE" in seq[:seq.index("UTMALDG")], seq
    assert not re.findall(r"\b(?:LDL|STL)\b", sass_text(compiled))


def test_gemv_tma_refuses_what_it_cannot_run():
    """The TMA GEMV's launcher refuses, before anything is launched, tilings its layout cannot hold, groups smaller
    than a thread's 32-code vector, a group size the scales contradict, and mismatched operands (it is called
    directly, not through the dispatcher's checks)."""
    from kernels.w4a16_gemv_tma import gemv_tma_ok, w4a16_gemv_tma

    assert gemv_tma_ok(16, 512, 1) and gemv_tma_ok(64, 1024, 8) and gemv_tma_ok(16, 128, 1)
    assert not gemv_tma_ok(8, 512, 1)        # two halves of at least 8 rows (the MMA's row groups)
    assert not gemv_tma_ok(48, 512, 1)       # powers of two only
    assert not gemv_tma_ok(16, 2048, 4)      # block_k at most 1024
    assert not gemv_tma_ok(16, 128, 2)       # one (chunk, 8-row group) per warp at least
    assert not gemv_tma_ok(32, 1024, 2)      # 64 words per thread: spills
    x = torch.zeros(8, 1024, dtype=torch.bfloat16)
    wp = torch.zeros(64, 128, dtype=torch.int32)
    s = torch.ones(64, 8, dtype=torch.bfloat16)
    for kw, msg in ((dict(block_m=4), "block_m"), (dict(block_n=8), "tiling"), (dict(block_k=768), "tiling"),
                    (dict(num_stages=0), "tiling")):
        args = dict(block_m=8, block_n=16, block_k=512, num_warps=1, num_stages=2) | kw
        with pytest.raises(ValueError, match=msg):
            w4a16_gemv_tma(x, wp, s, None, 128, **args)
    kw = dict(block_m=8, block_n=16, block_k=512, num_warps=1, num_stages=2)
    with pytest.raises(ValueError, match="group size 16"):
        w4a16_gemv_tma(x, wp, torch.ones(64, 64, dtype=torch.bfloat16), None, 16, **kw)
    with pytest.raises(ValueError, match="group size 64 disagrees"):    # the scales say 128
        w4a16_gemv_tma(x, wp, s, None, 64, **kw)
    with pytest.raises(ValueError, match="group size -1 disagrees"):    # -1 (channelwise) needs one column
        w4a16_gemv_tma(x, wp, s, None, -1, **kw)
    with pytest.raises(ValueError, match="dtype"):
        w4a16_gemv_tma(x, wp, s.half(), None, 128, **kw)
    with pytest.raises(ValueError, match="last dim"):
        w4a16_gemv_tma(x[:, :512], wp, s, None, 128, **kw)
    with pytest.raises(ValueError, match="bias"):
        w4a16_gemv_tma(x, wp, s, torch.zeros(65, dtype=torch.bfloat16), 128, **kw)
    with pytest.raises(ValueError, match="K % 128"):                    # ragged N is fine, ragged K is not
        w4a16_gemv_tma(x[:, :1000], wp[:, :125], s[:, :5], None, 200, **kw)


@pytest.mark.parametrize("bm,bn,bk,warps,chain,dtype", [
    (8, 16, 128, 1, False, "bf16"), (16, 16, 512, 4, True, "bf16"), (8, 32, 256, 2, True, "fp16"),
    (16, 64, 1024, 8, False, "bf16"), (8, 16, 2048, 8, True, "fp16"),
])
def test_gemv_mma8_word_tiles_get_the_lane_layout_its_mma_needs(bm, bn, bk, warps, chain, dtype):
    """gemv_mma8's MMAs are right only if the 8 quads of a warp hold the same words of 8 rows: Triton must lay its
    ``[TR, 16]`` int32 word loads out with 16-byte vectors, 8 x 4 lanes and the warps along the tile rows. Checked on
    the TTGIR of ahead-of-time sm_90a compiles (the layout follows from the tile shape and the pointers' 16-byte
    alignment, which the launcher requires)."""
    import re

    from bench.gpu.sass_loop import compile_gemv

    ir = compile_gemv("gemv_mma8", bm, bn, bk, warps, dtype, prefetch=1, chain=chain).asm["ttgir"]
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<\{[^}]*\}>)", ir, re.M))
    tr = 8 * (bn // 16) * (bk // 128)
    loads = re.findall(rf"tt\.load [^:]*: tensor<{tr}x16x!tt\.ptr<i32>, (#\w+)>", ir)
    assert len(loads) == 4, loads   # both row halves: before the loop and the prefetch inside it
    want = (f"#ttg.blocked<{{sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [{warps}, 1], "
            "order = [1, 0]}>")
    assert {aliases[a] for a in loads} == {want}, {aliases[a] for a in loads}


def test_gemv_wrappers_refuse_unsupported_pipeline_depth_and_chain():
    """Both GEMV launchers refuse a register pipeline depth other than 1 or 2 before launching anything (a depth
    the kernel does not implement would read the wrong K blocks), and gemv_mma refuses ``chain`` on a tiling that
    gives a thread less than a 16-byte vector of each row half."""
    from kernels.w4a16_gemv import w4a16_gemv
    from kernels.w4a16_gemv_mma import w4a16_gemv_mma

    x = torch.randn(1, 512, dtype=torch.bfloat16)
    wp = torch.zeros(64, 64, dtype=torch.int32)
    s = torch.ones(64, 4, dtype=torch.bfloat16)
    for fn in (w4a16_gemv, w4a16_gemv_mma):
        with pytest.raises(ValueError, match="prefetch must be 1 or 2"):
            fn(x, wp, s, None, 128, block_m=1, block_n=8, block_k=512, num_warps=1, prefetch=3)
    with pytest.raises(ValueError, match="chain needs 4 words per thread"):
        w4a16_gemv_mma(x, wp, s, None, 128, block_m=1, block_n=2, block_k=512, num_warps=1, chain=True)


def test_gemv_mma8_launcher_refusals():
    """The full-MMA GEMV refuses, before launching, what would break its lane layout: a tiling with fewer tile rows
    than 8 per warp or rows not in groups of 8 per half, weights off a 16-byte boundary, groups of 16; and block_m
    other than 8 / 16 and pipeline depths other than 1 / 2 like the other GEMVs."""
    from kernels.w4a16_gemv_mma8 import w4a16_gemv_mma8

    x = torch.randn(8, 512, dtype=torch.bfloat16)
    wp = torch.zeros(64, 64, dtype=torch.int32)
    s = torch.ones(64, 4, dtype=torch.bfloat16)
    kw = dict(block_m=8, block_n=16, block_k=128, num_warps=1)
    for bad, msg in ((dict(num_warps=2), "num_warps"), (dict(block_n=8), "block_n % 16"),
                     (dict(block_k=64), "block_k % 128"), (dict(block_m=4), "block_m must be one of"),
                     (dict(prefetch=3), "prefetch must be 1 or 2")):
        with pytest.raises(ValueError, match=msg):
            w4a16_gemv_mma8(x, wp, s, None, 128, **{**kw, **bad})
    with pytest.raises(ValueError, match="16-byte boundary"):
        w4a16_gemv_mma8(x, torch.zeros(64 * 64 + 1, dtype=torch.int32)[1:].view(64, 64), s, None, 128, **kw)
    with pytest.raises(ValueError, match="group size 16"):
        w4a16_gemv_mma8(x, wp, torch.ones(64, 32, dtype=torch.bfloat16), None, 16, **kw)


def test_gemv_candidates_offer_chain_where_the_tiling_allows_it():
    """The autotuner times every ``gemv_mma`` tiling with and without ``chain`` where :func:`chain_ok` holds, and
    only there; the CUDA-core GEMV never chains."""
    from kernels.w4a16_autotune import gemv_candidates
    from kernels.w4a16_config import chain_ok

    for m in (1, 2, 4):
        cands = gemv_candidates(m, kernels=("gemv_mma", "gemv"))
        plain = {(c.kernel, c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) for c in cands if not c.chain}
        chained = {(c.kernel, c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) for c in cands if c.chain}
        assert chained == {t for t in plain if t[0] == "gemv_mma" and chain_ok(t[2], t[3], t[4])}
        assert chained and chained < plain


def test_gemv_split_candidates():
    """The autotuner times the GEMVs with split-K where the splits keep a K block each and make at most 16 programs
    per SM (on the 132-SM H200: down_proj's 16-row programs of 8 activation rows, 160 tiles, take every split up
    to 8; the two-row programs of M = 1, 1,280 tiles, none), every split (the decode kernel's too) as the slices it
    launches, so that no launch is timed twice."""
    from kernels.w4a16_autotune import GEMV_SPLITS, launch_variants, split_candidates
    from kernels.w4a16_config import W4A16Config as C

    mma8 = C("gemv_mma8", 8, 16, 1024, num_warps=4, num_stages=2, chain=True)
    # as the slices they launch: over 8 K blocks, 3 is 3 slices (3, 3, 2) and 6 is 4 (of 2), 4's launch
    assert split_candidates(mma8, 8, 2560, 8192, 132) == [1, 2, 3, 4, 8]
    assert split_candidates(mma8, 8, 2560, 8192, 66) == [1, 2, 3, 4]           # 8 splits: 1,280 > 16 x 66
    assert split_candidates(mma8, 8, 2560, 2048, 132) == [1, 2]                # two 1024-wide K blocks
    assert split_candidates(mma8, 8, 2560, 10240, 132) == [1, 2, 3, 4, 5]      # 10 blocks: 6 and 8 launch 5
    assert split_candidates(C("gemv_mma", 1, 2, 2048, num_warps=4, num_stages=2), 1, 2560, 8192, 132) == [1]
    assert [c.split_k for c in launch_variants(C("gemv", 4, 32, 512, num_warps=2, num_stages=2), 4, 2560, 8192,
                                               132)] == [1, *GEMV_SPLITS]                  # 16 blocks: none clamps
    from kernels.w4a16_config import effective_split
    assert [effective_split(5, s) for s in (1, 2, 3, 4, 5, 9)] == [1, 2, 3, 3, 5, 5]
    for kb in range(1, 65):   # the launches' slices: ceil(kb / s') blocks each, none empty, all blocks covered
        for want in range(1, 41):
            s = effective_split(kb, want)
            per = -(-kb // s)
            assert s <= max(1, min(want, kb)) and (s - 1) * per < kb <= s * per, (kb, want, s)
    # the decode kernel clamps the same way: 6 and 8 over 10 K blocks launch 5 slices, timed once
    dec = C("decode", 16, 64, 256, split_k=1, kperm=True, w_is_a=True)
    assert split_candidates(dec, 16, 3072, 2560, 132) == [2, 3, 4, 5, 10]


def test_packaged_table_stores_the_slices_it_launches():
    """Every split-K entry of the packaged H200 table (decode kernel and GEMVs) holds the number of K slices it
    launches, so that logs and the launch census name the launch that runs (a split the kernels clamp, e.g. 6 over
    10 K blocks = 5 slices, would not)."""
    import json

    from kernels.w4a16_config import CONFIG_DIR
    from kernels.w4a16_config import effective_split

    shapes = json.loads((CONFIG_DIR / "NVIDIA_H200.json").read_text())["shapes"]
    entries = [(shape, m, c) for shape, by_m in shapes.items() for m, c in by_m.items()
               if c["kernel"] in ("decode", "gemv", "gemv_mma", "gemv_mma8") and c["split_k"] > 1]
    assert len(entries) > 10
    for shape, m, c in entries:
        kb = int(shape.split("x")[1]) // c["block_k"]
        assert effective_split(kb, c["split_k"]) == c["split_k"], (shape, m, c)


def test_gemv_mma8_candidates():
    """The autotuner times the full-MMA GEMV from M = 3 on (every tiling :func:`mma8_ok` allows, 8..32 words a
    thread, both pipeline depths, with and without chain), 8- and 16-row programs at M = 16, and not at M <= 2."""
    from kernels.w4a16_autotune import candidates_for, gemv_mma8_candidates
    from kernels.w4a16_config import mma8_ok

    assert not [c for m in (1, 2) for c in candidates_for(m) if c.kernel == "gemv_mma8"]
    for m, bms in ((4, {8}), (8, {8}), (16, {8, 16})):
        cands = gemv_mma8_candidates(m)
        assert {c.block_m for c in cands} == bms and set(cands) <= set(candidates_for(m))
        assert all(mma8_ok(c.block_n, c.block_k, c.num_warps) for c in cands)
        assert {c.chain for c in cands} == {False, True} and {c.num_stages for c in cands} == {2, 3}
        assert all(8 <= c.block_n * c.block_k // 8 // (32 * c.num_warps) <= 32 for c in cands)


@pytest.mark.parametrize("bm,bn,bk,stages,dtype,group,split,wsp", [
    (128, 64, 128, 3, "bf16", 128, False, False), (256, 64, 64, 3, "bf16", 128, False, False),
    (64, 128, 128, 2, "fp16", 256, False, False), (256, 128, 64, 4, "bf16", 0, False, False),
    (128, 64, 128, 3, "bf16", 128, True, False), (256, 128, 64, 3, "fp16", 128, True, False),
    (256, 128, 128, 3, "bf16", 128, False, True), (128, 128, 128, 2, "bf16", 0, True, True),
    (256, 128, 64, 5, "fp16", 256, True, True), (128, 64, 128, 5, "bf16", 128, False, True),
    (256, 64, 64, 4, "fp16", 0, True, True),
])
def test_prefill_tma_compiles_to_register_operand_wgmma(bm, bn, bk, stages, dtype, group, split, wsp):
    """The Gluon prefill kernels' design, checked on ahead-of-time sm_90a compiles with the installed Triton (no
    GPU), with and without their split-K epilogue, ``prefill_tma`` and the warp-specialised ``prefill_wsp``.
    Compiling at all proves the layout claim their docstring makes: the dequantized tile is converted to wgmma's
    A-operand layout with ``assert_trivial=True``, i.e. each thread computed exactly its own fragment. The SASS then
    shows every wgmma taking A from registers (bk / 16 per K block and warpgroup program), a full wait after each
    block (an A operand in registers must not be overwritten while its wgmma runs; with one left in flight it was,
    on the H200), and no register spills (the split-K workspace holds whole tiles in the accumulator's order, so
    its addresses cost no registers: with masked [M, N] offsets ``prefill_wsp`` spilled)."""
    from bench.gpu.sass_loop import compile_prefill_tma, prefill_tma_stats

    st = prefill_tma_stats(compile_prefill_tma(bm, bn, bk, stages, dtype, group, split=split, wsp=wsp))
    programs = 2 if wsp else 1     # prefill_wsp: the two consumer warpgroups are separate code
    assert st["hgmma"] == st["hgmma_reg_a"] == programs * bk // 16, st
    assert st["waits"] and set(st["waits"]) == {"0x0"} and len(st["waits"]) == programs, st
    assert st["local"] == 0, st


@pytest.mark.parametrize("bm,bn,bk,stages,dtype,group", [
    (128, 128, 128, 4, "bf16", 128), (128, 64, 128, 5, "bf16", 128), (256, 64, 64, 4, "fp16", 0),
    (256, 128, 64, 3, "bf16", 256),
])
def test_prefill_wsp_stream_k_compiles_to_register_operand_wgmma(bm, bn, bk, stages, dtype, group):
    """``prefill_wsp``'s stream-K variant (a loop over the tiles of the CTA's share around the same K loop, the
    parts summed through the workspace) keeps the design the test above checks: register-A wgmmas, one full wait
    per K block and warpgroup, no spills."""
    from bench.gpu.sass_loop import compile_prefill_tma, prefill_tma_stats

    st = prefill_tma_stats(compile_prefill_tma(bm, bn, bk, stages, dtype, group, wsp=True, stream=True))
    assert st["hgmma"] == st["hgmma_reg_a"] == 2 * bk // 16, st
    assert st["waits"] and set(st["waits"]) == {"0x0"} and len(st["waits"]) == 2, st
    assert st["local"] == 0, st


_STREAM_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import torch, triton, triton.language as tl
    from kernels.w4a16_prefill import stream_owners, stream_parts, stream_span

    @triton.jit
    def spans(out, G, W):
        c = tl.program_id(0)
        lo, hi = stream_span(c, G, W)
        tl.store(out + 2 * c, lo)
        tl.store(out + 2 * c + 1, hi)

    @triton.jit
    def owners(out, parts, KB, G, W, NH: tl.constexpr):
        t = tl.program_id(0)
        cf, cl = stream_owners(t, KB, G, W)
        tl.store(out + 2 * t, cf)
        tl.store(out + 2 * t + 1, cl)
        for c in range(cf, cl + 1):
            for h in tl.static_range(NH):
                own, first, rest = stream_parts(c, cf, G, NH, h)
                base = parts + ((t * G + c) * NH + h) * 3
                tl.store(base, own)
                tl.store(base + 1, first)
                tl.store(base + 2, rest)

    res = []
    for tiles, kb, sms in ((1, 1, 132), (1, 20, 132), (7, 3, 4), (48, 20, 132), (96, 20, 132), (80, 16, 132),
                           (144, 20, 132), (264, 20, 132), (512, 20, 132), (5, 64, 132), (13, 7, 11)):
        w = tiles * kb
        g = min(sms, w)
        a = torch.zeros(2 * g, dtype=torch.int32)
        b = torch.zeros(2 * tiles, dtype=torch.int32)
        p = torch.zeros(tiles * g * 2 * 3, dtype=torch.int32)
        spans[(g,)](a, g, w)
        owners[(tiles,)](b, p, kb, g, w, 2)
        res.append(dict(tiles=tiles, kb=kb, g=g, spans=a.tolist(), owners=b.tolist(), parts=p.tolist()))
    print("RESULT " + json.dumps(res))
""")


def test_prefill_wsp_stream_k_partition():
    """The stream-K arithmetic ``prefill_wsp`` runs (:func:`kernels.w4a16_prefill.stream_span`, ``stream_owners``
    and ``stream_parts``, interpreted on the CPU) against brute force over eleven grids (one step per CTA, CTAs
    inside one tile, tiles inside one CTA's share, whole tiles per CTA), two tickets per tile: the shares cover every
    step once, each tile's owners are exactly the CTAs whose shares meet it, and the workspace slots of a shared
    tile's owners are the ones its reader sums, in step order, inside the ``[2, G, 2]`` workspace, none written
    twice in a launch."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT.format(repo=str(REPO))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in json.loads(line[len("RESULT "):]):
        tiles, kb, g = r["tiles"], r["kb"], r["g"]
        spans = [tuple(r["spans"][2 * c:2 * c + 2]) for c in range(g)]
        steps = [w for lo, hi in spans for w in range(lo, hi)]
        assert steps == list(range(tiles * kb)) and all(hi > lo for lo, hi in spans), r
        slots = []
        for t in range(tiles):
            cf, cl = r["owners"][2 * t:2 * t + 2]
            meet = [c for c, (lo, hi) in enumerate(spans) if lo < (t + 1) * kb and hi > t * kb]
            assert meet == list(range(cf, cl + 1)), (r, t, meet)
            if cl == cf:
                continue    # stored directly, no workspace
            for h in range(2):
                own, first, rest = zip(*(r["parts"][((t * g + c) * 2 + h) * 3:][:3] for c in range(cf, cl + 1)))
                assert set(first) == {first[0]} and set(rest) == {rest[0]}, (r, t, h)
                # the reader sums the owners' slots in step order (owner cf's tail first), all in the workspace
                assert [first[0]] + [rest[0] + s * 2 for s in range(cl - cf)] == list(own), (r, t, h, own)
                assert all(0 <= o < 2 * g * 2 for o in own), (r, t, h, own)
                slots += own
        assert len(slots) == len(set(slots)), r    # no slot written twice in a launch


def test_prefill_tma_config_and_candidates():
    """``prefill_tma`` configs: warps follow block_n (one warp per 16 weight rows), one scale per row and K block
    (groups that are a multiple of block_k, or channelwise); the autotuner's tilings fit the shared memory and are
    tried from M = 17 on (64-row tiles up to M = 64)."""
    from kernels.w4a16_autotune import candidates_for, prefill_tma_candidates
    from kernels.w4a16_config import W4A16Config

    c = W4A16Config("prefill_tma", 128, 64, 128, num_warps=4, num_stages=3)
    assert c.fits(2560, 128) and c.fits(2560, 2560) and c.fits(4096, 256) and not c.fits(2560, 64)
    assert not c.fits(2560 + 64, 128) and W4A16Config("prefill_tma", 128, 64, 64, num_warps=4).fits(2560, 64)
    for bad, msg in ((dict(num_warps=8), "num_warps = block_n / 16"), (dict(block_n=256, num_warps=16), "block_n"),
                     (dict(block_m=32), "block_m"), (dict(block_k=256), "block_k"), (dict(num_stages=1), "2..6"),
                     (dict(kperm=True), "no K relabelling"), (dict(chain=True), "chain")):
        with pytest.raises(ValueError, match=msg):
            W4A16Config(**{**dict(kernel="prefill_tma", block_m=128, block_n=64, block_k=128, num_warps=4,
                                  num_stages=3), **bad})
    cands = prefill_tma_candidates()
    assert len(cands) == len(set(cands)) >= 24
    assert all(c.num_stages * (c.block_m * c.block_k * 2 + c.block_n * c.block_k // 2) <= 200 << 10 for c in cands)
    for m in (32, 64):
        assert {c.block_m for c in candidates_for(m) if c.kernel == "prefill_tma"} == {64}
    assert {c.block_m for c in candidates_for(128) if c.kernel == "prefill_tma"} == {64, 128}
    assert {c.block_m for c in candidates_for(1024) if c.kernel == "prefill_tma"} == {64, 128, 256}
    assert not [c for m in (1, 4, 16) for c in candidates_for(m) if c.kernel == "prefill_tma"]
    assert W4A16Config("prefill_tma", 128, 64, 128, split_k=3, num_warps=4).split_k == 3


def test_prefill_wsp_config_candidates_and_splits():
    """``prefill_wsp`` configs: 128 or 64 weight rows on a 4-warp default partition, 2..6 ring slots, split-K
    allowed; the autotuner's tilings fit 224 KB of ring (and, with 64 rows, the warpgroups' reduction buffer) and
    are tried from M = 65 on (256-row tiles from M = 256); split-K
    values for both Gluon kernels only where the tiles leave SMs idle; ``prefill_wsp``'s stream-K (not with split-K,
    written to tables only when on) where its tiles are fewer than four per SM."""
    import dataclasses

    from kernels.w4a16_autotune import (base_variant, candidates_for, launch_variants, prefill_wsp_candidates,
                                        split_candidates)
    from kernels.w4a16_config import W4A16Config

    base = dict(kernel="prefill_wsp", block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=3)
    c = W4A16Config(**base, split_k=2)
    assert c.fits(2560, 128) and c.fits(2560, 2560) and not c.fits(2560, 64) and not c.fits(2560 + 64, 128)
    for bad, msg in ((dict(block_n=256), "block_n 64/128"), (dict(num_warps=8), "num_warps 4"),
                     (dict(num_stages=7), "2..6"), (dict(block_k=256), "block_k"), (dict(w_is_a=True), "operand")):
        with pytest.raises(ValueError, match=msg):
            W4A16Config(**{**base, **bad})
    assert not [c for m in (16, 64) for c in candidates_for(m) if c.kernel == "prefill_wsp"]
    assert {c.block_m for c in candidates_for(128) if c.kernel == "prefill_wsp"} == {128}
    cands = prefill_wsp_candidates(1024)
    assert {c.block_m for c in cands} == {128, 256} and set(cands) <= set(candidates_for(1024))
    assert {c.block_n for c in cands} == {64, 128} and {c.num_stages for c in cands if c.block_n == 64} >= {4, 5}
    assert all(c.num_stages * (c.block_m * c.block_k * 2 + c.block_n * c.block_k // 2)
               + (64 * c.block_m * 4 if c.block_n == 64 else 0) <= 224 << 10 for c in cands)
    wsp = W4A16Config(**base)
    assert split_candidates(wsp, 256, 2560, 8192, 132) == [1, 2, 3, 4]      # 20 x 2 tiles on 132 SMs
    assert split_candidates(wsp, 256, 16384, 2560, 132) == [1]              # 128 x 2 tiles
    stream = W4A16Config(**base, stream_k=True)
    assert "stream" in stream.brief() and stream.to_json()["stream_k"] and "stream_k" not in wsp.to_json()
    assert W4A16Config(**stream.to_json()) == stream and W4A16Config(**wsp.to_json()) == wsp
    for bad in (dict(base, split_k=2), dict(base, kernel="prefill_tma", num_warps=8)):
        with pytest.raises(ValueError, match="stream_k"):
            W4A16Config(**bad, stream_k=True)
    assert launch_variants(wsp, 256, 2560, 8192, 132) == [dataclasses.replace(wsp, split_k=s) for s in (1, 2, 3, 4)
                                                          ] + [stream]    # 40 tiles
    assert launch_variants(wsp, 4096, 16384, 2560, 132) == [wsp]            # 4096 tiles
    assert launch_variants(stream, 1024, 2560, 8192, 132) == [wsp, stream]  # 160 tiles
    assert base_variant(dataclasses.replace(stream, num_stages=4)) == dataclasses.replace(wsp, num_stages=4)
    tma = W4A16Config("prefill_tma", 128, 64, 128, num_warps=4, num_stages=3)
    assert launch_variants(tma, 256, 3072, 2560, 132) == [dataclasses.replace(tma, split_k=s) for s in (1, 2, 3, 4)]
    assert split_candidates(tma, 256, 3072, 2560, 132) == [1, 2, 3, 4]      # 48 x 2 tiles: under 2 per SM
    assert split_candidates(tma, 1024, 3072, 2560, 132) == [1]              # 384 tiles
    assert split_candidates(dataclasses.replace(tma, block_k=64), 64, 512, 128, 132) == [1, 2]   # 2 K blocks


def test_heuristic_tma_for_untuned_shapes():
    """Untuned shapes at 32 < M < 1024 take the Gluon prefill kernel where the caller says it runs (``tma``): 64-row
    tiles up to M = 64 and where 128-row tiles would not fill the SMs, else 128-row tiles; nothing where its K blocks
    cannot hold whole scale groups. Without ``tma`` the split-K / Triton tiles stay (other GPUs, unaligned inputs)."""
    from kernels.w4a16_config import heuristic_config, heuristic_tma, select_config

    assert heuristic_tma(32, 3072, 2560, 128, 132) is None and heuristic_tma(1024, 3072, 2560, 128, 132) is None
    c = heuristic_tma(33, 16384, 2560, 128, 132)
    assert (c.kernel, c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) == \
        ("prefill_tma", 64, 64, 128, 4, 4)
    assert heuristic_tma(256, 3072, 2560, 128, 132).block_m == 64      # 2 x 48 = 96 tiles of 128 rows < 132 SMs
    c = heuristic_tma(256, 16384, 2560, 128, 132)                       # 2 x 256 tiles
    assert (c.block_m, c.num_stages) == (128, 3)
    assert heuristic_tma(128, 8192, 8192, 128, 132).block_m == 64      # 128 tiles of 128 rows: < 1 per SM ...
    assert heuristic_tma(128, 8192, 8192, 128, 64).block_m == 128       # ... but 2 per SM on a 64-SM GPU
    assert heuristic_tma(129, 8192, 8192, 128, 132).block_m == 128      # 256 tiles
    assert heuristic_tma(300, 512, 2560, 2560, 132).block_m == 64       # channelwise scales
    assert heuristic_tma(300, 512, 2560, 64, 132) is None and heuristic_tma(300, 512, 2624, 128, 132) is None
    assert heuristic_tma(300, 544, 2560, 128, 132) is None              # N not a multiple of 64
    assert heuristic_config(300, 512, 2560, 128, 132, tma=True).kernel == "prefill_tma"
    assert heuristic_config(300, 512, 2560, 128, 132).kernel == "prefill"
    assert heuristic_config(200, 512, 2560, 128, 132).kernel == "decode"
    assert heuristic_config(200, 512, 2560, 64, 132, tma=True).kernel == "decode"
    assert select_config(300, 512, 2560, 128, "No Such GPU", 132, tma=True).kernel == "prefill_tma"


def test_prefill_tma_launcher_refusals():
    """The Gluon launchers refuse what their tiles cannot run before anything is launched (CPU tensors suffice)."""
    from kernels.w4a16_prefill_tma import w4a16_prefill_tma
    from kernels.w4a16_prefill_wsp import w4a16_prefill_wsp

    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    wp, s = torch.zeros(64, 32, dtype=torch.int32), torch.ones(64, 2, dtype=torch.bfloat16)
    for kw, msg in ((dict(block_k=256), "block_k must be 64 or 128"), (dict(block_n=32), "block_n must be 64"),
                    (dict(block_m=24), "block_m a multiple of 16")):
        with pytest.raises(ValueError, match=msg):
            w4a16_prefill_tma(x, wp, s, None, 128, **{**dict(block_m=64, block_n=64, block_k=128), **kw})
    with pytest.raises(ValueError, match="group size 64"):
        w4a16_prefill_tma(x, wp, torch.ones(64, 4, dtype=torch.bfloat16), None, 64, block_m=64, block_n=64)
    with pytest.raises(ValueError, match="split_k >= 1"):
        w4a16_prefill_tma(x, wp, s, None, 128, block_m=64, block_n=64, split_k=0)
    for kw, msg in ((dict(block_k=256), "block_k must be 64 or 128"), (dict(block_m=24), "multiple of 16"),
                    (dict(block_m=512), "multiple of 16"), (dict(split_k=0), "split_k >= 1"),
                    (dict(split_k=2, stream_k=True), "stream_k replaces split-K")):
        with pytest.raises(ValueError, match=msg):
            w4a16_prefill_wsp(x, wp, s, None, 128, **{**dict(block_m=64, block_k=128), **kw})


def test_gemv_mma_chain_frees_accumulator_registers():
    """``chain`` (:mod:`kernels.w4a16_gemv_mma`): the four words of a thread's 16-byte vector share one accumulator
    set, so a thread holding 8 words of each row half (gate_up's tuned tiling) needs 4 x 6 = 24 fewer accumulator
    registers, with the same K loop (same MMAs, no barrier, no shared memory). Checked on ahead-of-time sm_90a
    compiles (cuobjdump's register count)."""
    from bench.gpu.sass_loop import compile_gemv, loop_stats, registers

    per_word = compile_gemv("gemv_mma", 1, 8, 512, 1, prefetch=1, chain=False)
    chained = compile_gemv("gemv_mma", 1, 8, 512, 1, prefetch=1, chain=True)
    a, b = loop_stats(per_word), loop_stats(chained)
    assert b["barriers"] == 0 and b["shared"] == 0, b
    assert b["opcodes"]["HMMA"] == a["opcodes"]["HMMA"] == 16, (a, b)
    assert registers(chained) <= registers(per_word) - 24, (registers(chained), registers(per_word))


# ------------------------------------------------------------------------------------------------ configs
def test_config_validation():
    from kernels.w4a16_config import W4A16Config

    with pytest.raises(ValueError, match="kernel must be one of"):
        W4A16Config("gemm")
    with pytest.raises(ValueError, match="gemv needs block_m"):
        W4A16Config("gemv")               # block_m 16: the GEMV takes 1..8 activation rows
    with pytest.raises(ValueError, match="gemv_mma needs"):
        W4A16Config("gemv_mma", 8, 16, 512, num_stages=2)
    W4A16Config("gemv_mma", 1, 8, 512, num_warps=1, num_stages=2, chain=True)   # 4 words per thread and row half
    for bad in (dict(kernel="gemv_mma", block_m=1, block_n=4, block_k=512, num_warps=2, num_stages=2),
                dict(kernel="gemv", block_m=1, block_n=8, block_k=512, num_warps=1, num_stages=2),
                dict(kernel="decode")):
        with pytest.raises(ValueError, match="chain is a gemv_mma option"):
            W4A16Config(chain=True, **bad)
    with pytest.raises(ValueError, match="power of two <= 64"):
        W4A16Config("gemv", 1, 128, 512, num_stages=2)
    W4A16Config("gemv_mma8", 16, 16, 512, num_warps=4, num_stages=2, chain=True)
    for bad, msg in ((dict(block_m=4), "block_m 8 or 16"), (dict(block_k=64), "block_m 8 or 16"),
                     (dict(block_n=8), "block_n in 16..128"), (dict(num_warps=8), "num_warps"),
                     (dict(split_k=0), "split_k >= 1"), (dict(num_stages=4), "num_stages 2 or 3")):
        with pytest.raises(ValueError, match=msg):
            W4A16Config(**{**dict(kernel="gemv_mma8", block_m=8, block_n=16, block_k=512, num_warps=4,
                                  num_stages=2), **bad})
    with pytest.raises(ValueError, match="split_k >= 1"):
        W4A16Config("gemv", 1, 16, 512, split_k=0, num_stages=2)
    assert W4A16Config("gemv_mma", 1, 16, 512, split_k=3, num_stages=2).brief() == "gemv_mma bm1 bn16 bk512 w4 st2 sk3"
    with pytest.raises(ValueError, match="num_stages 2 or 3"):
        W4A16Config("gemv", 1, 16, 512, num_stages=4)
    g = W4A16Config("gemv_mma", 2, 8, 1024, num_stages=3)
    assert g.fits(2048, 128) and not g.fits(2560, 128) and g.fits(4096, 2048)
    with pytest.raises(ValueError, match="block_k"):
        W4A16Config("decode", block_k=32)
    with pytest.raises(ValueError, match="power of two"):
        W4A16Config("decode", block_n=96)
    with pytest.raises(ValueError, match="split-K"):
        W4A16Config("prefill", split_k=2)
    with pytest.raises(ValueError, match="w_is_a"):
        W4A16Config("decode", block_n=32, w_is_a=True)
    c = W4A16Config("decode", block_k=256)
    assert not c.fits(384, 128) and c.fits(512, 128) and not W4A16Config("decode", block_k=128).fits(512, 96)


def test_config_table_lookup(tmp_path, monkeypatch):
    import kernels.w4a16_config as wc

    a = wc.W4A16Config("decode", 16, 64, 128, split_k=4, kperm=True, w_is_a=True)
    b = wc.W4A16Config("prefill", 128, 128, 64, num_warps=8)
    (tmp_path / "Fake_GPU_9.json").write_text(json.dumps(
        {"device": "Fake GPU 9", "shapes": {"256x512": {"1": a.to_json(), "64": a.to_json(), "4096": b.to_json()}}}))
    monkeypatch.setattr(wc, "CONFIG_DIR", tmp_path)
    monkeypatch.delenv("PDQKIT_W4A16_TABLE", raising=False)
    wc._load_table.cache_clear()
    try:
        assert wc.select_config(1, 256, 512, 128, "Fake GPU 9", 10) == a
        assert wc.select_config(2, 256, 512, 128, "Fake GPU 9", 10) == a        # next bucket up
        assert wc.select_config(65, 256, 512, 128, "Fake GPU 9", 10) == b
        assert wc.select_config(10**6, 256, 512, 128, "Fake GPU 9", 10) == b    # beyond the table: last entry
        h = wc.select_config(1, 512, 512, 128, "Fake GPU 9", 10)                # shape not tuned: heuristic
        assert h == wc.heuristic_config(1, 512, 512, 128, 10) and h.kernel == "decode" and h.split_k >= 1
        assert wc.select_config(300, 512, 512, 128, "Other", 132).kernel == "prefill"
        assert wc.select_config(3000, 512, 512, 128, "Other", 132).kernel == "dequant_mm"
        # a tuned entry wins over the GEMV heuristic
        assert wc.select_config(1, 256, 512, 128, "Fake GPU 9", 10, gemv=True) == a
    finally:
        wc._load_table.cache_clear()


def test_config_table_override(tmp_path, monkeypatch):
    """``$PDQKIT_W4A16_TABLE`` replaces the packaged table with a file written by the autotuner; a file that is
    missing, not a table, or tuned on another GPU is refused with its name, never silently ignored."""
    import kernels.w4a16_config as wc

    a = wc.W4A16Config("prefill_wsp", 128, 64, 128, num_warps=4, num_stages=5)
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"device": "NVIDIA H200", "shapes": {"3072x2560": {"4096": a.to_json()}}}))
    packaged = wc.load_table("NVIDIA H200")
    assert (3072, 2560) in packaged and (768, 512) not in packaged
    try:
        monkeypatch.setenv("PDQKIT_W4A16_TABLE", str(own))
        assert wc.load_table("NVIDIA H200") == {(3072, 2560): [(4096, a)]}
        assert wc.select_config(300, 3072, 2560, 128, "NVIDIA H200", 132, gemv=True, tma=True) == a
        assert wc.select_config(1, 3072, 2560, 128, "NVIDIA H200", 132, gemv=True) == a   # the file alone decides
        # a shape the file lacks gets the heuristic, not the packaged entry
        assert wc.select_config(1, 2560, 2048, 128, "NVIDIA H200", 132, gemv=True) == \
            wc.heuristic_config(1, 2560, 2048, 128, 132, gemv=True)
        with pytest.raises(ValueError, match=r"PDQKIT_W4A16_TABLE=.*mine\.json: tuned on 'NVIDIA H200', this GPU is "
                                             r"'NVIDIA H100 80GB HBM3'"):
            wc.load_table("NVIDIA H100 80GB HBM3")
        bad = {"missing.json": None, "garbled.json": "{not json", "field.json": json.dumps(
            {"device": "NVIDIA H200", "shapes": {"3072x2560": {"1": {"kernel": "decode", "bogus": 1}}}}),
               "shape.json": json.dumps({"device": "NVIDIA H200", "shapes": {"3072by2560": {}}})}
        for name, text in bad.items():
            if text is not None:
                (tmp_path / name).write_text(text)
            monkeypatch.setenv("PDQKIT_W4A16_TABLE", str(tmp_path / name))
            with pytest.raises(ValueError, match=rf"PDQKIT_W4A16_TABLE=.*{name}: "
                                                 rf"{'no such file' if text is None else 'not a tuned table'}"):
                wc.select_config(1, 3072, 2560, 128, "NVIDIA H200", 132)
        monkeypatch.setenv("PDQKIT_W4A16_TABLE", "")   # empty = unset: the packaged table again
        assert wc.load_table("NVIDIA H200") == packaged
    finally:
        wc._load_table.cache_clear()


def test_launch_census_on_the_cpu_path(monkeypatch):
    """The census (off by default) counts calls per kernel that ran and shape, with the M range; reset empties it."""
    import kernels.w4a16 as w

    assert w.census() == {}   # $PDQKIT_W4A16_CENSUS is not set for the test session
    monkeypatch.setattr(w, "_CENSUS", {})
    for m in (3, 1, 7):
        x, wp, s, _ = problem(m, 64, 256, seed=m)
        w.w4a16_gemm(x, wp, s)
    x, wp, s, _ = problem(2, 128, 256)
    w.w4a16_gemm(x.reshape(1, 2, 256), wp, s)
    w.w4a16_gemm(x[:0], wp, s)   # M = 0 launches nothing
    want = {"reference 64x256": {"calls": 3, "m_min": 1, "m_max": 7},
            "reference 128x256": {"calls": 1, "m_min": 2, "m_max": 2}}
    assert w.census(reset=True) == want
    assert w.census() == {}


@pytest.mark.parametrize("m,k,group,want", [
    (1, 512, 128, ("gemv_mma", 1, 2, 512, 1)),
    (2, 2560, 128, ("gemv_mma", 2, 2, 512, 1)),
    (1, 8192, 128, ("gemv_mma", 1, 4, 1024, 4)),
    (2, 4096, -1, ("gemv_mma", 2, 4, 1024, 4)),      # channelwise
    (1, 4608, 128, ("gemv_mma", 1, 2, 512, 1)),      # long K, not a multiple of 1024
    (1, 2304, 128, ("gemv_mma", 1, 2, 256, 1)),      # K a multiple of 256 only
    (1, 2304, 32, ("gemv_mma", 1, 2, 256, 1)),
    (1, 640, 128, None),                             # K not a multiple of 256
    (1, 1536, 384, None),                            # a 384 group neither holds nor lies inside a 512 block
    # M = 3..16: the full-MMA GEMV in 8-row programs
    (3, 2560, 128, ("gemv_mma8", 8, 16, 512, 4)),
    (8, 4096, 128, ("gemv_mma8", 8, 16, 1024, 8)),
    (5, 3072, 32, ("gemv_mma8", 8, 16, 1024, 8)),
    (16, 2048, -1, ("gemv_mma8", 8, 16, 1024, 8)),   # 2M weights: up to M = 16
    (16, 16384, 128, None),                          # 2^24 weights > 2^23: split-K from M = 9
    (8, 8192, 128, ("gemv_mma8", 8, 16, 1024, 8)),
    (17, 2048, 128, None),                           # M > 16: split-K
    (4, 2304, 128, None),                            # K not a multiple of 512
])
def test_heuristic_gemv_for_untuned_shapes(m, k, group, want):
    from kernels.w4a16_config import heuristic_config, select_config

    g = k if group < 0 else group
    got = select_config(m, 1024, k, g, "No Such GPU", 132, gemv=True)
    if want is None:
        assert got.kernel == "decode"
    else:
        assert (got.kernel, got.block_m, got.block_n, got.block_k, got.num_warps) == want
        assert got.fits(k, g) and got.num_stages == 3 and got.chain == (got.kernel == "gemv_mma8" and k % 1024 == 0)
    # without the caller's word that the GEMVs' PTX runs: the split-K heuristic, as before
    assert heuristic_config(m, 1024, k, g, 132).kernel == "decode"


def test_heuristic_gemv_mma8_by_matrix_size():
    """The full-MMA GEMV's rules that depend on N: 32 rows over 8 warps, chained, for N >= 8192 (K a multiple of
    512 only); 8-row programs at M = 9..16 only for matrices of at most 2^23 weights (larger ones lost to split-K
    on the H200); and on K: split-K for long K at M <= 8."""
    from kernels.w4a16_config import W4A16Config, heuristic_gemv

    assert heuristic_gemv(8, 16384, 2560, 128) == W4A16Config("gemv_mma8", 8, 32, 512, 1, 8, 2, chain=True)
    assert heuristic_gemv(4, 4096, 2560, 128) == W4A16Config("gemv_mma8", 8, 16, 512, 1, 4, 3)
    assert heuristic_gemv(16, 2048, 2560, 128) == W4A16Config("gemv_mma8", 8, 16, 512, 1, 4, 3)
    assert heuristic_gemv(16, 16384, 2560, 128) is None and heuristic_gemv(9, 3328, 2560, 128) is None
    assert heuristic_gemv(8, 8200, 2560, 128) is None    # N not a multiple of the 32-row program
    # long K at M = 3..8: split-K, 2 slices below K = 16384, 3 from there; none at M <= 2 or for shorter K
    assert heuristic_gemv(4, 2560, 8192, 128) == W4A16Config("gemv_mma8", 8, 16, 1024, 2, 8, 3, chain=True)
    assert heuristic_gemv(8, 3584, 18944, 128) == W4A16Config("gemv_mma8", 8, 16, 512, 3, 4, 3)
    assert heuristic_gemv(3, 4096, 14336, 128).split_k == 2 and heuristic_gemv(8, 2048, 16384, 128).split_k == 3
    assert heuristic_gemv(2, 2560, 8192, 128).split_k == 1 and heuristic_gemv(8, 2560, 4096, 128).split_k == 1
    assert heuristic_gemv(8, 8192, 8192, 128).split_k == 1     # not measured on N >= 8192


# ------------------------------------------------------------------------------------------------ op + module
def test_op_schema_and_fake():
    import kernels.ops  # noqa: F401

    x, wp, s, b = problem(5, 64, 256, bias=True)
    torch.library.opcheck(torch.ops.pdqkit.w4a16_gemm, (x, wp, s, b))
    torch.library.opcheck(torch.ops.pdqkit.w4a16_gemm, (x.reshape(5, 1, 256), wp, s, None))
    f = torch.compile(lambda x: torch.ops.pdqkit.w4a16_gemm(x, wp, s, b) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(f(x), reference(x, wp, s, b) * 2)


def test_w4a16_linear_module():
    from kernels.linear import W4A16Linear

    x, wp, s, b = problem(3, 128, 256, bias=True)
    lin = W4A16Linear(wp, s.float(), b, dtype=torch.bfloat16)
    assert (lin.in_features, lin.out_features) == (256, 128) and "group_size=128" in repr(lin)
    assert torch.equal(lin(x), reference(x, wp, s, b))
    with pytest.raises(TypeError, match="activations"):
        lin(x.half())


@pytest.fixture(scope="module")
def micro_w4a16(tmp_path_factory):
    from bench import factory
    from pack import quantize

    d = tmp_path_factory.mktemp("w4a16")
    base = factory.save_random_checkpoint("micro", d / "bf16", seed=0)
    assert quantize.main([str(base), "-o", str(d / "w4a16"), "--no-progress"]) == 0
    return d / "w4a16"


def test_swap_hf_model(micro_w4a16, monkeypatch):
    """Swap on a real transformers load of a pack-quantized checkpoint: the same logits as compressed-tensors'
    own decompression (bit for bit on the CPU, whose path is the pure-torch reference) and the same greedy tokens.
    Tile counters are reserved on GPUs only (the GPU test checks that they are)."""
    from transformers import AutoModelForCausalLM

    import kernels.linear
    from kernels.linear import W4A16Linear, swap_w4a16_linears

    reserved = []
    monkeypatch.setattr(kernels.linear, "reserve", lambda device: reserved.append(device))
    ref = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    ours = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    names = swap_w4a16_linears(ours)
    assert reserved == []
    assert len(names) == 39 and not hasattr(ours, "ct_decompress_hook")
    assert all(isinstance(ours.get_submodule(n), W4A16Linear) for n in names)
    ids = torch.tensor([[2, 17, 99, 5, 300, 7]])
    with torch.no_grad():
        lr, lo = ref(ids).logits.float(), ours(ids).logits.float()
    # on the CPU both sides dequantize the same codes exactly and round once to bf16: the logits are equal bit for
    # bit (a wrong scale or code in any swapped layer would show)
    assert torch.equal(lr, lo)
    gen = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(ref.generate(ids, **gen), ours.generate(ids, **gen))
    # a decompressed model (dequantize=True) is swapped from the checkpoint's safetensors instead
    from transformers import CompressedTensorsConfig

    dq = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    assert swap_w4a16_linears(dq) == []
    assert swap_w4a16_linears(dq, checkpoint=micro_w4a16) == names
    with torch.no_grad():
        assert torch.equal(dq(ids).logits, ours(ids).logits)


def test_swap_leaves_what_w4a16linear_cannot_compute(micro_w4a16):
    """Only symmetric int4 layers are swapped: a nonzero zero point (asymmetric), act-order indices or another
    bit width in the layer's compressed-tensors scheme leave the layer as it is (counted, not swapped)."""
    from transformers import AutoModelForCausalLM

    from kernels.linear import swap_w4a16_linears

    model = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    linears = [n for n, m in model.named_modules() if hasattr(m, "weight_packed")]
    a, b, c = (model.get_submodule(n) for n in linears[:3])
    groups = a.weight_scale.shape[1]
    a.register_buffer("weight_zero_point", torch.zeros(a.out_features, groups, dtype=torch.int8))
    assert linears[0] in swap_w4a16_linears(model)  # an all-zero point (compressed-tensors may add one) is symmetric
    model = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    a, b, c = (model.get_submodule(n) for n in linears[:3])
    a.register_buffer("weight_zero_point", torch.ones(a.out_features, groups, dtype=torch.int8))
    b.register_buffer("weight_g_idx", torch.zeros(b.in_features, dtype=torch.int32))
    c.quantization_scheme = c.quantization_scheme.model_copy(
        update={"weights": c.quantization_scheme.weights.model_copy(update={"num_bits": 8})})
    names = swap_w4a16_linears(model)
    assert set(linears) - set(names) == set(linears[:3]) and len(names) == len(linears) - 3
    # a layer left alone keeps compressed-tensors' hook, which then decompresses it on the first forward
    assert hasattr(model, "ct_decompress_hook")
    with torch.no_grad():
        assert model(torch.tensor([[2, 17, 99]])).logits.shape == (1, 3, 2048)


def test_swap_keeps_the_hook_for_any_module_still_compressed(micro_w4a16):
    """Layers the swap does not take (packed codes of another dtype, block-shaped scales) stay compressed, so the
    decompression hook must stay, and the model must still run; scales that are not ``[N, K/G]`` are refused."""
    from transformers import AutoModelForCausalLM

    from kernels.linear import swap_w4a16_linears

    ids = torch.tensor([[2, 17, 99, 5]])
    ref = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(ids).logits
    model = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    linears = [n for n, m in model.named_modules() if hasattr(m, "weight_packed")]
    a = model.get_submodule(linears[0])
    a.weight_packed = torch.nn.Parameter(a.weight_packed.data.view(torch.uint8), requires_grad=False)
    names = swap_w4a16_linears(model)
    assert linears[0] not in names and len(names) == len(linears) - 1
    assert hasattr(model, "ct_decompress_hook")
    model = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    b = model.get_submodule(linears[1])
    b.weight_scale = torch.nn.Parameter(b.weight_scale.data[:1], requires_grad=False)   # [1, K/G]: not per row
    assert linears[1] not in swap_w4a16_linears(model) and hasattr(model, "ct_decompress_hook")
    # nothing left over: the hook goes, and the swapped model computes what the decompressed one does
    model = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    assert len(swap_w4a16_linears(model)) == len(linears) and not hasattr(model, "ct_decompress_hook")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_swapped_model_saves_and_loads_back(micro_w4a16, tmp_path):
    """``save_pretrained`` of a swapped model writes a pack-quantized checkpoint (``weight_shape`` included) that
    transformers loads back to the same logits."""
    from transformers import AutoModelForCausalLM

    from kernels.linear import swap_w4a16_linears

    model = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    swap_w4a16_linears(model)
    model.save_pretrained(tmp_path / "saved")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.bfloat16)
    ids = torch.tensor([[2, 17, 99, 5]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_swap_refuses_a_dtype_the_kernel_cannot_run(micro_w4a16):
    """fp32 activations: refused before any layer is swapped or the hook removed."""
    from transformers import AutoModelForCausalLM

    from kernels.linear import W4A16Linear, swap_w4a16_linears

    model = AutoModelForCausalLM.from_pretrained(micro_w4a16, dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16 activations, not torch.float32"):
        swap_w4a16_linears(model)
    assert hasattr(model, "ct_decompress_hook") and not any(isinstance(m, W4A16Linear) for m in model.modules())
    with pytest.raises(ValueError, match="not torch.float32"):
        swap_w4a16_linears(model, dtype=torch.float32)
    x, wp, s, _ = problem(3, 128, 256)
    with pytest.raises(ValueError, match="not torch.float32"):
        W4A16Linear(wp, s.float())


def test_counter_pools_reserved_up_front():
    """kernels.counters.reserve allocates every family's counter buffer (zeroed) where the kernels will find it, so
    that no buffer is first allocated inside a CUDA-graph capture; a later need within it allocates nothing."""
    from kernels import counters, w4a16_decode, w4a16_marlin

    dev = torch.device("cpu")
    assert w4a16_decode._COUNTERS is counters.pool("decode") and w4a16_marlin._COUNTERS is counters.pool("marlin")
    try:
        counters.reserve(dev, 5000)
        bufs = {f: counters.pool(f)[dev] for f in counters.FAMILIES}
        assert all(len(b) == 1 and b[0].numel() == 5000 and not b[0].any() for b in bufs.values())
        first = bufs["decode"][0]
        assert counters.grow_zeros(counters.pool("decode"), dev, 4096, 4096) is first and len(bufs["decode"]) == 1
        assert counters.grow_zeros(counters.pool("decode"), dev, 6000, 4096).numel() == 6000
        assert len(bufs["decode"]) == 2 and bufs["decode"][0] is first   # the old one kept alive for graphs
        # memory lost under the buffers (vLLM sleep mode level 2): zero=True re-zeroes every existing buffer
        for b in bufs["decode"] + bufs["marlin"]:
            b.fill_(3)
        counters.reserve(dev, 5000)
        assert bufs["decode"][1].all()                     # plain reserve leaves existing buffers as they are
        counters.reserve(dev, 5000, zero=True)
        assert not any(b.any() for b in bufs["decode"] + bufs["marlin"])
    finally:
        for f in counters.FAMILIES:
            counters.pool(f).pop(dev, None)
    with pytest.raises(ValueError, match="unknown counter pool 'gemv'"):
        counters.pool("gemv")


def test_counter_pool_never_grows_inside_a_graph_capture(monkeypatch):
    """A buffer first allocated inside a CUDA-graph capture is zeroed only when that graph replays: growing the
    pool during a capture is refused with the fix (reserve before capturing); within the reserved size it is not."""
    from kernels import counters

    dev = torch.device("cuda", 0)   # never touched: the check comes before any allocation
    pool = {dev: [torch.zeros(8, dtype=torch.int32)]}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert counters.grow_zeros(pool, dev, 8, 8) is pool[dev][0]
    with pytest.raises(RuntimeError, match=r"needs 9 tile counters on cuda:0 but only 8 exist.*"
                                           r"reserve\('cuda:0', 9\) before capturing"):
        counters.grow_zeros(pool, dev, 9, 8)
    assert len(pool[dev]) == 1


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", "ON", "y", "Y", " 1", "1 ", "t", "2", "0", ""])
def test_interpreting_reads_triton_interpret_as_triton_does(monkeypatch, value):
    from triton import knobs

    from kernels.env import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == bool(knobs.runtime.interpret)


def test_timer_rotation_covers_three_l2s_for_any_matrix_and_every_m_has_candidates():
    """The autotuner and benchmarks rotate weight copies so that consecutive calls miss the L2: together >= 3x its
    size for any matrix (a cap of 64 copies once left the small model's matrices L2-resident). Every M the tuner
    may be asked for gets decode tiles that hold it (M = 48 crashed on a 48-row tile)."""
    from kernels.w4a16_autotune import L2_BYTES, candidates_for, n_copies

    for nbytes in (512 * 512 // 2, 768 * 512 // 2 + 768 * 4 * 2, 5120 * 512 // 2, 16384 * 2560 // 2, 10**9):
        c = n_copies(nbytes)
        assert c >= 2 and (c * nbytes >= 3 * L2_BYTES or c == 2) and (c - 1) * nbytes < 3 * L2_BYTES + nbytes
    for m in (17, 33, 48, 63, 64):
        assert {c.block_m for c in candidates_for(m) if c.kernel == "decode"} >= {1 << (m - 1).bit_length()}
