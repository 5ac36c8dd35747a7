"""Mutation audit of the host-side Python of ``kernels/`` (argument checks, config tables, env parsing, plugin switch,
Marlin schedule boundaries, the pure-torch Marlin reference pieces).

Each test pins a guard, boundary or branch that no other test pinned: mutating it (``<`` -> ``<=``, a clause or
branch removed, a constant changed) makes a test here fail. Expectations come from the docstrings / READMEs or
from an independent computation (exact rationals, a hand-built table), never from running the code under test.
Nothing here runs a Triton kernel: the dispatcher's launchers are replaced by recorders.
"""
from __future__ import annotations

import enum
import json
import sys
import types
from collections import namedtuple
from fractions import Fraction

import pytest
import torch

from pack.packing import dequantize, pack_int4, unpack_int4
from tests.test_kernels_fast import reference as _ref  # the pure-torch W4A16 reference


def _problem(m, n, k, groups, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    wp = pack_int4(torch.randint(-8, 8, (n, k), generator=g))
    s = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x, wp, s


# ------------------------------------------------------------------------------------ w4a16: argument checks
@pytest.mark.parametrize("case, msg", [
    ("x 0-d", "last dim"),
    ("weight_packed 3-d", "weight_packed must be int32"),
    ("scale rows != N", "weight_scale must be"),
    ("scale 1-d", "weight_scale must be"),
    ("scale without columns", "weight_scale must be"),
    ("scale not contiguous", "contiguous"),
    ("bias dtype", "bias must be"),
    ("operands on two devices", "different devices"),
    ("group 16", "group size 16 unsupported"),
    ("group 192", "group size 192 unsupported"),
])
def test_check_w4a16_args_refuses_each_documented_violation(case, msg):
    """Every operand rule of :func:`kernels.w4a16.check_w4a16_args` not covered by test_kernels_fast's bad-input
    table gives its own ``ValueError`` (not an IndexError / ZeroDivisionError / wrong answer further on)."""
    from kernels.w4a16 import w4a16_gemm

    x, wp, s = _problem(3, 128, 512, 4)
    b = None
    if case == "x 0-d":
        x = torch.tensor(1.0, dtype=torch.bfloat16)
    elif case == "weight_packed 3-d":
        wp = wp.reshape(128, 32, 2)
    elif case == "scale rows != N":
        s = s[:64].contiguous()
    elif case == "scale 1-d":
        s = s[:, 0].contiguous()
    elif case == "scale without columns":
        s = s[:, :0].contiguous()
    elif case == "scale not contiguous":
        s = s.t().contiguous().t()
        assert not s.is_contiguous()
    elif case == "bias dtype":
        b = torch.zeros(128, dtype=torch.float32)
    elif case == "operands on two devices":
        wp = torch.empty(128, 64, dtype=torch.int32, device="meta")
    elif case == "group 16":
        s = torch.ones(128, 32, dtype=torch.bfloat16)
    elif case == "group 192":
        x, wp, s = _problem(3, 128, 384, 2)
    with pytest.raises(ValueError, match=msg):
        w4a16_gemm(x, wp, s, b)


@pytest.mark.parametrize("k, groups", [(512, 16), (512, 8), (512, 4), (512, 2), (1024, 4), (512, 1), (384, 1)])
def test_supported_group_sizes_run(k, groups):
    """Groups 32, 64 and any multiple of 128 dividing K, and channelwise, are accepted (README, ``group_supported``)
    and give the reference result."""
    from kernels.w4a16 import w4a16_gemm

    x, wp, s = _problem(2, 64, k, groups, seed=k + groups)
    assert torch.equal(w4a16_gemm(x, wp, s), _ref(x, wp, s))


def test_shape_and_group_rules_at_their_boundaries():
    """``shape_supported``: N, K positive, N % 64 == 0, K % 128 == 0; ``group_supported``: 32, 64, a positive
    multiple of 128, or K."""
    from kernels.w4a16 import group_supported, shape_supported

    assert shape_supported(64, 128) and shape_supported(4096, 2560)
    for n, k in ((0, 128), (64, 0), (32, 128), (96, 128), (64, 64), (64, 192), (-64, 128), (64, -128)):
        assert not shape_supported(n, k), (n, k)
    for g in (32, 64, 128, 256, 384, 1024):
        assert group_supported(g, 4096), g
    for g in (0, 16, 48, 96, 192, -128, 4095):
        assert not group_supported(g, 4096), g
    assert group_supported(4096, 4096)


def test_check_args_any_n_relaxes_n_only():
    """``any_n=True`` (launchers that mask ragged N) accepts any positive N but still needs K % 128 == 0, and says
    only that rule when it refuses."""
    from kernels.w4a16 import check_w4a16_args

    x, wp, s = _problem(2, 96, 256, 2)
    assert check_w4a16_args(x, wp, s, None, any_n=True) == (96, 256, 128)
    with pytest.raises(ValueError, match="N % 64 == 0"):
        check_w4a16_args(x, wp, s, None)
    x, wp, s = _problem(2, 96, 320, 1)
    with pytest.raises(ValueError, match=r"K % 128 == 0, got") as e:
        check_w4a16_args(x, wp, s, None, any_n=True)
    assert "N % 64" not in str(e.value)


# ------------------------------------------------------------------------------------ w4a16: capability gates
@pytest.fixture
def fake_gpu(monkeypatch):
    """Make ``_capability`` answer a chosen (major, minor) for CPU tensors (device index None -> current device 0)."""
    import kernels.w4a16 as w

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def set_cap(cap, gluon=True):
        monkeypatch.setattr(w, "_capability", lambda index: cap)
        monkeypatch.setattr(w, "_gluon_available", lambda: gluon)
    return set_cap


def test_asm_and_mma_gates_follow_their_instruction_sets(fake_gpu):
    """``asm_ok``: fp16 anywhere, bf16 from sm_90; ``mma_ok``: that and sm_80 (mma.sync.m16n8k16)."""
    from kernels.w4a16 import asm_ok, mma_ok

    bf, fp = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float16)
    table = {(7, 5): (False, True, False, False), (8, 0): (False, True, False, True),
             (8, 9): (False, True, False, True), (9, 0): (True, True, True, True), (10, 0): (True, True, True, True)}
    for cap, (asm_bf, asm_fp, mma_bf, mma_fp) in table.items():
        fake_gpu(cap)
        assert (asm_ok(bf), asm_ok(fp), mma_ok(bf), mma_ok(fp)) == (asm_bf, asm_fp, mma_bf, mma_fp), cap


