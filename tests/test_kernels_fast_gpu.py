"""GPU tests of pdqkit's fast W4A16 GEMM against the pure-torch reference (marlin-arithmetic.md §9B tolerance).

Reference and tolerance helpers come from tests/test_kernels_fast.py (dequantize -> fp32 matmul -> one rounding).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.w4a16_config import W4A16Config as C4
from tests.test_kernels_fast import tolerance_ratio

pytestmark = pytest.mark.gpu

E4B = ((3072, 2560), (2560, 2048), (16384, 2560), (2560, 8192), (8192, 8192), (2048, 2560))
SWEEP_M = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 1000,
           1024, 2047, 4096)


def gpu_problem(n, k, dtype=torch.bfloat16, group=128, seed=0):
    from kernels.w4a16_autotune import make_problem

    wp, s = make_problem(n, k, dtype, "cuda", group=group if group > 0 else k, seed=seed)
    return wp, s


@pytest.fixture(scope="module", autouse=True)
def _cuda():
    torch.manual_seed(0)
    yield
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("n,k", E4B)
def test_sweep_m_against_reference(n, k, dtype):
    """Dispatcher (tuned table) for every M of the sweep, incl. odd M, both dtypes, the E4B shapes."""
    from kernels.w4a16 import w4a16_gemm

    wp, s = gpu_problem(n, k, dtype, seed=n + k)
    worst = {}
    for m in SWEEP_M:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        y = w4a16_gemm(x, wp, s)
        assert y.shape == (m, n) and y.dtype == dtype
        worst[m] = tolerance_ratio(y, x, wp, s)
    bad = {m: r for m, r in worst.items() if not r <= 1.0}
    assert not bad, f"{n}x{k} {dtype}: tolerance ratio > 1 at {bad}"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_untuned_shapes_take_the_gemv_heuristic(dtype):
    """Shapes without a tuned entry (the trained `small` model's, odd ones): M <= 2 runs the diagonal tensor-core
    GEMV of the heuristic, M = 3..16 the full-MMA one where K is a multiple of 512 (M = 9..16 only for matrices of
    at most 2^23 weights; split into 2 K slices at M <= 8 for K >= 8192, 3 from K = 16384), the rest the split-K
    kernel; all within the tolerance."""
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import load_table, select_config

    props = torch.cuda.get_device_properties(0)
    for n, k in ((1536, 512), (512, 1024), (4096, 512), (512, 2048), (192, 2304), (640, 6144), (256, 640),
                 (10240, 1536), (1024, 8192), (512, 16384)):
        assert (n, k) not in load_table(props.name)
        wp, s = gpu_problem(n, k, dtype, seed=n * 7 + k)
        for m in (1, 2, 3, 8, 13, 16, 17):
            cfg = select_config(m, n, k, 128, props.name, props.multi_processor_count, gemv=True)
            if m <= 2:
                want = "gemv_mma" if k % 256 == 0 else "decode"
            else:
                want = "gemv_mma8" if k % 512 == 0 and (m <= 8 or m <= 16 and n * k <= 1 << 23) else "decode"
            assert cfg.kernel == want, (n, k, m, cfg)
            split = (2 if k < 16384 else 3) if want == "gemv_mma8" and m <= 8 and k >= 8192 and n < 8192 else 1
            assert cfg.split_k == split or want == "decode", (n, k, m, cfg)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            r = tolerance_ratio(w4a16_gemm(x, wp, s), x, wp, s)
            assert r <= 1.0, f"{n}x{k} M={m} {cfg}: tolerance ratio {r:.3g}"


# a spread of the autotuner's candidates (compiled already by the tuning run), forced one by one
VARIANTS = [
    ("decode", dict(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4, kperm=True, w_is_a=True)),
    ("decode", dict(block_m=16, block_n=256, block_k=128, num_warps=8, num_stages=3, kperm=True, w_is_a=True)),
    ("decode", dict(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=3, kperm=True, w_is_a=True)),
    ("decode", dict(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=3, kperm=False, w_is_a=False)),
    ("decode", dict(block_m=32, block_n=128, block_k=256, num_warps=4, num_stages=4, kperm=True, w_is_a=True)),
    ("prefill", dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    ("prefill", dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)),
    ("prefill", dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, kperm=True, w_is_a=True)),
    ("prefill", dict(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)),
    ("dequant_mm", dict()),
    ("gemv_mma", dict(block_m=1, block_n=2, block_k=512, num_warps=1, num_stages=3)),
    ("gemv_mma", dict(block_m=2, block_n=8, block_k=256, num_warps=2, num_stages=2)),
    ("gemv_mma", dict(block_m=4, block_n=32, block_k=512, num_warps=4, num_stages=3)),
    ("gemv", dict(block_m=1, block_n=8, block_k=512, num_warps=1, num_stages=2)),
    ("gemv", dict(block_m=8, block_n=4, block_k=512, num_warps=2, num_stages=3)),
]


@pytest.mark.parametrize("kernel,kw", VARIANTS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(VARIANTS)])
def test_forced_variants(kernel, kw):
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config

    wp, s = gpu_problem(3072, 2560, seed=1)
    for m in (1, 5, 16, 77, 300):
        if kernel.startswith("gemv") and m > 16:
            continue
        for split in ((1, 3, 20) if kernel == "decode" else (1, 3) if kernel.startswith("gemv") else (1,)):
            cfg = W4A16Config(kernel, split_k=split, **kw)
            x = torch.randn(m, 2560, device="cuda", dtype=torch.bfloat16)
            r = tolerance_ratio(w4a16_gemm(x, wp, s, config=cfg), x, wp, s)
            assert r <= 1.0, (cfg, m, r)


def test_bias_channelwise_3d_and_strided_input():
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config

    n, k, dtype = 2560, 2048, torch.bfloat16
    b = torch.randn(n, device="cuda", dtype=dtype)
    for group in (128, -1):
        wp, s = gpu_problem(n, k, dtype, group=group, seed=7)
        for m in (1, 300):
            x = torch.randn(2, m, k + 64, device="cuda", dtype=dtype)[..., 64:]  # strided view, 3-D
            for cfg in (W4A16Config("decode", 16, 128, 128, split_k=4, num_stages=4, kperm=True, w_is_a=True),
                        W4A16Config("prefill", 128, 128, 64, num_warps=8),
                        W4A16Config("gemv_mma", 2, 4, 512, num_warps=2, num_stages=3),
                        W4A16Config("gemv", 2, 4, 512, num_warps=2, num_stages=3)):
                y = w4a16_gemm(x, wp, s, b, config=cfg)
                assert y.shape == (2, m, n)
                assert tolerance_ratio(y, x, wp, s, b) <= 1.0, (group, m, cfg)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gemv_offset_input_and_repeatability(dtype):
    """The GEMVs on activations 2 bytes past a 16-byte boundary (they are re-aligned: the kernels' 16-byte loads
    would fault), on a 2048x2560 q_proj shape (KV-shared Gemma-4 layers), twice with identical bits."""
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config as C

    wp, s = gpu_problem(2048, 2560, dtype, seed=11)
    for m in (1, 2, 3):
        x = torch.randn(m * 2560 + 1, device="cuda", dtype=dtype)[1:].view(m, 2560)
        assert x.data_ptr() % 16
        for cfg in (C("gemv_mma", min(m, 2), 4, 512, num_warps=2, num_stages=3),
                    C("gemv", 1, 8, 512, num_warps=1, num_stages=2)):
            y = w4a16_gemm(x, wp, s, config=cfg)
            assert torch.equal(y, w4a16_gemm(x, wp, s, config=cfg)), cfg
            assert tolerance_ratio(y, x, wp, s) <= 1.0, (cfg, m)


CHAIN_TILINGS = ((1, 8, 512, 1, 2), (2, 4, 1024, 1, 3), (4, 16, 512, 4, 2), (1, 2, 2048, 1, 2), (2, 32, 256, 2, 3))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gemv_mma_chain_against_reference(dtype):
    """The tensor-core GEMV with one accumulator set per 4-word vector (``chain``) and per word, on the same
    tilings: both within the tolerance of the reference, with and without bias, group 128 and channelwise, every
    ragged M up to 4 (the refusals are checked on the CPU: tests/test_kernels_fast.py)."""
    from kernels.w4a16_config import chain_ok
    from kernels.w4a16_gemv_mma import w4a16_gemv_mma

    n, k = 2560, 2048
    b = torch.randn(n, device="cuda", dtype=dtype)
    for group in (128, -1):
        wp, s = gpu_problem(n, k, dtype, group=group, seed=5)
        gs = group if group > 0 else k
        for bm, bn, bk, nw, st in CHAIN_TILINGS:
            assert chain_ok(bn, bk, nw)
            for m in range(1, 5):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                for chain in (False, True):
                    for bias in (None, b):
                        y = w4a16_gemv_mma(x, wp, s, bias, gs, block_m=bm, block_n=bn, block_k=bk, num_warps=nw,
                                           prefetch=st - 1, chain=chain)
                        r = tolerance_ratio(y, x, wp, s, bias)
                        assert r <= 1.0, (group, bm, bn, bk, nw, st, m, chain, bias is not None, r)


MMA8_TILINGS = ((8, 16, 128, 1, 2), (16, 16, 512, 4, 3), (8, 32, 256, 2, 2), (16, 64, 1024, 8, 3),
                (16, 32, 128, 2, 2), (8, 16, 2048, 8, 3))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gemv_mma8_against_reference(dtype):
    """The full-MMA GEMV (every MMA column an activation row) against the reference: six tilings (1-8 warps, one
    to 16 K chunks per block, the chunks split across warps or held by one), M from 1 to 33 (ragged column blocks,
    several programs along M), per-word and chained accumulators, with and without bias, scale groups 32, 64, 128,
    256 and channelwise (the refusals are checked on the CPU)."""
    from kernels.w4a16_gemv_mma8 import w4a16_gemv_mma8

    n, k = 2560, 4096
    b = torch.randn(n, device="cuda", dtype=dtype)
    for group in (32, 64, 128, 256, -1):
        wp, s = gpu_problem(n, k, dtype, group=group, seed=6)
        gs = group if group > 0 else k
        for bm, bn, bk, nw, st in MMA8_TILINGS:
            for m in (1, 3, 8, 13, 16, 17, 33):
                if group not in (128, -1) and m not in (3, 16):
                    continue
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                for chain in (False, True):
                    for bias in (None, b):
                        y = w4a16_gemv_mma8(x, wp, s, bias, gs, block_m=bm, block_n=bn, block_k=bk, num_warps=nw,
                                            prefetch=st - 1, chain=chain)
                        r = tolerance_ratio(y, x, wp, s, bias)
                        assert r <= 1.0, (group, bm, bn, bk, nw, st, m, chain, bias is not None, r)
    # a weight tensor off a 16-byte boundary runs the CUDA-core GEMV of the same tiling through the dispatcher
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config

    wp, s = gpu_problem(n, k, dtype, seed=7)
    wo = torch.cat([wp.new_zeros(1), wp.flatten()])[1:].view(n, k // 8)
    assert wo.data_ptr() % 16
    x = torch.randn(11, k, device="cuda", dtype=dtype)
    y = w4a16_gemm(x, wo, s, config=W4A16Config("gemv_mma8", 16, 16, 512, num_warps=4, num_stages=2))
    assert tolerance_ratio(y, x, wp, s) <= 1.0


SPLIT_GEMVS = [
    (C4("gemv_mma", 1, 4, 1024, num_warps=4, num_stages=3), (1, 3)),
    (C4("gemv_mma", 4, 16, 512, num_warps=2, num_stages=2, chain=True), (2, 4)),
    (C4("gemv_mma8", 8, 16, 512, num_warps=4, num_stages=3), (3, 8, 13)),
    (C4("gemv_mma8", 16, 32, 256, num_warps=2, num_stages=2, chain=True), (5, 16, 17)),
    (C4("gemv", 4, 8, 512, num_warps=2, num_stages=2), (1, 5)),
]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gemv_split_k_against_reference(dtype):
    """The GEMVs with split-K on the down_proj shape (2560 x 8192, the shape it is for): splits of equal and unequal
    length (2, 3, 7; 64 is clamped to the K blocks there are), scale groups 128, 512 (a group spanning two 256-wide
    K blocks, split 3 starting at an odd block) and channelwise, with and without bias, ragged M: within the
    tolerance of the reference, the same bits twice, the same bits from a CUDA-graph replay, and every tile
    counter back at zero after each launch."""
    from kernels.counters import pool
    from kernels.w4a16 import w4a16_gemm

    n, k = 2560, 8192
    b = torch.randn(n, device="cuda", dtype=dtype)
    for group in (128, 512, -1):
        wp, s = gpu_problem(n, k, dtype, group=group, seed=8)
        for cfg, ms in SPLIT_GEMVS:
            if not cfg.fits(k, group if group > 0 else k):
                continue
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                for split in (2, 3, 7, 64):
                    for bias in ((None, b) if group == 128 else (None,)):
                        c = dataclasses.replace(cfg, split_k=split)
                        y = w4a16_gemm(x, wp, s, bias, config=c)
                        r = tolerance_ratio(y, x, wp, s, bias)
                        assert r <= 1.0, (group, c.brief(), m, bias is not None, r)
                        assert torch.equal(y, w4a16_gemm(x, wp, s, bias, config=c)), (group, c.brief(), m)
    counters = [buf for bufs in pool("decode").values() for buf in bufs]
    assert counters and all(int(buf.abs().sum()) == 0 for buf in counters)
    # inside a CUDA graph: the workspace and tickets are captured, replays give the eager bits
    wp, s = gpu_problem(n, k, dtype, seed=9)
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for m in (1, 8, 16)]
    cfgs = [dataclasses.replace(SPLIT_GEMVS[0][0], split_k=4), dataclasses.replace(SPLIT_GEMVS[2][0], split_k=4),
            dataclasses.replace(SPLIT_GEMVS[3][0], split_k=3)]
    eager = [w4a16_gemm(x, wp, s, config=c) for x, c in zip(xs, cfgs)]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [w4a16_gemm(x, wp, s, config=c) for x, c in zip(xs, cfgs)]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    for e, o in zip(eager, outs):
        assert torch.equal(e, o)


GEMV_TMA_TILINGS = ((16, 512, 1, 2), (32, 256, 2, 3), (32, 512, 4, 2), (64, 1024, 8, 2), (16, 1024, 4, 6))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gemv_tma_against_reference(dtype):
    """The TMA-fed GEMV (not in the dispatcher: a measured experiment, see kernels/README.md), called directly:
    ring depths 2-6, 1-8 warps, 8 and 16 activation rows a program, ragged M (two programs along M at 20) and a
    ragged N (the TMA box past the last row reads zeros, the stores are masked), bias, activations given as a
    transposed view; scale groups 256, 64, 32 and channelwise (-1) on one tiling; one K block (1 and 2 slots).
    Within the tolerance of the reference, the same bits twice, and the same bits from a CUDA-graph replay."""
    from kernels.w4a16_gemv_tma import w4a16_gemv_tma

    n, k = 1040, 4096
    b = torch.randn(n, device="cuda", dtype=dtype)
    runs = []
    wp, s = gpu_problem(n, k, dtype, seed=11)
    for bn, bk, nw, st in GEMV_TMA_TILINGS:
        for m in (1, 2, 5, 8, 9, 13, 16, 20):
            runs.append((wp, s, 128, bn, bk, nw, st, m, b if m in (5, 13) else None))
    for group in (256, 64, 32, -1):
        wpg, sg = gpu_problem(n, k, dtype, group=group, seed=12)
        for m in (3, 13):
            runs.append((wpg, sg, group, 32, 512, 4, 2, m, None))
    wp1, s1 = gpu_problem(n, 512, dtype, seed=13)   # one K block: the ring never refills (1 and 2 slots)
    runs += [(wp1, s1, 128, 16, 512, 1, 1, 3, None), (wp1, s1, 128, 32, 512, 4, 2, 11, b)]
    for wp_, s_, group, bn, bk, nw, st, m, bias in runs:
        k = wp_.shape[1] * 8
        x = torch.randn(k, m, device="cuda", dtype=dtype).t()   # a transposed view: the launcher copies it
        kw = dict(block_m=8 if m <= 8 else 16, block_n=bn, block_k=bk, num_warps=nw, num_stages=st)
        y = w4a16_gemv_tma(x, wp_, s_, bias, group, **kw)
        r = tolerance_ratio(y, x, wp_, s_, bias)
        assert r <= 1.0, (group, bn, bk, nw, st, m, bias is not None, r)
        assert torch.equal(y, w4a16_gemv_tma(x, wp_, s_, bias, group, **kw)), (group, bn, bk, nw, st, m)
    k = 4096
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for m in (1, 8, 16)]
    kws = [dict(block_m=8, block_n=16, block_k=512, num_warps=1, num_stages=2),
           dict(block_m=8, block_n=32, block_k=512, num_warps=4, num_stages=2),
           dict(block_m=16, block_n=32, block_k=256, num_warps=2, num_stages=3)]
    eager = [w4a16_gemv_tma(x, wp, s, None, 128, **kw) for x, kw in zip(xs, kws)]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [w4a16_gemv_tma(x, wp, s, None, 128, **kw) for x, kw in zip(xs, kws)]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    for e, o in zip(eager, outs):
        assert torch.equal(e, o)


TMA_TILINGS = ((64, 64, 64, 3), (64, 128, 128, 2), (128, 64, 128, 3), (128, 128, 64, 4), (256, 64, 64, 3),
              (256, 128, 128, 2))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_prefill_tma_against_reference(dtype):
    """The Gluon prefill kernel against the reference: six tilings (64-256 activation rows, 4 or 8 warps, one or two
    64-wide activation boxes per K block, 2-4 ring slots), M from 1 to 600 (tiles past M zero-filled by TMA),
    N = 2560 and a ragged N = 2560 + 64 against 128-row tiles, bias, scale groups 128, 256 and channelwise; then
    through the dispatcher: Hopper runs it, and an activation tensor off a 16-byte boundary (TMA needs the
    alignment) runs the Triton tiled kernel instead."""
    from kernels.w4a16 import w4a16_gemm, tma_ok
    from kernels.w4a16_config import W4A16Config
    from kernels.w4a16_prefill_tma import w4a16_prefill_tma

    k = 4096
    for n in (2560, 2624):
        b = torch.randn(n, device="cuda", dtype=dtype)
        for group in (128, 256, -1):
            wp, s = gpu_problem(n, k, dtype, group=group, seed=8)
            gs = group if group > 0 else k
            for bm, bn, bk, st in TMA_TILINGS:
                for m in (1, 77, 256, 600):
                    if (group != 128 or n != 2560) and m not in (77, 600):
                        continue
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    for bias in (None, b):
                        y = w4a16_prefill_tma(x, wp, s, bias, gs, block_m=bm, block_n=bn, block_k=bk, num_stages=st)
                        r = tolerance_ratio(y, x, wp, s, bias)
                        assert r <= 1.0, (n, group, bm, bn, bk, st, m, bias is not None, r)
    wp, s = gpu_problem(3072, 2560, dtype, seed=9)
    x = torch.randn(300, 2560, device="cuda", dtype=dtype)
    cfg = W4A16Config("prefill_tma", 128, 64, 128, num_warps=4, num_stages=3)
    assert tma_ok(x, wp) == (torch.cuda.get_device_capability()[0] == 9)
    assert tolerance_ratio(w4a16_gemm(x, wp, s, config=cfg), x, wp, s) <= 1.0
    xo = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(300, 2560)
    assert xo.data_ptr() % 16 and not tma_ok(xo, wp)
    assert tolerance_ratio(w4a16_gemm(xo, wp, s, config=cfg), x, wp, s) <= 1.0


WSP_TILINGS = ((128, 128, 3, 1), (256, 128, 3, 1), (256, 64, 5, 1), (128, 128, 2, 3), (256, 64, 4, 2),
               (64, 128, 4, 4))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_prefill_wsp_and_split_k_against_reference(dtype):
    """The warp-specialised Gluon prefill kernel (producer warp, two consumer warpgroups) and the serial split-K of
    both Gluon kernels against the reference: six tilings, M from 1 to 600; two of them (one with a split) also on a
    ragged N = 2624 (the second warpgroup's rows past N), with a bias, and with scale groups of 256 and channelwise.
    Without a split, ``prefill_wsp`` gives the bits of
    ``prefill_tma`` with the same activation rows and K block (each output is one k16 MMA chain in K order); with
    one, a repeated call gives the same bits (partials summed in split order) and the tickets are back at zero."""
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config
    from kernels.w4a16_prefill_tma import _COUNTERS, w4a16_prefill_tma
    from kernels.w4a16_prefill_wsp import w4a16_prefill_wsp

    k = 4096
    for n in (2560, 2624):
        b = torch.randn(n, device="cuda", dtype=dtype)
        for group in (128, 256, -1):
            wp, s = gpu_problem(n, k, dtype, group=group, seed=10)
            gs = group if group > 0 else k
            for bm, bk, st, sk in WSP_TILINGS:
                # every tiling on N = 2560, groups of 128; two (one split, one not) on the rest, and with a bias:
                # each constexpr combination is a compile (~2 s), and the test should fit a fresh machine
                two = (bm, bk, st) in ((128, 128, 3), (128, 128, 2))
                if (group != 128 or n != 2560) and not two:
                    continue
                for m in (1, 77, 256, 600):
                    if (group != 128 or n != 2560) and m not in (77, 600):
                        continue
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    for bias in (None, b) if two and m == 600 else (None, ):
                        y = w4a16_prefill_wsp(x, wp, s, bias, gs, block_m=bm, block_k=bk, num_stages=st, split_k=sk)
                        r = tolerance_ratio(y, x, wp, s, bias)
                        assert r <= 1.0, ("wsp", n, group, bm, bk, st, sk, m, bias is not None, r)
                        if sk == 1:
                            ref = w4a16_prefill_tma(x, wp, s, bias, gs, block_m=bm, block_n=64, block_k=bk,
                                                    num_stages=2)
                            assert torch.equal(y, ref), ("wsp bits", n, group, bm, bk, m)
                        else:
                            y2 = w4a16_prefill_wsp(x, wp, s, bias, gs, block_m=bm, block_k=bk, num_stages=st,
                                                   split_k=sk)
                            assert torch.equal(y, y2), ("wsp split repeat", n, group, bm, bk, sk, m)
                            yt = w4a16_prefill_tma(x, wp, s, bias, gs, block_m=bm, block_n=64, block_k=bk,
                                                   num_stages=st, split_k=sk)
                            r = tolerance_ratio(yt, x, wp, s, bias)
                            assert r <= 1.0, ("tma split", n, group, bm, bk, st, sk, m, bias is not None, r)
                            assert torch.equal(yt, y), ("same split, same partials, same sum", n, group, bm, sk, m)
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in _COUNTERS[torch.device("cuda", torch.cuda.current_device())])
    # through the dispatcher, and its fallback for an activation tensor off a 16-byte boundary
    wp, s = gpu_problem(3072, 2560, dtype, seed=9)
    x = torch.randn(300, 2560, device="cuda", dtype=dtype)
    xo = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(300, 2560)
    for cfg in (W4A16Config("prefill_wsp", 256, 128, 128, num_warps=4, num_stages=3),
                W4A16Config("prefill_wsp", 128, 128, 128, split_k=3, num_warps=4, num_stages=2),
                W4A16Config("prefill_tma", 128, 64, 128, split_k=2, num_warps=4, num_stages=3)):
        assert tolerance_ratio(w4a16_gemm(x, wp, s, config=cfg), x, wp, s) <= 1.0, cfg
        assert tolerance_ratio(w4a16_gemm(xo, wp, s, config=cfg), x, wp, s) <= 1.0, cfg


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_prefill_wsp_k_halves_against_reference(dtype):
    """``prefill_wsp`` with 64 weight rows: the two warpgroups take every other K block and meet in shared memory.
    Against the reference on an even and an odd ring (an odd one hands each slot to the two warpgroups in turn), one
    with split-K, M from 1 to 600, a ragged N with a bias, channelwise scales; a repeated call gives the same bits;
    K blocks per CTA odd (21) and one (the odd warpgroup has none), with and without split-K. Then the launch that once failed (a warpgroup a whole lap of the odd ring ahead of the other passed its wait on
    an older phase): 1024 x 8192 x 8192, 1024 CTAs of 64 K blocks, bf16."""
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config
    from kernels.w4a16_prefill_tma import _COUNTERS
    from kernels.w4a16_prefill_wsp import w4a16_prefill_wsp

    k = 4096
    for n, group in ((2560, 128), (2624, 128), (2560, -1)):
        wp, s = gpu_problem(n, k, dtype, group=group, seed=11)
        gs = group if group > 0 else k
        b = torch.randn(n, device="cuda", dtype=dtype) if n == 2624 else None
        for bm, bk, st, sk in ((128, 128, 5, 1), (128, 128, 4, 1), (256, 64, 4, 2)):
            if n != 2560 and st != 5:
                continue
            for m in (1, 77, 256, 600):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                y = w4a16_prefill_wsp(x, wp, s, b, gs, block_m=bm, block_n=64, block_k=bk, num_stages=st, split_k=sk)
                r = tolerance_ratio(y, x, wp, s, b)
                assert r <= 1.0, ("wsp k halves", n, group, bm, bk, st, sk, m, r)
                y2 = w4a16_prefill_wsp(x, wp, s, b, gs, block_m=bm, block_n=64, block_k=bk, num_stages=st, split_k=sk)
                assert torch.equal(y, y2), ("wsp k halves repeat", n, group, bm, bk, st, sk, m)
    # an odd number of K blocks per CTA (the odd warpgroup has one block fewer) and a single one (it has none)
    for k1, bm, bk, st, sk in ((2688, 128, 128, 5, 1), (2688, 128, 128, 4, 1), (2688, 256, 64, 4, 2),
                               (128, 128, 128, 5, 1), (128, 256, 64, 4, 2)):
        wp, s = gpu_problem(2560, k1, dtype, seed=13)
        x = torch.randn(77, k1, device="cuda", dtype=dtype)
        y = w4a16_prefill_wsp(x, wp, s, None, 128, block_m=bm, block_n=64, block_k=bk, num_stages=st, split_k=sk)
        r = tolerance_ratio(y, x, wp, s)
        assert r <= 1.0, ("wsp k halves, odd K blocks", k1, bm, bk, st, sk, r)
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in _COUNTERS[torch.device("cuda", torch.cuda.current_device())])
    if dtype == torch.bfloat16:
        wp, s = gpu_problem(8192, 8192, dtype, seed=12)
        x = torch.randn(1024, 8192, device="cuda", dtype=dtype)
        cfg = W4A16Config("prefill_wsp", 128, 64, 128, num_warps=4, num_stages=5)
        y = w4a16_gemm(x, wp, s, config=cfg)
        for _ in range(3):
            assert torch.equal(w4a16_gemm(x, wp, s, config=cfg), y)
        assert tolerance_ratio(y, x, wp, s) <= 1.0


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_prefill_wsp_stream_k_against_reference(dtype):
    """``prefill_wsp`` with stream-K (one CTA per SM, each an equal share of all (tile, K block) steps; a tile shared
    by CTAs summed through the workspace in step order): 128 rows and K halves (an odd ring), M from 1 to 600, a
    ragged N with a bias, channelwise scales, an odd number of K blocks and a single one (CTAs that hold one step);
    repeated calls give the same bits and the tickets are back at zero. Where every CTA's share is two whole tiles
    (twice as many tiles as SMs) no tile is shared: the bits are the tiled launch's."""
    from kernels.w4a16_prefill_tma import _COUNTERS
    from kernels.w4a16_prefill_wsp import w4a16_prefill_wsp

    for n, k, group in ((2560, 4096, 128), (2624, 4096, 128), (2560, 4096, -1), (2560, 2688, 128), (2560, 128, 128)):
        wp, s = gpu_problem(n, k, dtype, group=group, seed=14)
        gs = group if group > 0 else k
        b = torch.randn(n, device="cuda", dtype=dtype) if n == 2624 else None
        for bm, bn, bk, st in ((128, 128, 128, 3), (128, 64, 128, 5), (256, 64, 64, 4)):
            if (n, k, group) != (2560, 4096, 128) and bm == 256:
                continue
            for m in (1, 77, 256, 600) if (n, k, group) == (2560, 4096, 128) else (77, 600):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                kw = dict(block_m=bm, block_n=bn, block_k=bk, num_stages=st, stream_k=True)
                y = w4a16_prefill_wsp(x, wp, s, b, gs, **kw)
                r = tolerance_ratio(y, x, wp, s, b)
                assert r <= 1.0, ("wsp stream-K", n, k, group, bm, bn, bk, st, m, r)
                assert torch.equal(y, w4a16_prefill_wsp(x, wp, s, b, gs, **kw)), ("repeat", n, k, bm, bn, m)
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in _COUNTERS[torch.device("cuda", torch.cuda.current_device())])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    wp, s = gpu_problem(128 * sms, 2560, dtype, seed=15)
    x = torch.randn(128, 2560, device="cuda", dtype=dtype)    # 2 x SMs tiles of 64 x 128: two whole ones per CTA
    kw = dict(block_m=64, block_n=128, block_k=128, num_stages=4)
    assert torch.equal(w4a16_prefill_wsp(x, wp, s, None, 128, stream_k=True, **kw),
                       w4a16_prefill_wsp(x, wp, s, None, 128, **kw))


def test_deterministic_and_config_invariant():
    """Same call twice -> same bits (split-K included). With no split-K, bits depend only on (BLOCK_K, K labelling):
    not on BLOCK_M/BLOCK_N/warps/stages, decode vs prefill kernel, mma.sync vs wgmma (§9B)."""
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config as C

    wp, s = gpu_problem(16384, 2560, seed=3)
    x = torch.randn(48, 2560, device="cuda", dtype=torch.bfloat16)
    split = C("decode", 16, 128, 128, split_k=5, num_stages=4, kperm=True, w_is_a=True)
    assert torch.equal(w4a16_gemm(x, wp, s, config=split), w4a16_gemm(x, wp, s, config=split))
    # Families with the same K labelling AND the same MMA lowering. Measured on the H200 (2026-11-28): within each
    # family the bits are identical; between the natural-order mma.sync (BLOCK_M 16/32, weights as B) and wgmma
    # (BLOCK_M >= 64) kernels they are not (both within tolerance) — unlike the 32-wide chains of the spec's §8.
    families = {
        "kperm, wgmma (weights = A)": [
            C("decode", 16, 64, 128, 1, 4, 3, True, True), C("decode", 16, 128, 128, 1, 4, 4, True, True),
            C("decode", 16, 256, 128, 1, 8, 3, True, True), C("decode", 32, 128, 128, 1, 4, 3, True, True),
            C("prefill", 64, 128, 128, 1, 4, 3, True, True), C("prefill", 128, 128, 128, 1, 8, 4, True, True)],
        "natural, mma.sync": [C("decode", 16, 64, 128, 1, 4, 3), C("decode", 16, 128, 128, 1, 4, 4)],
        "natural, wgmma": [C("prefill", 64, 128, 128, 1, 4, 3), C("prefill", 128, 128, 128, 1, 8, 3)],
    }
    for name, cfgs in families.items():
        outs = [w4a16_gemm(x, wp, s, config=c) for c in cfgs]
        for c, o in zip(cfgs, outs):
            assert torch.equal(o, outs[0]), (name, c)
    # different split / K labelling: different bits allowed, both within tolerance of the reference
    for c in (split, families["natural, mma.sync"][0], families["natural, wgmma"][0]):
        assert tolerance_ratio(w4a16_gemm(x, wp, s, config=c), x, wp, s) <= 1.0


def test_cuda_graph_replay_matches_eager():
    from kernels.w4a16 import w4a16_gemm

    wp, s = gpu_problem(2560, 8192, seed=4)
    # on the H200, M = 500 takes the table's stream-K entry (its workspace and tickets inside the captured graph)
    xs = [torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16) for m in (1, 8, 256, 500)]
    eager = [w4a16_gemm(x, wp, s) for x in xs]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [w4a16_gemm(x, wp, s) for x in xs]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    for e, o in zip(eager, outs):
        assert torch.equal(e, o)


