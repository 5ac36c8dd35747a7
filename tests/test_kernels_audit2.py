"""Mutation-audit tests (second round) of host-side Python: kernels/w4a16_autotune.py (candidates, split-K values,
the tolerance check, the problem data, the CLI's table writing/merging/refusals), kernels/verify.py (the vLLM id,
the bit comparison, sweeps, bookkeeping, the harness loop), kernels/linear.py (W4A16Linear, swap rules, the
checkpoint reader) and bench/toolrun.py (run_exec, the forkserver's environment, interrupted callers).

Every test runs on the CPU; GPU-only entry points are reached by faking what they query. References are pure torch
(pack.packing) or the documented contract, never the code under test."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pack.packing import pack_int4, unpack_uint4
from tests.test_kernels_fast import reference as _ref  # the pure-torch W4A16 reference


def _problem(m, n, k, group=128, dtype=torch.bfloat16, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    wp = pack_int4(torch.randint(-8, 8, (n, k), generator=g))
    s = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, wp, s, b


# =============================================================================================== w4a16_autotune
def test_gemv_block_ms_follow_their_documented_rule():
    """gemv_block_ms: the power of two covering M capped at the kernel's largest (4 / 8 / 16) and the one below it;
    gemv_mma8 never below 8 (its MMA's column count)."""
    from kernels.w4a16_autotune import gemv_block_ms

    for kern, cap, low in (("gemv_mma", 4, 1), ("gemv", 8, 1), ("gemv_mma8", 16, 8)):
        for m in range(1, 40):
            cover = 1
            while cover < m:
                cover *= 2
            top = min(cap, cover)
            assert gemv_block_ms(m, kern) == sorted({max(low, top), max(low, top // 2)}), (kern, m)
    assert gemv_block_ms(1) == [1] and gemv_block_ms(3) == [2, 4] and gemv_block_ms(5, "gemv_mma8") == [8]


def test_gemv_candidates_are_exactly_the_tilings_within_the_word_bounds():
    """gemv_candidates: every thread holds at least one vector per K block (gemv_mma 2 words, gemv 4) and at most
    max_words words; each such tiling with every stage count, gemv_mma also chained where chain_ok holds; no other."""
    from kernels.w4a16_autotune import gemv_block_ms, gemv_candidates
    from kernels.w4a16_config import chain_ok

    bns, bks, warps, stages = (1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), (1, 2, 4), (2, 3)
    for m in (1, 3, 8):
        for kern, least in (("gemv_mma", 2), ("gemv", 4)):
            got = gemv_candidates(m, kernels=(kern,), bns=bns, bks=bks, warps=warps, stages=stages, max_words=16)
            want = set()
            for bm in gemv_block_ms(m, kern):
                for bn in bns:
                    for bk in bks:
                        for nw in warps:
                            words = bn * bk / 8 / (32 * nw)
                            if not least <= words <= 16 or (kern == "gemv_mma" and bn < 2):
                                continue
                            for ns in stages:
                                want.add((bm, bn, bk, nw, ns, False))
                                if kern == "gemv_mma" and chain_ok(bn, bk, nw):
                                    want.add((bm, bn, bk, nw, ns, True))
            assert len(got) == len(set(got))
            assert {(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.chain) for c in got} == want
            assert {c.kernel for c in got} == {kern}


@pytest.mark.parametrize("fn, kw, grid, ring", [
    ("prefill_tma_candidates", {"block_ms": (64, 128, 256)}, "tma",
     lambda bm, bn, bk, ns: ns * (bm * bk * 2 + bn * bk // 2)),
    ("prefill_wsp_candidates", {"m": 1024}, "wsp",
     lambda bm, bn, bk, ns: ns * (bm * bk * 2 + bn * bk // 2) + (64 * bm * 4 if bn == 64 else 0)),
])
def test_gluon_prefill_candidates_fill_shared_memory_up_to_the_byte(fn, kw, grid, ring):
    """The Gluon prefill tilings: every documented (block_m, block_n, block_k, stages) whose ring (+ wsp's K-halves
    reduction buffer) fits smem_max is offered, including one that fits exactly; one byte less drops it."""
    import kernels.w4a16_autotune as at

    f = getattr(at, fn)
    if grid == "tma":
        combos = [(bm, bn, bk, ns) for bm in (64, 128, 256) for bn in (64, 128)
                  for bk, sts in ((64, (3, 4, 5)), (128, (2, 3, 4))) for ns in sts]
    else:
        combos = [(bm, bn, bk, ns) for bm in (128, 256) for bn in (128, 64)
                  for bk, sts in ((64, (4, 5, 6)), (128, (2, 3, 4, 5))) for ns in sts]
    sizes = sorted({ring(*c) for c in combos})
    smem = sizes[len(sizes) // 2]   # a budget some tiling fills exactly
    for budget in (smem, smem - 1):
        got = {(c.block_m, c.block_n, c.block_k, c.num_stages) for c in f(**kw, smem_max=budget)}
        assert got == {c for c in combos if ring(*c) <= budget}
    exact = [c for c in combos if ring(*c) == smem]
    assert exact and set(exact) <= {(c.block_m, c.block_n, c.block_k, c.num_stages) for c in f(**kw, smem_max=smem)}


def test_candidates_for_m_boundaries():
    """candidates_for: GEMV tilings up to M = 4, 16-row decode tiles up to M = 16, 256-row prefill tiles from M = 256,
    the dequant + cuBLAS path from M = 1024, prefill_wsp with 256 rows only from M = 256."""
    from kernels.w4a16_autotune import candidates_for

    def kinds(m):
        return {(c.kernel, c.block_m) for c in candidates_for(m)}

    assert any(k == "gemv_mma" for k, _ in kinds(4)) and not any(k == "gemv_mma" for k, _ in kinds(5))
    assert ("decode", 16) in kinds(16) and ("decode", 16) not in kinds(17) and ("decode", 32) in kinds(17)
    assert ("prefill", 256) in kinds(256) and ("prefill", 256) not in kinds(255)
    assert ("prefill_tma", 256) in kinds(256) and ("prefill_tma", 256) not in kinds(255)
    assert ("prefill_wsp", 256) in kinds(256) and ("prefill_wsp", 256) not in kinds(255)
    assert ("dequant_mm", 64) in {(c.kernel, 64) for c in candidates_for(1024) if c.kernel == "dequant_mm"}
    assert not [c for c in candidates_for(1023) if c.kernel == "dequant_mm"]
    assert not [c for c in candidates_for(64) if c.kernel == "prefill" and c.block_m == 128]
    assert [c for c in candidates_for(65) if c.kernel == "prefill" and c.block_m == 128]
    for m in (1, 2, 3, 4, 5, 16, 17, 64, 65, 256, 1024):
        cands = candidates_for(m)
        assert len(cands) == len(set(cands)) > 0


@pytest.mark.parametrize("m, n, k, sms, per_sm", [
    (16, 3072, 2560, 132, 8), (1, 2560, 8192, 132, 8), (64, 16384, 2560, 132, 8), (128, 2560, 2048, 66, 8),
    (256, 8192, 8192, 132, 8), (16, 256, 256, 132, 8), (32, 1024, 4096, 16, 8),
    (16, 128 * 33, 2560, 132, 8),    # 33 tiles x 2 splits: exactly half a program per SM
    (16, 128 * 66, 2560, 132, 8),    # 66 tiles alone: exactly half the SMs, so 1 too
    (16, 128 * 8 * 132, 2560, 132, 8),   # 8 programs per SM from the tiles alone
    (16, 256, 10240, 132, 1)])       # no value qualifies: the fallback, not clamped to every K block
def test_decode_split_candidates_follow_the_occupancy_rule(m, n, k, sms, per_sm):
    """split_candidates (decode): the values that leave each split a K block and make between half a program and
    max_per_sm programs per SM, counted as the slices they launch (effective_split), plus 1 when the tiles alone fill
    half the SMs; if none qualify, the one nearest two programs per SM."""
    from kernels.w4a16_autotune import SPLITS, split_candidates
    from kernels.w4a16_config import W4A16Config, effective_split

    cfg = W4A16Config("decode", 16, 128, 128, 1, 4, 4, True, True)
    tiles = -(-m // 16) * -(-n // 128)
    kb = k // 128
    want = {effective_split(kb, s) for s in SPLITS if s <= kb and sms / 2 <= tiles * s <= per_sm * sms}
    if tiles >= sms / 2:
        want.add(1)
    got = split_candidates(cfg, m, n, k, sms, max_per_sm=per_sm)
    if want:
        assert got == sorted(want)
    else:
        assert got == [effective_split(kb, max(1, round(2 * sms / tiles)))]


def test_decode_split_one_when_the_tiles_alone_fill_half_the_sms():
    """split_candidates (decode) offers 1 when the tiles alone fill half the SMs, even if ``values`` lacks it."""
    from kernels.w4a16_autotune import split_candidates
    from kernels.w4a16_config import W4A16Config

    cfg = W4A16Config("decode", 16, 128, 128, 1, 4, 4, True, True)
    assert split_candidates(cfg, 16, 128 * 66, 2560, 132, values=(2, 4)) == [1, 2, 4]
    assert split_candidates(cfg, 16, 128 * 65, 2560, 132, values=(2, 4)) == [2, 4]


def test_prefill_wsp_stream_k_offered_below_four_tiles_per_sm():
    """launch_variants: prefill_wsp gets a stream-K launch only while its tiles are fewer than four per SM."""
    from kernels.w4a16_autotune import launch_variants
    from kernels.w4a16_config import W4A16Config

    wsp = W4A16Config("prefill_wsp", 128, 128, 128, 1, 4, 3)
    at4 = launch_variants(wsp, 128, 128 * 4 * 132, 2560, 132)
    below = launch_variants(wsp, 128, 128 * (4 * 132 - 1), 2560, 132)
    assert not [c for c in at4 if c.stream_k]
    assert [c for c in below if c.stream_k] == [dataclasses.replace(wsp, split_k=1, stream_k=True)]


def test_make_problem_packs_its_codes_in_the_compressed_tensors_layout():
    """make_problem: the codes drawn from the seeded CPU generator, packed as compressed-tensors stores them (checked
    by pack.packing's unpacker), int32 [N, K/8]; positive scales [N, K/group] in [0.002, 0.022)."""
    from kernels.w4a16_autotune import make_problem

    n, k = 64, 512
    wp, s = make_problem(n, k, torch.float16, "cpu", group=128, seed=5)
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    assert wp.dtype == torch.int32 and wp.shape == (n, k // 8) and wp.is_contiguous()
    assert torch.equal(unpack_uint4(wp, k).int(), u)
    assert torch.equal(pack_int4(u - 8), wp)
    assert s.dtype == torch.float16 and s.shape == (n, k // 128)
    assert float(s.min()) >= 0.002 * 0.999 and float(s.max()) < 0.022 * 1.001


def test_rotated_problem_copies_and_bytes():
    """rotated_problem: the first copy is make_problem's, n_copies of them in all, and nbytes counts int32 words and
    2-byte scales of one call."""
    from kernels.w4a16_autotune import make_problem, n_copies, rotated_problem

    n, k = 64, 256
    wps, ss, nbytes = rotated_problem(n, k, torch.bfloat16, "cpu", seed=3)
    wp0, s0 = make_problem(n, k, torch.bfloat16, "cpu", seed=3)
    assert nbytes == n * k // 2 + n * (k // 128) * 2
    assert len(wps) == len(ss) == n_copies(nbytes)
    assert torch.equal(wps[0], wp0) and torch.equal(ss[0], s0)
    assert all(w.shape == wp0.shape and w.dtype == torch.int32 for w in wps)
    assert not torch.equal(wps[1], wp0)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_check_tolerance_bias_rounding_and_non_finite(dtype):
    """check_tolerance (the autotuner's correctness gate): the exact rounded reference (with bias) scores 0; a
    result that omits the bias fails; one ulp off passes; a NaN output is inf (fails)."""
    from kernels.w4a16_autotune import check_tolerance

    x, wp, s, b = _problem(5, 64, 256, dtype=dtype, bias=True)
    y = _ref(x, wp, s, b)
    assert check_tolerance(y, x, wp, s, b) == 0.0
    assert check_tolerance(y, x, wp, s) > 1.0
    # one ulp away from zero on an element that stays in its binade: within the bound (ulp + a tiny sum term)
    yf = y.float().flatten()
    _, e = torch.frexp(yf)
    up = yf + torch.sign(yf) * _ulp(y.flatten(), dtype)
    i = int(torch.nonzero((torch.frexp(up)[1] == e) & (yf != 0))[0])
    nudged = y.clone().flatten()
    nudged[i] = up[i].to(dtype)
    assert nudged[i] != y.flatten()[i]
    r = check_tolerance(nudged.reshape(y.shape), x, wp, s, b)
    assert 0.6 < r <= 1.0   # the ulp term dominates: half of it or twice it would break either bound
    bad = y.clone()
    bad[0, 0] = float("nan")
    assert check_tolerance(bad, x, wp, s, b) == float("inf")


def test_demo_only_refuses_indices_past_the_last_launch(capsys):
    """--demo-only takes indices 0..16 (15 fixed launches + 2 tuned): 17 is refused (exit 2) before any GPU work."""
    from kernels.w4a16_autotune import demo_launches

    assert demo_launches({17}) == 2
    assert "0..16" in capsys.readouterr().err
    with pytest.raises(Exception) as e:   # 16 is accepted: it goes on to allocate on the (absent) GPU
        demo_launches({16})
    assert "0..16" not in str(e.value)


@pytest.fixture
def fake_tuner(monkeypatch):
    """main() on a pretend GPU: CUDA reported available, a device name with no packaged table, tune() recorded and
    answering a fixed table."""
    import kernels.w4a16_autotune as at

    calls = []
    answer = {"device": "Fake GPU 9000", "date": "2099-01-01", "triton": "t-new", "torch": "p-new",
              "shapes": {"128x256": {"1": {"kernel": "gemv_mma", "block_m": 1}, "8": {"kernel": "decode"}}}}

    def tune(shapes, ms, dtype, jobs, log, budget, kernels=None, incumbent=None):
        inc = json.loads(json.dumps(incumbent))   # main() later merges into the same dict
        calls.append(dict(shapes=shapes, ms=ms, dtype=dtype, kernels=kernels, incumbent=inc))
        return json.loads(json.dumps(answer))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 9000")
    monkeypatch.setattr(at, "tune", tune)
    return at, calls, answer


def test_autotune_main_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    """Without a CUDA GPU the tuner exits 2 with a message and writes nothing."""
    import kernels.w4a16_autotune as at

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "t.json"
    assert at.main(["--out", str(out)]) == 2
    assert "CUDA" in capsys.readouterr().err and not out.exists()


def test_autotune_main_writes_the_table_atomically(tmp_path, fake_tuner):
    """--out FILE (parents created): the tune() result as sorted-key JSON ending in a newline, no .tmp left; shapes
    parsed from NxK, --ms as ints, --dtype as a torch dtype; no incumbent without --merge --kernels."""
    at, calls, answer = fake_tuner
    out = tmp_path / "sub" / "dir" / "t.json"
    assert at.main(["--out", str(out), "--shapes", "128x256", "64x512", "--ms", "1", "8", "--dtype", "float16"]) == 0
    text = out.read_text()
    assert json.loads(text) == answer and text.endswith("\n")
    assert text == json.dumps(answer, indent=1, sort_keys=True) + "\n"
    assert not os.path.exists(str(out) + ".tmp")
    assert calls == [dict(shapes=[(128, 256), (64, 512)], ms=[1, 8], dtype=torch.float16, kernels=None,
                          incumbent=None)]


def test_autotune_merge_keeps_other_entries_and_notes(tmp_path, fake_tuner):
    """--merge: the existing --out table's other shapes and M entries stay, the tuned (shape, M) entries replace
    theirs, merged_into records the base's date/triton/torch, the base's extra notes are kept but never override the
    new run's own keys; with --kernels the base's shapes are passed to tune() as the incumbent."""
    at, calls, answer = fake_tuner
    out = tmp_path / "t.json"
    base = {"device": "Fake GPU 9000", "date": "2000-01-01", "triton": "t-old", "torch": "p-old", "note": "keep me",
            "shapes": {"128x256": {"1": {"kernel": "old"}, "64": {"kernel": "old64"}},
                       "9x9": {"4": {"kernel": "other"}}}}
    out.write_text(json.dumps(base))
    assert at.main(["--out", str(out), "--merge", "--kernels", "decode"]) == 0
    got = json.loads(out.read_text())
    assert got["shapes"] == {"128x256": {"1": answer["shapes"]["128x256"]["1"], "8": {"kernel": "decode"},
                                         "64": {"kernel": "old64"}},
                             "9x9": {"4": {"kernel": "other"}}}
    assert got["merged_into"] == {"date": "2000-01-01", "triton": "t-old", "torch": "p-old"}
    assert got["note"] == "keep me" and got["date"] == "2099-01-01" and got["triton"] == "t-new"
    assert calls[-1]["incumbent"] == base["shapes"] and calls[-1]["kernels"] == ["decode"]
    # --merge without --kernels: nothing is timed as the incumbent
    out.write_text(json.dumps(base))
    assert at.main(["--out", str(out), "--merge"]) == 0
    assert calls[-1]["incumbent"] is None and "64" in json.loads(out.read_text())["shapes"]["128x256"]


def test_autotune_without_merge_replaces_the_table(tmp_path, fake_tuner):
    """Without --merge an existing --out is replaced by the new table; --merge with no table to read writes the new
    table as is (no merged_into); only --merge times the table's own entries as incumbents."""
    at, calls, answer = fake_tuner
    out = tmp_path / "t.json"
    out.write_text(json.dumps({"shapes": {"9x9": {"4": {}}}, "note": "old"}))
    assert at.main(["--out", str(out), "--kernels", "decode"]) == 0
    assert json.loads(out.read_text()) == answer and calls[-1]["incumbent"] is None   # no --merge: no incumbent
    fresh = tmp_path / "fresh.json"
    assert at.main(["--out", str(fresh), "--merge"]) == 0
    assert json.loads(fresh.read_text()) == answer


@pytest.fixture
def fake_gpu_tune(monkeypatch):
    """tune() with the GPU parts faked: the compile + gate keep a chosen set, timing is a function of the config."""
    import kernels.w4a16_autotune as at

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132,
                                                                                         name="Fake GPU"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **kw: real_randn(*a, **kw))
    monkeypatch.setattr(at, "rotated_problem", lambda n, k, dtype, dev: ([torch.zeros(1)] * 2, [torch.zeros(1)] * 2,
                                                                         n * k // 2))
    monkeypatch.setattr(at, "precompile", lambda cfgs, dtype, jobs, log: set(cfgs))
    state = {"gate": None, "us": None}
    monkeypatch.setattr(at, "correctness_gate", lambda cfgs, dtype, log: {c for c in cfgs if state["gate"](c)})
    import kernels.w4a16 as w
    monkeypatch.setattr(w, "w4a16_gemm", lambda x, wp, s, config=None: config)
    monkeypatch.setattr(at, "graph_time_us", lambda call, n: state["us"](call(0)))
    return at, state


def test_tune_keeps_the_fastest_gated_fitting_variant(fake_gpu_tune):
    """tune(): among candidates that pass the gate and fit (K blocks of block_k, N % block_n), the fastest launch is
    stored as its JSON; failing and non-fitting candidates are never chosen even when 'faster'; kernels= restricts
    the candidates to those kernels."""
    at, state = fake_gpu_tune
    from kernels.w4a16_config import W4A16Config

    n, k, m = 64 * 41, 128 * 21, 8   # block_n 128/256 and block_k 256 do not divide these
    cands = at.candidates_for(m)

    def fits(c):
        return c.fits(k, 128) and n % c.block_n == 0

    assert [c for c in cands if not c.fits(k, 128)] and [c for c in cands if n % c.block_n]
    target = [c for c in cands if fits(c)][1]
    cheat = next(c for c in cands if c != target and fits(c))
    state["gate"] = lambda c: c != cheat
    state["us"] = lambda c: (0.5 if at.base_variant(c) == cheat or not fits(c) else
                             1.0 if at.base_variant(c) == target else 5.0)
    res = at.tune([(n, k)], [m], torch.bfloat16, 1, lambda s: None)
    got = W4A16Config(**res["shapes"][f"{n}x{k}"][str(m)])
    assert at.base_variant(got) == target
    assert res["sm_count"] == 132 and res["dtype"] == "bfloat16" and res["device"] == "Fake GPU"
    other = next(c for c in cands if fits(c) and c.kernel != target.kernel)
    res = at.tune([(n, k)], [m], torch.bfloat16, 1, lambda s: None, kernels=(other.kernel,))
    assert W4A16Config(**res["shapes"][f"{n}x{k}"][str(m)]).kernel == other.kernel


def test_tune_incumbent_kept_unless_beaten_and_budget_leaves_no_untried_entry(fake_gpu_tune):
    """tune(incumbent=...): the table's own entry is timed beside the candidates and kept unless one is faster; once
    the time budget is spent, a (shape, M) without an incumbent gets no entry."""
    at, state = fake_gpu_tune
    from kernels.w4a16_config import W4A16Config

    n, k, m = 2560, 2560, 8
    inc = W4A16Config("decode", 16, 128, 128, 2, 4, 4, True, True)
    state["gate"] = lambda c: True
    state["us"] = lambda c: 1.0 if c == inc else 2.0
    res = at.tune([(n, k)], [m], torch.bfloat16, 1, lambda s: None,
                  incumbent={f"{n}x{k}": {str(m): inc.to_json()}})
    assert W4A16Config(**res["shapes"][f"{n}x{k}"][str(m)]) == inc
    state["us"] = lambda c: 1.0   # a tie: the incumbent stays (only a faster launch replaces it)
    res = at.tune([(n, k)], [m], torch.bfloat16, 1, lambda s: None,
                  incumbent={f"{n}x{k}": {str(m): inc.to_json()}})
    assert W4A16Config(**res["shapes"][f"{n}x{k}"][str(m)]) == inc
    state["us"] = lambda c: 3.0 if c == inc else 2.0
    res = at.tune([(n, k)], [m], torch.bfloat16, 1, lambda s: None,
                  incumbent={f"{n}x{k}": {str(m): inc.to_json()}})
    assert W4A16Config(**res["shapes"][f"{n}x{k}"][str(m)]) != inc
    res = at.tune([(n, k)], [m, 16], torch.bfloat16, 1, lambda s: None, time_budget_s=-1.0,
                  incumbent={f"{n}x{k}": {str(m): inc.to_json()}})
    assert res["shapes"][f"{n}x{k}"] == {str(m): inc.to_json()}


def test_precompile_dedupes_spreads_over_jobs_and_drops_failures(monkeypatch):
    """precompile(): one compile per base variant (split-K / stream-K launches share it), spread over at most
    ``jobs`` workers (no empty ones), in the dtype asked; a variant whose compile fails is logged and left out."""
    import kernels.w4a16_autotune as at
    from kernels.w4a16_config import W4A16Config

    pools, seen = [], []

    class Pool:
        def __init__(self, n):
            pools.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def imap_unordered(self, fn, items):
            return map(fn, items)

    def worker(args):
        cfgs, dtype_name = args
        seen.append((len(cfgs), dtype_name))
        return [(c, "Boom: no" if c["block_n"] == 256 else None, 0.0) for c in cfgs]

    monkeypatch.setattr(at.mp, "get_context", lambda kind: SimpleNamespace(Pool=Pool))
    monkeypatch.setattr(at, "_compile_worker", worker)
    a = W4A16Config("decode", 16, 128, 128, 1, 4, 4, True, True)
    b = W4A16Config("decode", 16, 256, 128, 1, 8, 3, True, True)
    logs = []
    ok = at.precompile([a, dataclasses.replace(a, split_k=4), b, dataclasses.replace(b, split_k=2)], torch.float16, 5,
                       logs.append)
    assert ok == {a} and pools == [2] and sorted(seen) == [(1, "float16"), (1, "float16")]
    assert any("compile FAILED" in m and "Boom" in m for m in logs)


def test_correctness_gate_checks_every_documented_variant(monkeypatch):
    """correctness_gate(): a config is dropped when any checked launch misses the tolerance: decode at split-K 3
    (M 5 and 16), gemv_mma8 at M 13, prefill_wsp with stream-K, prefill at odd M; a NaN output fails; a config right
    on every checked launch passes (K 4096 for a block_k that does not divide 2560)."""
    import kernels.w4a16 as w
    import kernels.w4a16_autotune as at
    from kernels.w4a16_config import W4A16Config

    real_randn, real_mp = torch.randn, at.make_problem
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **kw: real_randn(*a, **kw))
    monkeypatch.setattr(at, "make_problem", lambda n, k, dtype, dev, seed=0: real_mp(n // 8, k, dtype, "cpu",
                                                                                       seed=seed))
    dec = W4A16Config("decode", 16, 128, 128, 1, 4, 4, True, True)
    mma8 = W4A16Config("gemv_mma8", 16, 16, 1024, 1, 4, 3)
    wsp = W4A16Config("prefill_wsp", 128, 128, 128, 1, 4, 3)
    pre = W4A16Config("prefill", 64, 128, 64, 1, 4, 3)
    tma = W4A16Config("prefill_tma", 64, 64, 128, 1, 4, 3)
    seen = []

    def wrong(cfg, m):
        return {"dec": cfg.split_k == 3, "mma8": m == 13, "wsp": cfg.stream_k, "pre": m % 2 == 1,
                "tma": cfg.split_k == 3}[state["who"]] and cfg.kernel == state["kern"]

    state = {}

    def gemm(x, wp, s, config=None):
        seen.append((config, x.shape[0], wp.shape[1] * 8))
        y = _ref(x, wp, s)
        if wrong(config, x.shape[0]):
            y = y + 1.0
        return y

    monkeypatch.setattr(w, "w4a16_gemm", gemm)
    for who, cfg in (("dec", dec), ("mma8", mma8), ("wsp", wsp), ("pre", pre), ("tma", tma)):
        state.update(who=who, kern=cfg.kernel)
        assert at.correctness_gate({cfg}, torch.bfloat16, lambda s: None) == set(), who
        state.update(kern="none")
        assert at.correctness_gate({cfg}, torch.bfloat16, lambda s: None) == {cfg}, who
    seen.clear()
    assert at.correctness_gate({mma8}, torch.bfloat16, lambda s: None) == {mma8}
    assert {(m, k) for _, m, k in seen} == {(5, 4096), (13, 4096), (16, 4096)}   # block_k 1024 does not divide 2560

    def nan(x, wp, s, config=None):
        return torch.full((x.shape[0], wp.shape[0]), float("nan"), dtype=x.dtype)

    monkeypatch.setattr(w, "w4a16_gemm", nan)
    logs = []
    assert at.correctness_gate({pre}, torch.bfloat16, logs.append) == set() and "WRONG" in logs[0]


# =============================================================================================== verify
def test_scalar_type_id_bit_layout():
    """scalar_type_id packs exponent 8b | mantissa 8b | signed 1b | bias 32b | finite_only 1b | nan_repr 8b from bit
    0 up, masking each field; uint4b8 is vLLM's 1125899907892224 (= 2^50 + 8 * 2^17 + 4 * 2^8)."""
    from kernels.verify import U4B8_ID, scalar_type_id

    assert U4B8_ID == 2**50 + 8 * 2**17 + 4 * 2**8
    assert scalar_type_id(5, 2, True, 15, True, 3) == 5 + (2 << 8) + (1 << 16) + (15 << 17) + (1 << 49) + (3 << 50)
    assert scalar_type_id(0, 0, False, -1, nan_repr=0) == (2**32 - 1) << 17   # a negative bias, two's complement
    assert scalar_type_id(0x1FF, 0, False, 0, nan_repr=0) == 0xFF           # masked to its 8 bits


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_compare_counts_mismatches_and_ulps_across_zero(dtype):
    """compare(): mismatching elements and the max distance in representable steps, +0/-0 being 0 steps apart but
    different bits, the smallest subnormals of opposite signs 2 steps apart."""
    from kernels.verify import compare

    a = torch.tensor([1.0, -3.0, 0.0, 100.0], dtype=dtype)
    b = a.clone()
    assert compare(a, b) == (0, 0)
    b = a.clone()
    for _ in range(3):   # three representable steps up from 100
        b[3] = (b[3].float() + _ulp(b[3], dtype)).to(dtype)
    assert compare(a, b) == (1, 3)
    b[0] = (b[0].float() + _ulp(b[0], dtype)).to(dtype)   # a second element, one step off: the max stays 3
    assert compare(a, b) == (2, 3)
    neg0 = torch.tensor([0.0, -0.0], dtype=dtype)
    assert compare(neg0[:1], neg0[1:]) == (1, 0)
    tiny = torch.tensor([1], dtype=torch.int16).view(dtype)
    assert compare(tiny, -tiny) == (1, 2)
    b = a.clone()
    b[1] = -b[1]   # -3 vs 3: 2 * (steps from 0 to 3)
    steps_to_3 = int(torch.tensor([3.0], dtype=dtype).view(torch.int16))
    assert compare(a, b) == (1, 2 * steps_to_3)
    assert compare(a[:0], b[:0]) == (0, 0)


def _ulp(v, dtype):
    p = 7 if dtype == torch.bfloat16 else 10
    _, e = torch.frexp(v.float())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), e - 1 - p)


def test_failures_counts_every_documented_failure():
    """failures(): a case fails on an error, any mismatch, a missing mismatch count, a variant or emulation
    mismatch; an SM row on an error, mismatches, errors, a missing count or a shim that reported another count."""
    from kernels.verify import failures

    ok = {"mismatches": 0}
    assert failures([ok, dict(ok, variant_mismatches=0, emulation_mismatches=0)]) == 0
    for bad in ({"error": "x", "mismatches": 0}, {"mismatches": 2}, {}, dict(ok, variant_mismatches=1),
                dict(ok, emulation_mismatches=1)):
        assert failures([ok, bad]) == 1, bad
    row = {"sms": 100, "reported_by_shim": 100, "mismatches": 0, "errors": 0}
    assert failures([], [row]) == 0
    for bad in (dict(row, error="e"), dict(row, mismatches=1), dict(row, errors=1), dict(row, reported_by_shim=132),
                dict(row, reported_by_shim=None), {k: v for k, v in row.items() if k != "mismatches"},
                {k: v for k, v in row.items() if k != "errors"}):
        assert failures([ok], [bad]) == 1, bad
    assert failures([{"mismatches": 1}, {"mismatches": 0, "variant_mismatches": 4}], [dict(row, errors=2)]) == 3


def test_summary_totals_per_shape():
    """summary(): per shape the cases, elements (M x N), summed mismatches, max ulp, cases with a tiling re-run and
    errors; a TOTAL row; an unnamed shape is listed as NxK."""
    from kernels.verify import summary

    rs = [{"shape": "a", "n": 64, "k": 128, "m": 3, "mismatches": 2, "max_ulp": 4, "variant_mismatches": 0},
          {"shape": "a", "n": 64, "k": 128, "m": 5, "mismatches": 1, "max_ulp": 1},
          {"shape": "", "n": 128, "k": 256, "m": 2, "error": "boom"}]
    lines = summary(rs).splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}
    assert rows["a"] == ["2", str(3 * 64 + 5 * 64), "3", "4", "1", "0"]
    assert rows["128x256"] == ["1", "256", "0", "0", "0", "1"]
    assert rows["TOTAL"] == ["3", str(3 * 64 + 5 * 64 + 256), "3", "4", "1", "1"]


def test_golden_keeps_exact_and_small_random_cases_without_errors():
    """golden(): every exact case, random cases with N*K <= 2^23 and M <= 256 (at most 40, spread), none with an
    error, and only the recorded fields."""
    from kernels.verify import golden

    rs = [{"id": i, "data": "exact", "n": 64, "k": 128, "m": 1} for i in range(3)]
    rs += [{"id": 100 + i, "data": "random", "n": 2048, "k": 4096, "m": 256 if i % 2 else 257} for i in range(200)]
    rs += [{"id": 999, "data": "random", "n": 4096, "k": 4096, "m": 1}]   # 2^24 elements: too big
    rs += [{"id": 7, "data": "exact", "n": 64, "k": 128, "m": 1, "error": "e"}]
    g = golden(rs, {"device": "X"})
    ids = [c["id"] for c in g["cases"]]
    assert g["meta"] == {"device": "X"}
    assert ids[:3] == [0, 1, 2] and 7 not in ids and 999 not in ids
    rand = ids[3:]
    assert 30 <= len(rand) <= 40 and all((i - 100) % 2 == 1 for i in rand)
    assert rand[-1] - rand[0] > 100     # spread over the sweep, not its head
    assert set(g["cases"][0]) == {"id", "n", "k", "m", "dtype", "group", "bias", "fp32_reduce", "seed", "data",
                                  "sms", "schedule_sha", "marlin_sha", "mismatches"}


def test_sweeps_cover_what_they_promise():
    """full_cases: >= 500 cases with ids 0..N-1, every shape one the kernels tile (N % 64, K % 128), every M on the
    six E4B shapes in both dtypes and group 128 / channelwise, odd-tile shapes (N % 128, K % 256, N % 256 != 0, a
    single 64-column tile) and group 32/64; same seed, same sweep. reduced_cases: the four pruned shapes x 6 M,
    both dtypes and both group kinds."""
    from kernels.verify import E4B_FULL, E4B_PRUNED, M_VALUES, full_cases, reduced_cases

    cs = full_cases(0)
    assert len(cs) >= 500 and [c.id for c in cs] == list(range(len(cs))) and cs == full_cases(0)
    assert cs != full_cases(1)
    assert all(c.n % 64 == 0 and c.k % 128 == 0 and c.n > 0 and c.k > 0 for c in cs)
    for name, (n, k) in {**E4B_PRUNED, **E4B_FULL}.items():
        got = {(c.m, c.dtype, c.group) for c in cs if c.shape == name and (c.n, c.k) == (n, k)}
        assert got == {(m, d, g) for m in M_VALUES for d in ("bf16", "fp16") for g in (128, -1)}
    rand = {(c.n, c.k) for c in cs if c.shape.startswith("rand")}
    assert any(n % 128 for n, _ in rand) and any(k % 256 for _, k in rand) and any(n % 256 for n, _ in rand)
    assert any(n == 64 for n, _ in rand)
    assert {c.group for c in cs if c.shape in ("g32", "g64")} == {32, 64}
    assert {c.bias for c in cs} == {True, False} and {c.fp32_reduce for c in cs} == {True, False}
    assert len({c.seed for c in cs}) == len(cs)
    rc = reduced_cases()
    assert len(rc) == 24 and {(c.n, c.k) for c in rc} == set(E4B_PRUNED.values())
    assert {c.dtype for c in rc} == {"bf16", "fp16"} and {c.group for c in rc} == {128, -1}
    assert all(sorted(c.m for c in rc if c.shape == s) == [1, 7, 16, 33, 65, 256] for s in E4B_PRUNED)


def test_make_weights_and_activations_on_cpu():
    """make_weights: int4 codes in [-8, 7] packed [N, K/8], positive scales [N, K/G] (channelwise: one column) over
    several binades, reproducible from the seed. make_activations: x [M, K] in the dtype, bias [N] only if asked."""
    from kernels.verify import Case, make_activations, make_weights

    wp, s = make_weights(128, 512, 128, torch.bfloat16, 3, "cpu")
    assert wp.shape == (128, 64) and s.shape == (128, 4) and bool((s > 0).all())
    ratio = float(s.float().max() / s.float().min())
    assert ratio > 16
    wp2, s2 = make_weights(128, 512, 128, torch.bfloat16, 3, "cpu")
    assert torch.equal(wp, wp2) and torch.equal(s, s2)
    _, sc = make_weights(64, 256, -1, torch.float16, 3, "cpu")
    assert sc.shape == (64, 1) and sc.dtype == torch.float16
    case = Case(0, 128, 256, 5, "bf16", 128, True, True, 11)
    x, b = make_activations(case, torch.bfloat16, "cpu")
    assert x.shape == (5, 256) and x.dtype == torch.bfloat16 and b.shape == (128,) and b.dtype == torch.bfloat16
    x2, b2 = make_activations(dataclasses.replace(case, bias=False), torch.bfloat16, "cpu")
    assert b2 is None and torch.equal(x, x2)


def test_verify_main_refuses_without_cuda(monkeypatch, capsys):
    """python -m kernels.verify exits 2 with a message when there is no CUDA GPU."""
    from kernels import verify

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert verify.main(["--sweep", "none"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_run_cases_harness_on_cpu_with_fake_kernels(monkeypatch):
    """run_cases (device='cpu', fake Marlin): each case compares our kernel with Marlin's bits; every 3rd case
    re-runs another tiling, other M <= 16 cases the decode variant, control_sms runs a second SM count; a Marlin
    that differs shows up as mismatches of its shape only; a failing case records its error and the sweep goes on;
    results come back ordered by id."""
    import kernels.w4a16_marlin as wm
    from kernels.verify import DECODE_VARIANT, Case, run_cases

    calls = []

    def ours(x, wp, ws, bias, fp32_reduce, sms, **kw):
        calls.append(kw)
        return _ref(x, wp, ws, bias)

    monkeypatch.setattr(wm, "w4a16_gemm_exact", ours)

    def factory(wp, ws, group):
        n = wp.shape[0]
        if n == 192:
            raise RuntimeError("marlin refused")

        def marlin(x, bias, fp32_reduce):
            y = _ref(x, wp, ws, bias)
            if n == 64:   # a Marlin that differs in one element
                y = y.clone()
                y[0, 0] = -y[0, 0] if y[0, 0] != 0 else 1
            return y
        return marlin

    cases = [Case(i, n, 256, m, "bf16", 128, i % 2 == 0, True, 5 + i, "s")
             for i, (n, m) in enumerate([(128, 1), (128, 16), (128, 5), (64, 2), (192, 3), (128, 17)])]
    res = run_cases(cases, sms=8, control_sms=4, sanity=1, log=lambda s: None, device="cpu",
                    marlin_factory=factory)
    assert [r["id"] for r in res] == list(range(6))
    by = {r["id"]: r for r in res}
    assert [by[i]["mismatches"] for i in (0, 1, 2, 5)] == [0, 0, 0, 0]
    assert by[3]["mismatches"] == 1 and by[3]["max_ulp"] > 0
    assert "marlin refused" in by[4]["error"] and "mismatches" not in by[4]
    assert by[0]["variant"].startswith("bm") and by[3]["variant"].startswith("bm")   # ids 0, 3: another tiling
    assert by[2]["variant"].startswith("decode-") and by[1]["variant"].startswith("decode-")   # M <= 16
    assert "variant" not in by[5] and DECODE_VARIANT in calls                                     # M = 17: none
    assert all(by[i]["control_sms"] == 4 for i in (0, 1, 2, 3, 5))
    assert sum("rel_err_vs_fp32" in r for r in res) == 1
    assert all(by[i]["sms"] == 8 for i in range(6))


# =============================================================================================== linear
def test_w4a16_linear_dtypes_bias_buffers_and_repr():
    """W4A16Linear: dtype defaults to the scales'; bias cast to it, frozen; weight_shape [N, K] int64; contiguous
    buffers; forward takes [..., K]; repr names features, group size, bias and dtype; fp32 is refused."""
    from kernels.linear import W4A16Linear

    x, wp, s, b = _problem(6, 128, 256, group=64, dtype=torch.float16, bias=True)
    lin = W4A16Linear(wp, s, b.float())
    assert lin.weight_scale.dtype == torch.float16 and lin.bias.dtype == torch.float16
    assert not lin.bias.requires_grad
    assert lin.weight_shape.dtype == torch.int64 and lin.weight_shape.tolist() == [128, 256]
    y = lin(x.reshape(2, 3, 256))
    assert y.shape == (2, 3, 128) and torch.equal(y.reshape(6, 128), _ref(x, wp, s, b))
    r = repr(lin)
    for part in ("in_features=256", "out_features=128", "group_size=64", "bias=True", "dtype=torch.float16"):
        assert part in r
    nb = W4A16Linear(wp, s, None, dtype=torch.bfloat16)
    assert nb.bias is None and "bias=False" in repr(nb) and "dtype=torch.bfloat16" in repr(nb)
    assert torch.equal(nb(x.bfloat16()), _ref(x.bfloat16(), wp, s.bfloat16()))
    wt = torch.cat([wp, wp], 1)[:, ::2]   # a non-contiguous view
    assert W4A16Linear(wt, s).weight_packed.is_contiguous()
    assert {"weight_packed", "weight_scale", "weight_shape", "bias"} <= set(lin.state_dict())
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        W4A16Linear(wp, s.float())


def test_w4a16_linear_refuses_what_its_op_would_at_construction():
    """The op's rules hold when the layer is built, named after it (before, each passed until the first forward,
    a GPTQ-layout [K/8, N] weight with its features swapped, and 1-D scales made repr() raise)."""
    from kernels.linear import W4A16Linear

    _, wp, s, b = _problem(1, 128, 256, bias=True)
    for args, what in (((wp, s[:, 0]), "weight_scale must be"), ((wp, s[:, :0]), "weight_scale must be"),
                       ((wp.t().contiguous(), s), "need N and K positive"),
                       ((wp[:100], s[:100]), "need N and K positive"),
                       ((wp, s[:, :1].repeat(1, 3)), "weight_scale must be"),
                       ((wp, s, b[:64]), "bias must be"), ((wp.float(), s), "weight_packed must be int32"),
                       ((wp[0], s), "weight_packed must be int32"),
                       ((wp, s.to("meta")), "operands on different devices")):
        with pytest.raises(ValueError, match=f"^W4A16Linear: {what}"):
            W4A16Linear(*args)


def test_a_meta_operand_is_refused_by_both_ops_not_answered_with_garbage():
    """The dispatcher sends a call with any meta operand to the op's fake implementation, not to the kernel wrapper
    that refuses mixed devices: it must refuse them too (before: uninitialised memory on x's device, returned as
    the product). All-meta operands (tracing) still give the output's shape."""
    import kernels.exact_op  # noqa: F401  (registers the ops)
    import kernels.ops  # noqa: F401

    x, wp, s, b = _problem(3, 128, 256, bias=True)
    ops = (lambda *a: torch.ops.pdqkit.w4a16_gemm(*a), lambda *a: torch.ops.pdqkit.w4a16_gemm_exact(*a, True, 16))
    for op in ops:
        for args in ((x, wp, s, b.to("meta")), (x, wp, s.to("meta"), b), (x.to("meta"), wp, s, None)):
            with pytest.raises(ValueError, match="operands on different devices"):
                op(*args)
        y = op(x.to("meta"), wp.to("meta"), s.to("meta"), b.to("meta"))
        assert y.device.type == "meta" and y.shape == (3, 128) and y.dtype == x.dtype


def test_exact_refuses_a_0d_x_in_one_line():
    from kernels.w4a16_marlin import w4a16_gemm_exact

    _, wp, s, _ = _problem(1, 128, 256)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K\], got a 0-d tensor"):
        w4a16_gemm_exact(torch.tensor(1.0, dtype=torch.bfloat16), wp, s)


def _compressed(n, k, group=128, in_features=None, bias=True, seed=0, ws=None, wp_dtype=torch.int32, scheme=None):
    _, wp, s, b = _problem(1, n, k, group=group, seed=seed, bias=bias)
    lin = nn.Linear(in_features or k, n, bias=bias)
    del lin.weight
    if bias:
        lin.bias = nn.Parameter(b.float())
    lin.register_buffer("weight_packed", wp.to(wp_dtype))
    lin.register_buffer("weight_scale", s if ws is None else ws)
    if scheme is not None:
        lin.quantization_scheme = SimpleNamespace(weights=scheme)
    return lin


def _scheme(**kw):
    return SimpleNamespace(**{**dict(num_bits=4, symmetric=True, type=SimpleNamespace(value="int"), actorder=None),
                              **kw})


def test_swap_rules_on_a_toy_model():
    """swap_w4a16_linears: swaps nested int4 layers (same outputs as the reference, bias kept) and leaves N % 64,
    a K that is not the layer's in_features, block scales, unsupported groups, non-int32 codes and schemes that are
    not symmetric int4 without act order; the hook stays while anything is still compressed."""
    from kernels.linear import W4A16Linear, swap_w4a16_linears

    model = nn.Module()
    model.block = nn.Module()
    model.block.good = _compressed(128, 256, scheme=_scheme(actorder=False))
    model.top = _compressed(64, 128, group=64, bias=False)
    model.n96 = _compressed(96, 256, seed=1)
    model.kdiff = _compressed(128, 256, in_features=512, seed=2)
    model.block_scales = _compressed(128, 256, ws=torch.rand(1, 2).bfloat16(), seed=3)
    model.g16 = _compressed(128, 256, group=16, seed=4)
    model.int64 = _compressed(128, 256, wp_dtype=torch.int64, seed=5)
    model.bits8 = _compressed(128, 256, scheme=_scheme(num_bits=8), seed=6)
    model.asym = _compressed(128, 256, scheme=_scheme(symmetric=False), seed=7)
    model.flt = _compressed(128, 256, scheme=_scheme(type=SimpleNamespace(value="float")), seed=8)
    model.actorder = _compressed(128, 256, scheme=_scheme(actorder="group"), seed=9)
    removed = []
    model.ct_decompress_hook = SimpleNamespace(remove=lambda: removed.append(1))
    wp, ws, b = model.block.good.weight_packed, model.block.good.weight_scale, model.block.good.bias
    names = swap_w4a16_linears(model, dtype=torch.bfloat16)
    assert names == ["block.good", "top"]
    assert isinstance(model.block.good, W4A16Linear) and isinstance(model.top, W4A16Linear)
    x = torch.randn(3, 256).bfloat16()
    assert torch.equal(model.block.good(x), _ref(x, wp, ws, b.bfloat16()))
    assert model.top.bias is None
    assert not removed and hasattr(model, "ct_decompress_hook")


def test_swap_removes_the_hook_when_nothing_is_left_and_defaults_the_dtype():
    """With every compressed layer swapped, the decompression hook is removed once; the activation dtype defaults to
    the model's first floating-point parameter (fp16 here)."""
    from kernels.linear import swap_w4a16_linears

    model = nn.Module()
    model.emb = nn.Embedding(4, 8).half()
    model.a = _compressed(128, 256, bias=False)
    removed = []
    model.ct_decompress_hook = SimpleNamespace(remove=lambda: removed.append(1))
    assert swap_w4a16_linears(model) == ["a"]
    assert model.a.weight_scale.dtype == torch.float16
    assert removed == [1] and not hasattr(model, "ct_decompress_hook")


def test_swap_puts_the_layer_on_the_modules_own_device():
    """The swapped layer lives where the replaced module's own parameters are (here a 'meta' bias), not where the
    packed tensors came from (a checkpoint read lands on the CPU)."""
    from kernels.linear import swap_w4a16_linears

    model = nn.Module()
    model.a = _compressed(128, 256)
    model.a.bias = nn.Parameter(torch.empty(128, device="meta"))
    assert swap_w4a16_linears(model, dtype=torch.bfloat16) == ["a"]
    assert {t.device.type for t in (model.a.weight_packed, model.a.weight_scale, model.a.bias)} == {"meta"}


def test_checkpoint_reader_index_glob_and_missing(tmp_path):
    """_checkpoint_reader: with model.safetensors.index.json it follows the weight map; without one it scans every
    *.safetensors; a key not stored reads None; a dir without safetensors is a FileNotFoundError."""
    from safetensors.torch import save_file

    from kernels.linear import _checkpoint_reader

    a, b = torch.arange(4.0), torch.arange(6).int()
    save_file({"x.a": a}, str(tmp_path / "m-1.safetensors"))
    save_file({"y.b": b}, str(tmp_path / "m-2.safetensors"))
    read = _checkpoint_reader(tmp_path)
    assert torch.equal(read("x.a"), a) and torch.equal(read("y.b"), b) and read("z") is None
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"y.b": "m-2.safetensors"}}))
    read = _checkpoint_reader(tmp_path)
    assert torch.equal(read("y.b"), b) and read("x.a") is None
    with pytest.raises(FileNotFoundError, match="safetensors"):
        _checkpoint_reader(tmp_path / "empty_dir_that_is_missing")


# =============================================================================================== toolrun
def test_run_exec_exit_status_merged_output_and_timeout(tmp_path):
    """run_exec (the reference launch): the exit status and stdout+stderr together; on timeout returncode None,
    timed_out True and the output printed so far."""
    from bench.toolrun import run_exec

    (tmp_path / "pdq_a2_t.py").write_text(
        "import sys, time\nprint('out', flush=True)\nprint('err', file=sys.stderr, flush=True)\n"
        "if sys.argv[1] == 'sleep':\n    time.sleep(60)\nsys.exit(int(sys.argv[1]))\n")
    r = run_exec([sys.executable, "-m", "pdq_a2_t", "7"], cwd=tmp_path, timeout=60)
    assert r.returncode == 7 and not r.timed_out and r.output == "out\nerr\n"
    t = time.time()
    r = run_exec([sys.executable, "-m", "pdq_a2_t", "sleep"], cwd=tmp_path, timeout=2)
    assert r.timed_out and r.returncode is None and "out" in r.output and time.time() - t < 30


@pytest.fixture(scope="module")
def runner2():
    from bench.toolrun import ToolRunner

    r = ToolRunner(preload=("json.decoder",))
    r.start()
    return r


@pytest.mark.parametrize("before", [None, "0"])
def test_start_restores_the_callers_nvml_variable(monkeypatch, before):
    """ToolRunner.start sets PYTORCH_NVML_BASED_CUDA_CHECK=1 for the forkserver only: afterwards the caller's value
    is back (or the variable is absent again)."""
    from bench.toolrun import ToolRunner

    if before is None:
        monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", before)
    ToolRunner(preload=("json.decoder",)).start()
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == before


def test_child_environment_is_the_callers_not_the_forkservers(tmp_path, monkeypatch, runner2):
    """The child's os.environ is the caller's at run time: the forkserver's own PYTORCH_NVML_BASED_CUDA_CHECK=1 and
    variables the caller removed since do not leak in."""
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    monkeypatch.delenv("PDQ_A2_GONE", raising=False)
    (tmp_path / "pdq_env_t.py").write_text(
        "import os\nprint(os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'), os.environ.get('PDQ_A2_GONE'),"
        " os.environ.get('PDQ_A2_NEW'))\n")
    monkeypatch.setenv("PDQ_A2_NEW", "yes")
    got = runner2.run([sys.executable, "-m", "pdq_env_t"], cwd=tmp_path, timeout=60)
    assert got.returncode == 0 and got.output == "None None yes\n"


def test_interrupted_caller_kills_the_child(tmp_path, monkeypatch, runner2):
    """When the caller is interrupted while waiting, run() kills the tool before re-raising (as subprocess.run)."""
    import multiprocessing.connection

    pidfile = tmp_path / "pid"
    (tmp_path / "pdq_sleep_t.py").write_text(
        f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    real_wait = multiprocessing.connection.wait

    def wait(objs, timeout=None):
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text():
                break
            real_wait(objs, 0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(multiprocessing.connection, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        runner2.run([sys.executable, "-m", "pdq_sleep_t"], cwd=tmp_path, timeout=60)
    monkeypatch.setattr(multiprocessing.connection, "wait", real_wait)
    pid = int(pidfile.read_text())

    def alive():
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\nState:\tZ" not in f.read()
        except FileNotFoundError:
            return False

    deadline = time.time() + 5
    while alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not alive()