def test_tma_gate_needs_hopper_gluon_and_16_byte_alignment(fake_gpu):
    """``tma_ok``: sm_90 only (not sm_100, not sm_89), the PTX dequant, Gluon, and 16-byte aligned base addresses of
    both x and weight_packed."""
    from kernels.w4a16 import tma_ok

    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    wp = torch.zeros(64, 32, dtype=torch.int32)
    assert x.data_ptr() % 16 == 0 and wp.data_ptr() % 16 == 0
    fake_gpu((9, 0))
    assert tma_ok(x, wp) and tma_ok(x.half(), wp)
    x_off = torch.zeros(4 * 256 + 1, dtype=torch.bfloat16)[1:].view(4, 256)       # 2 bytes past the boundary
    wp_off = torch.zeros(64 * 32 + 1, dtype=torch.int32)[1:].view(64, 32)           # 4 bytes past
    assert not tma_ok(x_off, wp) and not tma_ok(x, wp_off)
    for cap in ((10, 0), (8, 9), (8, 0)):
        fake_gpu(cap)
        assert not tma_ok(x.half(), wp), cap
    fake_gpu((9, 0), gluon=False)
    assert not tma_ok(x, wp)


# ------------------------------------------------------------------------------------ w4a16: the dispatcher
@pytest.fixture
def recorders(monkeypatch):
    """The dispatcher under ``TRITON_INTERPRET=1`` with every launcher replaced by a recorder (nothing runs)."""
    import kernels.w4a16 as w
    from kernels import w4a16_decode, w4a16_dequant, w4a16_gemv, w4a16_prefill

    calls = []

    def rec(name):
        def launch(x2, wp, ws, bias, group, **kw):
            calls.append((name, group, kw, None if bias is None else bias.is_contiguous()))
            return x2.new_zeros(x2.shape[0], wp.shape[0])
        return launch

    monkeypatch.setattr(w4a16_decode, "w4a16_decode", rec("decode"))
    monkeypatch.setattr(w4a16_prefill, "w4a16_prefill", rec("prefill"))
    monkeypatch.setattr(w4a16_gemv, "w4a16_gemv", rec("gemv"))
    monkeypatch.setattr(w4a16_dequant, "w4a16_dequant_mm", rec("dequant_mm"))
    monkeypatch.setattr(w, "_CENSUS", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return calls


@pytest.mark.parametrize("bm, bn, kernel, want_bm, want_warps", [
    (256, 64, "prefill_tma", 128, 8), (128, 64, "prefill_tma", 128, 8), (64, 64, "prefill_tma", 64, 4),
    (128, 128, "prefill_wsp", 128, 8), (64, 64, "prefill_wsp", 64, 4),
])
def test_gluon_configs_fall_back_to_the_triton_tiles(recorders, bm, bn, kernel, want_bm, want_warps):
    """Where the Gluon kernels cannot run (here: the interpreter) the dispatcher runs the Triton tiled kernel with
    "its usual 128-wide weight tile; 8 warps for 128 activation rows" (at most 128 rows, BLOCK_K 64, 3 stages), the
    table's row grouping kept, and the census names it a fallback."""
    import kernels.w4a16 as w
    from kernels.w4a16_config import W4A16Config

    cfg = W4A16Config(kernel, bm, bn, 128, num_warps=bn // 16 if kernel == "prefill_tma" else 4, num_stages=4,
                      group_m=4)
    x, wp, s = _problem(70, 128, 256, 2)
    b = torch.randn(256).to(torch.bfloat16)[::2]
    w.w4a16_gemm(x, wp, s, b, config=cfg)
    ((name, group, kw, bias_contig),) = recorders
    assert name == "prefill" and group == 128 and bias_contig
    assert (kw["block_m"], kw["block_n"], kw["block_k"], kw["num_warps"], kw["num_stages"], kw["group_m"]) == \
        (want_bm, 128, 64, want_warps, 3, 4)
    assert not kw["use_asm"] and kw["dot_f32"]
    assert list(w.census()) == [f"prefill 128x256 [fallback for {cfg.brief()}]"]


def test_mma_gemvs_fall_back_to_the_cuda_core_gemv(recorders):
    """Without inline PTX the MMA GEMVs run ``gemv`` on the same tiling: at most 8 rows a program, ``num_stages - 1``
    words in flight, split-K and warps kept, software bf16 rounding (``emu_rn``) under the interpreter."""
    from kernels.w4a16 import w4a16_gemm
    from kernels.w4a16_config import W4A16Config

    x, wp, s = _problem(13, 64, 768, 12)
    w4a16_gemm(x, wp, s, config=W4A16Config("gemv_mma8", 16, 16, 256, split_k=2, num_warps=2, num_stages=3,
                                            chain=True))
    w4a16_gemm(x[:2], wp, s, config=W4A16Config("gemv_mma", 2, 4, 256, num_warps=1, num_stages=2))
    (n1, g1, kw1, _), (n2, _, kw2, _) = recorders
    assert n1 == n2 == "gemv" and g1 == 64
    assert (kw1["block_m"], kw1["block_n"], kw1["block_k"], kw1["num_warps"], kw1["prefetch"], kw1["split_k"]) == \
        (8, 16, 256, 2, 2, 2)
    assert (kw2["block_m"], kw2["prefetch"], kw2["split_k"]) == (2, 1, 1)
    assert kw1["emu_rn"] and not kw1["use_asm"]


@pytest.mark.parametrize("m, kernel", [(1, "decode"), (16, "decode"), (256, "decode"), (300, "prefill"),
                                       (1500, "dequant_mm")])
def test_interpreter_dispatch_uses_the_heuristic_without_ptx_kernels(recorders, m, kernel):
    """Under the interpreter (no inline PTX, no Gluon) an untuned call takes :func:`heuristic_config` for a 4-SM
    device named "interpreter" with neither the MMA GEMVs nor ``prefill_tma``; the launcher gets that config."""
    import kernels.w4a16 as w
    from kernels.w4a16_config import heuristic_config

    x, wp, s = _problem(m, 128, 512, 4)
    w.w4a16_gemm(x, wp, s)
    want = heuristic_config(m, 128, 512, 128, 4)
    ((name, _, kw, _),) = recorders
    assert name == kernel == want.kernel
    if kernel != "dequant_mm":
        assert {f: kw[f] for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages", "kperm", "w_is_a")} \
            == {f: getattr(want, f) for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages", "kperm",
                                                "w_is_a")}
    if kernel == "decode":
        assert kw["split_k"] == want.split_k
    assert list(w.census()) == [f"{kernel} 128x512 [{want.brief()}]"]