def test_op_and_torch_compile_on_gpu():
    import kernels.ops  # noqa: F401
    from kernels.linear import W4A16Linear

    wp, s = gpu_problem(3072, 2560, seed=5)
    b = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    lin = W4A16Linear(wp, s, b)
    x = torch.randn(4, 2560, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.pdqkit.w4a16_gemm, (x, wp, s, b), test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lin, fullgraph=True)
    y = f(x)
    assert torch.equal(y, lin(x)) and tolerance_ratio(y, x, wp, s, b) <= 1.0


def test_hf_generation_matches_reference(tmp_path, request):
    """A trained Gemma-4 -> pack.quantize -> transformers on the GPU: the model swapped to W4A16Linear (our kernel)
    generates the same greedy tokens as compressed-tensors' own decompressed bf16 path, on prompts cut from the
    bench corpus' validation text, except where the reference itself has a numerical tie.

    The rules (tests/greedy_ties.py, checked on the CPU by tests/test_greedy_ties.py): our logits within 2 % of the
    reference's largest |logit| teacher-forced and in the decode steps; every teacher-forced argmax disagreement and
    the first free-running divergence must be ties, i.e. the reference scores our token within ``tau`` of its own,
    ``tau`` = 2 x the larger of the reference's own path noise (decode vs teacher-forced) and one bf16 step.

    The model is the bench's trained ``micro`` (tests.bench_fixtures), or the bf16 checkpoint named by env
    ``PDQKIT_GPU_TRAINED_CKPT`` (e.g. the trained ``small`` of bench/gpu/quality_pipeline.py). A trained model is
    needed: a random one's greedy choices are near-ties everywhere."""
    import os
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    # compressed-tensors is a hard dependency (pyproject.toml): a GPU image without it fails here, never skips
    # (GPU image: wheelhouse part1)
    from bench.gpu.vllm_e2e_check import text_prompts
    from pack.quantize import main as quantize_main
    from tests.greedy_ties import greedy_tie_check

    from kernels.linear import W4A16Linear, swap_w4a16_linears

    env = os.environ.get("PDQKIT_GPU_TRAINED_CKPT")
    base = Path(env) if env else request.getfixturevalue("trained_micro")
    assert quantize_main([str(base), "-o", str(tmp_path / "w4a16"), "--no-progress"]) == 0
    load = dict(dtype=torch.bfloat16, device_map="cuda")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4a16", **load)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4a16", **load)
    from kernels.counters import FAMILIES, pool
    for family in FAMILIES:   # (buffers of earlier tests: no graph holds them any more)
        pool(family).clear()
    names = swap_w4a16_linears(ours)
    assert names and all(isinstance(ours.get_submodule(n), W4A16Linear) for n in names)
    dev = ours.get_submodule(names[0]).weight_packed.device
    assert dev.type == "cuda" and all(pool(f)[dev][-1].numel() >= 1 << 16 for f in FAMILIES)   # reserved
    for m in (ref, ours):
        m.generation_config.eos_token_id = None  # N plain argmax steps, like vLLM's ignore_eos
    rows, bad = greedy_tie_check(ref, ours, text_prompts(base, 6, 96, seed=3), "cuda")
    print("\n".join(map(str, rows)))
    assert not bad, f"greedy disagreements that are not ties: {bad}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (operands on the non-current one)")