# ------------------------------------------------------------------------------------ W4A16Config validation
@pytest.mark.parametrize("kw, msg", [
    (dict(kernel="decode", block_m=8), "power of two >= 16"),
    (dict(kernel="decode", block_n=8), "power of two >= 16"),
    (dict(kernel="decode", split_k=0), "bad split_k/num_stages/num_warps"),
    (dict(kernel="decode", num_stages=0), "bad split_k/num_stages/num_warps"),
    (dict(kernel="decode", num_warps=3), "bad split_k/num_stages/num_warps"),
    (dict(kernel="decode", num_warps=32), "bad split_k/num_stages/num_warps"),
    (dict(kernel="prefill_tma", block_m=64, block_n=64, num_warps=4, split_k=0), "prefill_tma has no"),
    (dict(kernel="prefill_wsp", block_m=64, block_n=64, split_k=0), "prefill_wsp has no"),
    (dict(kernel="prefill_wsp", block_m=64, block_n=64, chain=True), "prefill_wsp has no"),
    (dict(kernel="gemv_mma", block_m=1, block_n=1, block_k=512, num_stages=2), "gemv_mma needs"),
    (dict(kernel="gemv", block_m=1, block_n=16, block_k=128, num_stages=2), "block_k in"),
    (dict(kernel="gemv", block_m=1, block_n=16, block_k=4096, num_stages=2), "block_k in"),
    (dict(kernel="gemv", block_m=1, block_n=16, block_k=512, num_warps=16, num_stages=2), "1-8 warps"),
    (dict(kernel="gemv", block_m=1, block_n=16, block_k=512, kperm=True, num_stages=2), "no K relabelling"),
    (dict(kernel="gemv_mma8", block_m=8, block_n=16, block_k=512, num_warps=4, num_stages=2, kperm=True),
     "no K relabelling"),
])
def test_config_refusals_not_pinned_elsewhere(kw, msg):
    """:class:`W4A16Config` refuses, with its message, the tile sizes / counts its docstring excludes."""
    from kernels.w4a16_config import W4A16Config

    with pytest.raises(ValueError, match=msg):
        W4A16Config(**kw)


def test_config_accepts_the_edges_of_its_ranges():
    """The documented ranges' edges are accepted: 16-row tiles, 16 warps for the Triton tiles, a 1-row ``gemv``
    program, ``gemv_mma`` with 2 weight rows, 2048-wide GEMV blocks."""
    from kernels.w4a16_config import W4A16Config

    W4A16Config("decode", 16, 16, 64, num_stages=1)
    W4A16Config("prefill", 128, 128, 64, num_warps=16)
    W4A16Config("gemv", 1, 1, 2048, num_warps=8, num_stages=2)
    W4A16Config("gemv_mma", 4, 2, 256, num_warps=1, num_stages=3)


# ------------------------------------------------------------------------------------ tuned tables and lookup
def _table(tmp_path, monkeypatch, by_m, device="Audit GPU 1", shape="256x512"):
    import kernels.w4a16_config as wc

    (tmp_path / wc.device_table_name(device)).write_text(json.dumps({"device": device, "shapes": {shape: by_m}}))
    monkeypatch.setattr(wc, "CONFIG_DIR", tmp_path)
    monkeypatch.delenv("PDQKIT_W4A16_TABLE", raising=False)
    wc._load_table.cache_clear()


@pytest.fixture
def clear_tables():
    import kernels.w4a16_config as wc

    wc._load_table.cache_clear()
    yield
    wc._load_table.cache_clear()


def test_table_lookup_takes_the_smallest_tuned_m_at_or_above_m(tmp_path, monkeypatch, clear_tables):
    """Module docstring: "the smallest tuned M >= M (the largest if M is beyond the table)", whatever order the
    JSON file lists its M keys in (a hand-edited or merged table need not be sorted)."""
    import kernels.w4a16_config as wc

    a = wc.W4A16Config("decode", 16, 64, 128, split_k=4, kperm=True, w_is_a=True)
    b = wc.W4A16Config("decode", 64, 64, 128, split_k=2, kperm=True, w_is_a=True)
    c = wc.W4A16Config("prefill", 128, 128, 64, num_warps=8)
    _table(tmp_path, monkeypatch, {"4096": c.to_json(), "1": a.to_json(), "64": b.to_json()})
    assert wc.load_table("Audit GPU 1") == {(256, 512): [(1, a), (64, b), (4096, c)]}
    want = {1: a, 2: b, 63: b, 64: b, 65: c, 4096: c, 4097: c}
    assert {m: wc.select_config(m, 256, 512, 128, "Audit GPU 1", 132) for m in want} == want


def test_tuned_entry_that_cannot_run_the_group_falls_to_the_heuristic(tmp_path, monkeypatch, clear_tables):
    """``select_config``: a tuned entry is used only if it fits (K, group size); else :func:`heuristic_config`."""
    import kernels.w4a16_config as wc

    t = wc.W4A16Config("prefill_tma", 128, 64, 128, num_warps=4, num_stages=3)
    _table(tmp_path, monkeypatch, {"512": t.to_json()})
    assert wc.select_config(300, 256, 512, 128, "Audit GPU 1", 132, tma=True) == t
    assert not t.fits(512, 64)
    assert wc.select_config(300, 256, 512, 64, "Audit GPU 1", 132, tma=True) == \
        wc.heuristic_config(300, 256, 512, 64, 132, tma=True)


def test_device_table_name():
    """Runs of non-alphanumerics become one ``_``, none at either end: ``"NVIDIA H200"`` -> ``NVIDIA_H200.json``."""
    from kernels.w4a16_config import device_table_name

    assert device_table_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert device_table_name(" (NVIDIA)  A100-SXM4-80GB ") == "NVIDIA_A100_SXM4_80GB.json"


# ------------------------------------------------------------------------------------ heuristics at boundaries
@pytest.mark.parametrize("m, kernel, bm, stages", [
    (1, "decode", 16, 3), (16, "decode", 16, 3), (17, "decode", 32, 4), (32, "decode", 32, 4), (33, "decode", 64, 4),
    (256, "decode", 64, 4), (257, "prefill", 128, 3), (1023, "prefill", 128, 3), (1024, "dequant_mm", None, None),
])
def test_heuristic_config_m_boundaries(m, kernel, bm, stages):
    """:func:`heuristic_config` docstring: split-K at M <= 256 (16-, 32-, 64-row tiles up to 16, 32, above), 128x128
    Triton tiles with BLOCK_K 64, 8 warps and 3 stages at 256 < M < 1024, dequantize + cuBLAS from M = 1024."""
    from kernels.w4a16_config import heuristic_config

    c = heuristic_config(m, 3072, 2560, 128, 132)
    assert c.kernel == kernel
    if kernel == "decode":
        assert (c.block_m, c.num_stages, c.kperm, c.w_is_a, c.block_k) == (bm, stages, True, True, 128)
    elif kernel == "prefill":
        assert (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) == (128, 128, 64, 8, 3)