def test_operands_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: with cuda:0 current and every operand on cuda:1, both ops must run
    on cuda:1 and leave cuda:0 current: the fast op within the tolerance of the reference for each kernel family
    the dispatcher picks by M, the marlin-order op with the same bits as the same call made on cuda:0."""
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_marlin import w4a16_gemm_exact

    dev = torch.device("cuda", 1)
    n, k = 2560, 2048
    wp0, s0 = gpu_problem(n, k, torch.bfloat16, seed=3)
    wp, s = wp0.to(dev), s0.to(dev)
    with torch.cuda.device(0):
        for m in (1, 5, 13, 300, 2048):   # gemv_mma, decode / gemv_mma8, prefill_tma / _wsp, dequant_mm
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = w4a16_gemm(x, wp, s)
            torch.cuda.synchronize(dev)
            assert y.device == dev and torch.cuda.current_device() == 0
            assert tolerance_ratio(y, x, wp, s) <= 1.0, m
            e = w4a16_gemm_exact(x, wp, s)
            assert e.device == dev and torch.cuda.current_device() == 0
            # the same call on the current device gives the same bits (sms of cuda:1 == cuda:0's on one host)
            assert torch.equal(e.cpu(), w4a16_gemm_exact(x.to(0), wp0, s0).cpu()), m