@pytest.mark.parametrize("m, n, k, sms", [
    (1, 512, 65536, 132), (16, 512, 65536, 132), (17, 512, 65536, 132), (1, 3072, 2560, 132), (8, 2560, 10240, 132),
    (100, 1024, 8192, 132), (256, 3072, 2560, 132), (1, 128, 1024, 132), (1, 64, 512, 4), (40, 192, 4096, 7),
    (200, 16384, 2560, 132),
])
def test_heuristic_split_k_reaches_the_stated_occupancy(m, n, k, sms):
    """Docstring: "K split until there are ~4 (M <= 16) or ~2 programs per SM, keeping >= 2 K blocks per split";
    128-wide weight tiles where N allows. Checked as: the fewest slices that reach the target, unless the 2-block
    floor caps them first."""
    from kernels.w4a16_config import heuristic_config

    c = heuristic_config(m, n, k, 128, sms)
    assert c.kernel == "decode" and c.block_n == (128 if n % 128 == 0 else 64)
    tiles = -(-m // c.block_m) * -(-n // c.block_n)
    target = (4 if m <= 16 else 2) * sms
    kb = k // c.block_k
    s = c.split_k
    assert s >= 1 and (s == 1 or kb // s >= 2)
    if s == 1:
        assert tiles >= target or kb < 4
    else:
        assert tiles * (s - 1) < target, "more slices than needed"
        assert tiles * s >= target or s == kb // 2, "fewer slices than needed while K blocks were left"


def test_heuristic_gemv_boundaries_not_pinned_elsewhere():
    """:func:`heuristic_gemv` docstring: 8-row programs at M <= 16 "for matrices of at most 2^23 weights"; 32 rows
    over 8 warps "where N >= 8192" (K a multiple of 512, not 1024); the long-K split only at M <= 8."""
    from kernels.w4a16_config import W4A16Config, heuristic_gemv

    assert heuristic_gemv(16, 1024, 8192, 128) is not None              # exactly 2^23 weights
    assert heuristic_gemv(16, 1088, 8192, 128) is None                  # above
    assert heuristic_gemv(9, 512, 8192, 128).split_k == 1                # long K but M > 8: no split
    assert heuristic_gemv(4, 8192, 2560, 128) == W4A16Config("gemv_mma8", 8, 32, 512, 1, 8, 2, chain=True)
    assert heuristic_gemv(4, 8128, 2560, 128) == W4A16Config("gemv_mma8", 8, 16, 512, 1, 4, 3)
    # K = 3072 (a multiple of 1024 but < 4096) at M <= 2: two rows, 512-wide blocks, one warp
    assert heuristic_gemv(2, 64, 3072, 128) == W4A16Config("gemv_mma", 2, 2, 512, num_warps=1, num_stages=3)


def test_heuristic_tma_tile_rows_at_their_boundaries():
    """:func:`heuristic_tma`: 64-row tiles "up to M = 64 and wherever 128-row tiles would leave SMs idle" (fewer
    tiles than SMs), else 128."""
    from kernels.w4a16_config import heuristic_tma

    assert heuristic_tma(64, 16384, 2560, 128, 132).block_m == 64      # 256 tiles of 128 rows, but M <= 64
    assert heuristic_tma(65, 16384, 2560, 128, 132).block_m == 128
    assert heuristic_tma(128, 8192, 8192, 128, 128).block_m == 128     # 128 tiles on 128 SMs: none idle
    assert heuristic_tma(128, 8192, 8192, 128, 129).block_m == 64      # one SM idle
    assert heuristic_tma(1023, 3072, 2560, 128, 132).block_m == 128


# ------------------------------------------------------------------------------------ env.py
@pytest.mark.parametrize("raw, want", [(None, None), ("", None), ("   ", None), ("\t\n", None),
                                       (" /t/x.json ", "/t/x.json"), ("/t/x.json", "/t/x.json")])
def test_table_override_reads_blanks_as_unset(monkeypatch, raw, want):
    """``table_override``: None when unset or empty (blanks count as empty), else the path without surrounding
    blanks -- a stray space must not turn into a refused "no such file"."""
    from kernels.env import TABLE_ENV, table_override

    if raw is None:
        monkeypatch.delenv(TABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(TABLE_ENV, raw)
    assert table_override() == want


@pytest.mark.parametrize("raw, want", [("1", True), ("true", True), ("TRUE", True), ("Yes", True), (" on ", True),
                                       ("0", False), ("", False), ("off", False), (" No", False), ("FALSE", False),
                                       (None, False), ("2", ValueError), ("y", ValueError), ("enable", ValueError)])
def test_census_switch_values(monkeypatch, raw, want):
    """``census_enabled``: 1 / true / yes / on, any case, blanks ignored; 0 / false / no / off, empty or unset are
    off; anything else is refused naming the variable (a typo must not pass for "no launches of ours")."""
    from kernels.env import CENSUS_ENV, census_enabled

    if raw is None:
        monkeypatch.delenv(CENSUS_ENV, raising=False)
    else:
        monkeypatch.setenv(CENSUS_ENV, raw)
    if want is ValueError:
        with pytest.raises(ValueError, match=f"^{CENSUS_ENV}='{raw}': use 1 / true / yes / on"):
            census_enabled()
    else:
        assert census_enabled() is want


# ------------------------------------------------------------------------------------ vLLM plugin: register()
@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in for the three vLLM modules :func:`register` imports, with the plugin's vLLM-only helpers
    (kernel classes, op import, vLLM's logger) replaced; ``state`` records what happened."""
    import kernels.vllm_plugin as plugin

    class PlatformEnum(enum.Enum):
        CUDA = 1
        ROCM = 2

    Cap = namedtuple("Cap", "major minor")
    state = types.SimpleNamespace(cuda=True, cap=Cap(9, 0), registered=[], loaded=[], warnings=[])

    class Platform:
        def is_cuda(self):
            return state.cuda

        def get_device_capability(self):
            if isinstance(state.cap, Exception):
                raise state.cap
            return state.cap

    class Marlin:
        pass

    class Machete:
        pass

    platforms = types.ModuleType("vllm.platforms")
    platforms.PlatformEnum, platforms.current_platform = PlatformEnum, Platform()
    linear = types.ModuleType("vllm.model_executor.kernels.linear")
    linear._POSSIBLE_KERNELS = {PlatformEnum.CUDA: [Marlin, Machete]}

    def register_linear_kernel(cls, platform, kind):
        state.registered.append((cls, platform, kind))
        linear._POSSIBLE_KERNELS.setdefault(platform, []).append(cls)
    linear.register_linear_kernel = register_linear_kernel
    kernels_mod = types.ModuleType("vllm.model_executor.kernels")
    kernels_mod.linear = linear
    me = types.ModuleType("vllm.model_executor")
    me.kernels = kernels_mod
    vllm = types.ModuleType("vllm")
    vllm.platforms, vllm.model_executor = platforms, me
    for name, mod in (("vllm", vllm), ("vllm.platforms", platforms), ("vllm.model_executor", me),
                      ("vllm.model_executor.kernels", kernels_mod), ("vllm.model_executor.kernels.linear", linear)):
        monkeypatch.setitem(sys.modules, name, mod)
    classes = {c: type(plugin.KERNEL_CLASS_NAMES[c], (), {}) for c in plugin.CHOICES}

    class Log:
        def warning(self, *a):
            state.warnings.append(a[0] % a[1:])

        def info(self, *a):
            pass

    monkeypatch.setattr(plugin, "kernel_class", lambda choice: classes[choice])
    monkeypatch.setattr(plugin, "_load_op", lambda choice: state.loaded.append(choice))
    monkeypatch.setattr(plugin, "_vllm_logger", lambda: Log())
    state.cuda_list = linear._POSSIBLE_KERNELS[PlatformEnum.CUDA]
    state.classes, state.CUDA, state.others = classes, PlatformEnum.CUDA, (Marlin, Machete)
    return state


@pytest.mark.parametrize("choice", ["fast", "exact"])
def test_register_puts_the_chosen_kernel_first_once(fake_vllm, monkeypatch, choice):
    """Module docstring: with ``PDQKIT_VLLM_KERNEL`` set, the chosen class is registered with the mixed-precision
    registry for CUDA and moved to the FRONT of the CUDA list; vLLM may call ``register`` more than once, and the
    class then stays first and listed once, registered once."""
    import kernels.vllm_plugin as plugin

    monkeypatch.setenv(plugin.ENV_VAR, f" {choice.upper()} ")
    cls = fake_vllm.classes[choice]
    plugin.register()
    assert fake_vllm.cuda_list == [cls, *fake_vllm.others]
    assert fake_vllm.registered == [(cls, fake_vllm.CUDA, "mp")] and fake_vllm.loaded == [choice]
    plugin.register()
    assert fake_vllm.cuda_list == [cls, *fake_vllm.others] and len(fake_vllm.registered) == 1
    fake_vllm.cuda_list.insert(0, fake_vllm.others[1])     # something else registered in front meanwhile
    plugin.register()
    assert fake_vllm.cuda_list == [cls, fake_vllm.others[1], *fake_vllm.others]
    assert len(fake_vllm.registered) == 1


@pytest.mark.parametrize("cuda, cap, refused", [(False, (9, 0), True), (True, (7, 5), True), (True, (8, 0), False),
                                                (True, RuntimeError("no device"), False)])
def test_register_refuses_platforms_the_kernels_cannot_serve(fake_vllm, monkeypatch, cuda, cap, refused):
    """Not CUDA, or below sm_80: nothing registered, the op not even imported, and a warning says vLLM's kernels
    serve; a capability that cannot be read (no device in this process) is not a refusal."""
    import kernels.vllm_plugin as plugin

    fake_vllm.cuda = cuda
    fake_vllm.cap = cap if isinstance(cap, Exception) else namedtuple("Cap", "major minor")(*cap)
    monkeypatch.setenv(plugin.ENV_VAR, "fast")
    plugin.register()
    if refused:
        assert fake_vllm.cuda_list == list(fake_vllm.others) and not fake_vllm.registered and not fake_vllm.loaded
        assert len(fake_vllm.warnings) == 1 and "vLLM's own W4A16 kernels serve every layer" in fake_vllm.warnings[0]
    else:
        assert fake_vllm.cuda_list[0] is fake_vllm.classes["fast"] and not fake_vllm.warnings


def test_register_unset_touches_nothing_and_typo_raises(fake_vllm, monkeypatch):
    """Unset: nothing registered (vLLM picks its own kernel); a value that is not a kernel raises before anything
    is registered, so a typo never silently serves on vLLM's kernels."""
    import kernels.vllm_plugin as plugin

    monkeypatch.delenv(plugin.ENV_VAR, raising=False)
    plugin.register()
    monkeypatch.setenv(plugin.ENV_VAR, "  ")
    plugin.register()
    assert fake_vllm.cuda_list == list(fake_vllm.others) and not fake_vllm.loaded
    monkeypatch.setenv(plugin.ENV_VAR, "marlin")
    with pytest.raises(ValueError, match="PDQKIT_VLLM_KERNEL='marlin' is not a pdqkit kernel"):
        plugin.register()
    assert fake_vllm.cuda_list == list(fake_vllm.others) and not fake_vllm.registered


def test_load_op_turns_a_broken_install_into_a_clear_error(monkeypatch, tmp_path):
    """``_load_op``: a module that cannot be imported (missing, or failing inside, e.g. a broken native library) must
    not fall back to vLLM's kernels silently: RuntimeError naming the variable, the module and the op."""
    import kernels.vllm_plugin as plugin

    (tmp_path / "_audit_broken_op.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("kernels._audit_no_such_module", "_audit_broken_op"):
        monkeypatch.setattr(plugin, "_OPS", {"fast": ("w4a16_gemm", module)})
        with pytest.raises(RuntimeError, match=rf"PDQKIT_VLLM_KERNEL=fast: cannot import {module} "
                                               r"\(defines torch\.ops\.pdqkit\.w4a16_gemm\)"):
            plugin._load_op("fast")
        sys.modules.pop(module, None)


# ------------------------------------------------------------------------------------ fake (meta) implementations
def test_fake_impls_refuse_mismatched_operands():
    """The ops' fake implementations (what torch.compile traces) check what they promise: K against
    ``weight_packed`` and the scale dtype (fast op), K and the scale rows (exact op)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels.exact_op  # noqa: F401
    import kernels.ops  # noqa: F401

    with FakeTensorMode():
        x = torch.empty(3, 256, dtype=torch.bfloat16)
        wp, s = torch.empty(128, 32, dtype=torch.int32), torch.empty(128, 2, dtype=torch.bfloat16)
        assert torch.ops.pdqkit.w4a16_gemm(x, wp, s).shape == (3, 128)
        assert torch.ops.pdqkit.w4a16_gemm_exact(x, wp, s).shape == (3, 128)
        with pytest.raises(RuntimeError, match="last dim"):
            torch.ops.pdqkit.w4a16_gemm(x, torch.empty(128, 16, dtype=torch.int32), s)
        with pytest.raises(RuntimeError, match="weight_scale dtype must equal x dtype"):
            torch.ops.pdqkit.w4a16_gemm(x, wp, s.half())
        with pytest.raises(RuntimeError, match="does not match K=256"):
            torch.ops.pdqkit.w4a16_gemm_exact(x, torch.empty(128, 16, dtype=torch.int32), s)
        with pytest.raises(RuntimeError, match="weight_scale rows 64 != N=128"):
            torch.ops.pdqkit.w4a16_gemm_exact(x, wp, torch.empty(64, 2, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------ Marlin schedule boundaries
def test_part2_takes_an_extra_round_when_the_remainder_is_at_most_a_third():
    """marlin.cu's split of the T tiles (module docstring, step 2): with T > sms, part 2 is ``T % sms`` tiles, plus
    one more round of ``sms`` tiles when that remainder is at most a third of the SMs; part 1 the whole rounds left.
    With T <= sms every tile is part 2. Tiny SM counts make each side of ``3 * T2 <= sms`` reachable."""
    from kernels.marlin_schedule import build_schedule

    for n, sms in ((512, 3), (512, 2), (1024, 5), (896, 5), (1024, 3), (512, 4), (512, 8), (1024, 6)):
        ln = build_schedule(1, n, 128, 128, sms=sms).launches[0]
        tiles = n // ln.cfg.thread_n
        assert ln.tiles == tiles
        if tiles <= sms:
            t2 = tiles
        else:
            t2 = tiles % sms + (sms if 3 * (tiles % sms) <= sms else 0)
        assert (ln.part2_tiles, ln.part1_iters) == (t2, (tiles - t2) // sms), (n, sms)
    assert build_schedule(1, 512, 128, 128, sms=3).launches[0].part2_tiles == 4      # remainder 1 = sms / 3


def test_few_tiles_override_at_its_boundary():
    """marlin_mm's "few tiles" override to (128, 64, 128): when ``n_tiles * m_blocks * 4 <= sms`` (E4B's 2560-wide
    layer at M = 16: 20 tiles, 80 <= sms)."""
    from kernels.marlin_schedule import FEW_TILES_CONFIG, ThreadConfig, build_schedule

    assert build_schedule(16, 2560, 10240, 128, sms=80).launches[0].cfg == FEW_TILES_CONFIG
    assert build_schedule(16, 2560, 10240, 128, sms=79).launches[0].cfg == ThreadConfig(128, 128, 256)


def test_thread_m_blocks_lowered_when_no_config_fits_shared_memory():
    """marlin_mm lowers ``thread_m_blocks`` (max 4) when no thread config fits the shared memory, and keeps the
    lowered cap for the rest of M: with room for 3 m-blocks but not 4, 64 rows run as 48 + 16."""
    from kernels.marlin_schedule import (LARGE_BATCH_CONFIGS, SMALL_BATCH_CONFIGS, build_schedule,
                                         kernel_cache_size)

    cfgs = set(LARGE_BATCH_CONFIGS + SMALL_BATCH_CONFIGS)
    smem = min(kernel_cache_size(c, 4, -1) for c in cfgs) - 1 + 512      # every config at 4 m-blocks is too big
    assert any(kernel_cache_size(c, 3, -1) <= smem - 512 for c in LARGE_BATCH_CONFIGS)
    sched = build_schedule(64, 256, 256, -1, max_shared_mem=smem)
    assert [(ln.row_off, ln.m_split, ln.tmb) for ln in sched.launches] == [(0, 48, 3), (48, 16, 1)]
    assert all(kernel_cache_size(ln.cfg, ln.tmb, -1) <= smem for ln in sched.launches)
    assert [(ln.m_split, ln.tmb) for ln in build_schedule(64, 256, 256, -1).launches] == [(64, 4)]


# ------------------------------------------------------------------------------------ marlin_emulate references
_FMT = {torch.bfloat16: (8, -126), torch.float16: (11, -14)}   # significand bits, minimum normal exponent


def _rn(v: Fraction, dtype) -> Fraction:
    """Round-to-nearest-even of an exact rational to ``dtype`` (finite range), independent of torch."""
    p, emin = _FMT[dtype]
    if v == 0:
        return Fraction(0)
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    ulp = Fraction(2) ** (max(e, emin) - p + 1)
    return (1 if v > 0 else -1) * round(a / ulp) * ulp


def _midpoint_operands(dtype):
    """a, b in [1, 2) of ``dtype`` whose exact product is a midpoint between two neighbours of ``dtype``."""
    p = _FMT[dtype][0]
    for ma in range(2 ** (p - 1) + 1, 2 ** p):
        for mb in range(ma, 2 ** p):
            prod = ma * mb
            if prod >= 2 ** (2 * p - 1) and prod % 2 ** p == 2 ** (p - 1):
                return Fraction(ma, 2 ** (p - 1)), Fraction(mb, 2 ** (p - 1))
    raise AssertionError


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fma_round_is_one_correct_rounding(dtype):
    """``fma_round`` = RN_dtype(a * b + c) with a single rounding (HFMA2), also where rounding to fp32 first would
    land on a tie of ``dtype`` (double rounding); ``round_to`` = RN_dtype. Against exact rationals."""
    from kernels.marlin_emulate import fma_round, round_to

    a0, b0 = _midpoint_operands(dtype)
    tiny = Fraction(1, 2 ** (30 if dtype == torch.bfloat16 else 24))
    rows = [(a0, b0, tiny), (a0, b0, -tiny), (-a0, b0, tiny), (-a0, b0, -tiny)]
    g = torch.Generator().manual_seed(3)
    rnd = (torch.randn(3, 400, generator=g) * torch.exp2(torch.randint(-4, 4, (3, 400), generator=g))).to(dtype)
    rows += [tuple(Fraction(float(v)) for v in col) for col in rnd.t()]
    a, b, c = (torch.tensor([float(r[i]) for r in rows], dtype=torch.float64).to(dtype) for i in range(3))
    assert [Fraction(float(v)) for v in a[:4]] == [r[0] for r in rows[:4]]
    got = fma_round(a, b, c, dtype)
    assert got.dtype == torch.float32
    want = [_rn(ra * rb + rc, dtype) for ra, rb, rc in rows]
    bad = [i for i, (gv, wv) in enumerate(zip(got.tolist(), want)) if Fraction(gv) != wv]
    assert not bad, [(rows[i], got[i].item(), float(want[i])) for i in bad[:5]]
    assert {float(w) for w in want[:2]} == {float(_rn(a0 * b0 + tiny, dtype)), float(_rn(a0 * b0 - tiny, dtype))}
    assert _rn(a0 * b0 + tiny, dtype) != _rn(a0 * b0 - tiny, dtype)      # the two tie cases really differ
    r = torch.randn(1000, generator=g) * 300
    assert [Fraction(v) for v in round_to(r, dtype).tolist()] == [_rn(Fraction(v), dtype) for v in r.tolist()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_marlin_scales_groups_and_keeps_channelwise_codes(dtype):
    """``dequantize_marlin``: RN_dtype((q - 8) * s) grouped (= :func:`pack.packing.dequantize`), the exact codes
    channelwise ([N, 1] scales, one group spanning K included): the scale is applied in the epilogue there."""
    from kernels.marlin_emulate import dequantize_marlin

    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (64, 256), generator=g)
    wp = pack_int4(q)
    for groups in (8, 4, 2):
        s = (torch.rand(64, groups, generator=g) * 0.3 + 0.01).to(dtype)
        assert torch.equal(dequantize_marlin(wp, s, 256), dequantize(wp, s, (64, 256)).float())
    s1 = (torch.rand(64, 1, generator=g) + 0.5).to(dtype)
    assert torch.equal(dequantize_marlin(wp, s1, 256), q.float())
    assert torch.equal(unpack_int4(wp, 256).float(), q.float())


def test_emulate_marlin_refuses_unknown_order_variants():
    """Only "marlin" and the named wrong orders (blocked / pairwise / top_down) are accepted."""
    from kernels.marlin_emulate import emulate_marlin, exact_chunk_inputs

    x, wp, ws = exact_chunk_inputs(2, 64, 128, 128, torch.bfloat16, seed=0)
    for kw in (dict(chains="bogus"), dict(tree="blocked"), dict(fold="pairwise")):
        with pytest.raises(ValueError, match="unknown order variant"):
            emulate_marlin(x, wp, ws, sms=4, **kw)
    ref = emulate_marlin(x, wp, ws, sms=4)
    assert torch.equal(emulate_marlin(x, wp, ws, sms=4, chains="blocked", tree="pairwise", fold="top_down"), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [128, -1])
def test_emulate_marlin_epilogue_on_exact_integer_sums(dtype, group):
    """``exact_chunk_inputs(big=None, small=(0, 0))``: "every sum is an exact integer, so only the epilogue rounds".
    Then Marlin's output, per its docstring and the module's comments, is RN(acc) grouped, RN(acc + b) with bias
    (acc rounded first), RN(RN(acc) * s) channelwise, and with channelwise + bias one fused FMA RN(RN(acc) * s + b)
    except in the first write (rows 0..7 of an m-block, columns 0..7 of every 64) which rounds twice."""
    from kernels.marlin_emulate import emulate_marlin, exact_chunk_inputs

    m, n, k = 9, 128, 256
    x, wp, ws = exact_chunk_inputs(m, n, k, group, dtype, seed=5)
    q = unpack_int4(wp, k).double()
    exact_acc = x.double() @ (q if group == -1 else q * ws.double().repeat_interleave(group, 1)).t()
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    y = [[_rn(Fraction(v), dtype) for v in row] for row in exact_acc.tolist()]
    got = emulate_marlin(x, wp, ws, None, sms=4).double().tolist()
    got_b = emulate_marlin(x, wp, ws, bias, sms=4).double().tolist()
    bl = [Fraction(v) for v in bias.double().tolist()]
    diff_first = 0
    for r in range(m):
        for c in range(n):
            if group == -1:
                s = Fraction(ws[c, 0].item())
                assert Fraction(got[r][c]) == _rn(y[r][c] * s, dtype), (r, c)
                two = _rn(_rn(y[r][c] * s, dtype) + bl[c], dtype)
                one = _rn(y[r][c] * s + bl[c], dtype)
                want = two if r < 8 and c % 64 < 8 else one
                diff_first += two != one and c % 64 < 16
            else:
                assert Fraction(got[r][c]) == y[r][c], (r, c)
                want = _rn(y[r][c] + bl[c], dtype)
            assert Fraction(got_b[r][c]) == want, (r, c)
    if group == -1 and dtype == torch.bfloat16:   # (fp16's 11 bits rarely round y * s: no such witness there)
        assert diff_first, "the inputs do not tell the two epilogues apart"


@pytest.mark.parametrize("dtype, big, small", [(torch.bfloat16, 10, (-14, -6)), (torch.float16, 2, (-24, -14))])
def test_exact_chunk_inputs_keep_their_promises(dtype, big, small):
    """``exact_chunk_inputs``: x = a * 2^e with a in [-3, 3] and one exponent per (row, 32-wide slice); scales
    c * 2^f (c in 1..7) constant along K; with ``big`` the big slices cancel exactly, so the exact product equals
    that of the small part alone."""
    from kernels.marlin_emulate import dequantize_marlin, exact_chunk_inputs

    m, n, k = 6, 64, 512
    x, wp, ws = exact_chunk_inputs(m, n, k, 128, dtype, seed=11, big=big, small=small)
    assert x.shape == (m, k) and x.dtype == dtype and wp.shape == (n, k // 8) and ws.shape == (n, k // 128)
    assert torch.equal(ws, ws[:, :1].expand_as(ws))
    mant, _ = torch.frexp(ws.double()[:, 0])
    assert bool((mant * 8 == (mant * 8).round()).all())     # c * 2^f, c in 1..7: at most 3 significant bits
    xs = x.double().reshape(m, k // 32, 32)
    for row in xs.reshape(-1, 32):                       # each slice: integers in [-3, 3] times one power of two
        lo = row.abs()[row != 0].min() if bool(row.any()) else torch.tensor(1.0, dtype=torch.float64)
        fl = int(torch.floor(torch.log2(lo)))
        assert any(bool(((row / 2.0 ** e).round() == row / 2.0 ** e).all() and (row / 2.0 ** e).abs().max() <= 3)
                   for e in (fl, fl - 1)), row
    is_big = xs.abs() >= 2.0 ** big
    assert bool(is_big.any())
    w = dequantize_marlin(wp, ws, k).double()
    full = x.double() @ w.t()
    small_only = torch.where(is_big, 0.0, xs).reshape(m, k) @ w.t()
    assert torch.equal(full, small_only)
    x0, _, _ = exact_chunk_inputs(m, n, k, 128, dtype, seed=11)
    assert bool(((x0.double() == x0.double().round()) & (x0.double().abs() <= 3)).all())
