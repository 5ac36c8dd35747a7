"""Marlin (vLLM 0.26.0) host schedule: spec marlin-arithmetic.md §6.7 tables and structural properties."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.marlin_schedule import (
    FEW_TILES_CONFIG,
    MarlinProblem,
    ThreadConfig,
    build_schedule,
    kernel_cache_size,
)

# Spec §6.7 (H100/H200, sms = 132, group 128): (N, K) -> rows of
# (launch rows, tmb, m8, (thread_k, thread_n, threads), KW, par, k_tiles, T, P1, T2, iters, pieces)
SPEC_TABLES = {
    (10240, 2560): [
        (range(1, 9), 1, 1, (128, 128, 256), 4, 1, 20, 80, 0, 80, 13, (2, 3)),
        (range(9, 17), 1, 0, (128, 128, 256), 4, 1, 20, 80, 0, 80, 13, (2, 3)),
        (range(17, 65), None, 0, (64, 256, 256), 2, 1, 40, 40, 0, 40, 14, (3, 4)),
        ([128], 4, 0, (64, 256, 256), 2, 2, 40, 80, 0, 80, 26, (2, 3)),
        ([256], 4, 0, (64, 256, 256), 2, 4, 40, 160, 0, 160, 50, (1, 2)),
        ([512], 4, 0, (64, 256, 256), 2, 8, 40, 320, 2, 56, 18, (3, 4)),
        ([1024], 4, 0, (64, 256, 256), 2, 16, 40, 640, 4, 112, 34, (2, 3)),
    ],
    (2560, 10240): [
        (range(1, 9), 1, 1, (128, 64, 128), 4, 1, 80, 40, 0, 40, 25, (4,)),
        (range(9, 65), None, 0, (128, 64, 128), 4, 1, 80, 40, 0, 40, 25, (4,)),
        ([128], 4, 0, (128, 64, 128), 4, 2, 80, 80, 0, 80, 49, (2, 3)),
        ([192], 4, 0, (128, 64, 128), 4, 3, 80, 120, 0, 120, 73, (2, 3)),
        ([256], 4, 0, (64, 256, 256), 2, 4, 160, 40, 0, 40, 50, (4,)),
        ([512], 4, 0, (64, 256, 256), 2, 8, 160, 80, 0, 80, 98, (2, 3)),
        ([1024], 4, 0, (64, 256, 256), 2, 16, 160, 160, 0, 160, 194, (1, 2)),
        ([2048], 4, 0, (64, 256, 256), 2, 32, 160, 320, 2, 56, 68, (3, 4)),
        ([4096], 4, 0, (64, 256, 256), 2, 64, 160, 640, 4, 112, 136, (2, 3)),
    ],
    (14336, 4096): [
        (range(1, 9), 1, 1, (128, 128, 256), 4, 1, 32, 112, 0, 112, 28, (2,)),
        (range(9, 17), 1, 0, (128, 128, 256), 4, 1, 32, 112, 0, 112, 28, (2,)),
        (range(17, 65), None, 0, (64, 256, 256), 2, 1, 64, 56, 0, 56, 28, (3, 4)),
        ([128], 4, 0, (64, 256, 256), 2, 2, 64, 112, 0, 112, 56, (2,)),
        ([256], 4, 0, (64, 256, 256), 2, 4, 64, 224, 1, 92, 46, (2, 3)),
        ([512], 4, 0, (64, 256, 256), 2, 8, 64, 448, 3, 52, 26, (3, 4)),
        ([1024], 4, 0, (64, 256, 256), 2, 16, 64, 896, 6, 104, 52, (2, 3)),
    ],
    (4096, 14336): [
        (range(1, 9), 1, 1, (128, 64, 128), 4, 1, 112, 64, 0, 64, 55, (3, 4)),
        (range(9, 65), None, 0, (128, 64, 128), 4, 1, 112, 64, 0, 64, 55, (3, 4)),
        ([128], 4, 0, (128, 64, 128), 4, 2, 112, 128, 0, 128, 109, (2, 3)),
        ([192], 4, 0, (64, 256, 256), 2, 3, 224, 48, 0, 48, 82, (3, 4)),
        ([512], 4, 0, (64, 256, 256), 2, 8, 224, 128, 0, 128, 218, (2, 3)),
        ([1024], 4, 0, (64, 256, 256), 2, 16, 224, 256, 1, 124, 212, (2, 3)),
        ([4096], 4, 0, (64, 256, 256), 2, 64, 224, 1024, 7, 100, 170, (2, 3)),
    ],
}
TABLE_ROWS = [((n, k), m, row) for (n, k), rows in SPEC_TABLES.items() for row in rows for m in row[0]]


@pytest.mark.parametrize("nk,m,row", TABLE_ROWS, ids=[f"{nk[0]}x{nk[1]}-M{m}" for nk, m, _ in TABLE_ROWS])
def test_spec_table_rows(nk, m, row):
    n, k = nk
    _, tmb, m8, cfg, kw, par, k_tiles, tiles, p1, t2, iters, pieces = row
    sched = build_schedule(m, n, k, 128, "bfloat16", 132)
    assert len(sched.launches) == 1  # every table row is one launch of m rows
    ln = sched.launches[0]
    assert (ln.row_off, ln.m_split) == (0, m)
    assert ln.tmb == (tmb if tmb is not None else -(-m // 16))
    assert int(ln.m8) == m8
    assert (ln.cfg.thread_k, ln.cfg.thread_n, ln.cfg.num_threads) == cfg
    assert ln.cfg.kw == kw
    assert (ln.par, ln.k_tiles, ln.tiles, ln.part1_iters, ln.part2_tiles, ln.iters) == (par, k_tiles, tiles, p1, t2,
                                                                                        iters)
    assert ln.pieces() == pieces


@pytest.mark.parametrize("n,k", [(10240, 2560), (14336, 4096)])
def test_large_m_is_split_into_1024_row_launches_when_n_above_4096(n, k):
    sched = build_schedule(4096, n, k, 128)
    assert [(ln.row_off, ln.m_split) for ln in sched.launches] == [(0, 1024), (1024, 1024), (2048, 1024), (3072, 1024)]
    assert [(g.first, g.count) for g in sched.groups] == [(0, 4)]
    assert sched.launches[3].jobs == sched.launches[0].jobs


def test_remainder_runs_as_its_own_launch_with_its_own_config():
    sched = build_schedule(65, 10240, 2560, 128)  # spec §6.1: 64 rows + 1 row
    (a, b) = sched.launches
    assert (a.row_off, a.m_split, a.cfg.label(), b.row_off, b.m_split, b.cfg.label()) == (
        0, 64, "64x256/256", 64, 1, "128x128/256")
    assert b.m8 and b.mb == 8 and [(g.first, g.count) for g in sched.groups] == [(0, 1), (1, 1)]


def test_worked_examples_of_the_spec():
    ln = build_schedule(1, 4096, 14336, 128).launches[0]  # tile 0: [0,55) b0, [55,110) b1, [110,112) b2
    fold = [ln.jobs[i] for i in ln.folds[0]]
    assert [(j.block, j.t0, j.nt) for j in fold] == [(2, 110, 2), (1, 55, 55), (0, 0, 55)]
    ln = build_schedule(64, 10240, 2560, 128).launches[0]  # tile 1: [0,2) b2, [2,16) b3, [16,30) b4, [30,40) b5
    fold = [ln.jobs[i] for i in ln.folds[1]]
    assert [(j.block, j.t0, j.t0 + j.nt) for j in fold] == [(5, 30, 40), (4, 16, 30), (3, 2, 16), (2, 0, 2)]


def test_few_tiles_override_and_channelwise_iters():
    # N=2560 at M=16: (128,128,256) is valid but 20 tiles * 1 * 4 <= 132 -> (128, 64, 128)
    assert build_schedule(16, 2560, 10240, 128).launches[0].cfg == FEW_TILES_CONFIG
    # channelwise: no rounding of iters to whole groups (tk=64 would round to even under g128)
    grouped = build_schedule(64, 10240, 2560, 128).launches[0]
    channel = build_schedule(64, 10240, 2560, -1).launches[0]
    assert (grouped.iters, channel.iters) == (14, 13)  # ceil(40*40/132) = 13, even-rounded under g128
    assert build_schedule(512, 10240, 2560, -1).launches[0].iters == 17  # ceil(40*56/132) = 17, not rounded to 18
    # a single group spanning K is channelwise, as in Marlin (num_groups == 1)
    assert build_schedule(3, 128, 128, 128).problem.group_blocks == -1


def test_shared_memory_formula_and_sms_dependence():
    assert kernel_cache_size(ThreadConfig(64, 256, 256), 4, 128) == 68608  # fits H100's 232448 opt-in
    assert build_schedule(1, 4096, 14336, 128, sms=114).launches[0].iters != build_schedule(
        1, 4096, 14336, 128, sms=132).launches[0].iters


def test_schedule_is_cached_and_hash_is_stable():
    a = build_schedule(33, 3072, 2560, 128, "float16", 132)
    assert a is build_schedule(33, 3072, 2560, 128, "float16", 132)
    assert a.sha256() == build_schedule.__wrapped__(33, 3072, 2560, 128, "float16", 132).sha256()


@pytest.mark.parametrize("kw,err", [
    (dict(m=0), "M must be positive"), (dict(n=96), "N % 64"), (dict(k=96), "K % 64"),
    (dict(group_size=16), "group size"), (dict(k=192, group_size=128), "multiple of the group"),
    (dict(dtype="float32"), "activation dtype"), (dict(sms=0), "sms must be positive"),
])
def test_problem_validation(kw, err):
    args = dict(m=1, n=128, k=256, group_size=128, dtype="bfloat16", sms=132) | kw
    with pytest.raises(ValueError, match=err):
        MarlinProblem(**args)


def test_unknown_thread_config_is_rejected():
    with pytest.raises(ValueError, match="unknown Marlin thread config"):
        ThreadConfig(256, 64, 128)


@st.composite
def problems(draw):
    group = draw(st.sampled_from([-1, 32, 64, 128]))
    k = (128 if group == 128 else 64) * draw(st.integers(1, 100))
    n = 64 * draw(st.integers(1, 160))
    if k % 128 and n % 128:  # Marlin needs (N%64, K%128) or (N%128, K%64); vLLM would pad anything else
        n *= 2
    m = draw(st.one_of(st.integers(1, 80), st.integers(1, 3000)))
    sms = draw(st.one_of(st.just(132), st.integers(1, 200)))
    return m, n, k, group, sms


def test_shape_without_marlin_config_is_rejected():
    with pytest.raises(ValueError, match="no valid thread config"):
        build_schedule(1, 64, 64, -1)


@settings(max_examples=120, deadline=None)
@given(problems())
def test_schedule_properties(p):
    m, n, k, group, sms = p
    sched = build_schedule(m, n, k, group, "bfloat16", sms)
    # rows: launches tile [0, M) in order, each covered by its par x mb row blocks
    assert sched.launches[0].row_off == 0
    assert sum(ln.m_split for ln in sched.launches) == m
    for a, b in zip(sched.launches, sched.launches[1:]):
        assert b.row_off == a.row_off + a.m_split
    assert sum(g.count for g in sched.groups) == len(sched.launches)
    for ln in sched.launches:
        assert ln.par * ln.mb >= ln.m_split > (ln.par - 1) * ln.mb
        assert n % ln.cfg.thread_n == 0 and k % ln.cfg.thread_k == 0
        assert ln.tiles == ln.par * ln.n_tiles and 1 <= ln.part2_tiles <= ln.tiles
        assert ln.part1_tiles == ln.part1_iters * min(sms, ln.tiles) if ln.tiles > sms else ln.part1_tiles == 0
        assert ln.iters * sms >= ln.part2_tiles * ln.k_tiles  # the stripes cover all part-2 units
        slots = set()
        for q, fold in enumerate(ln.folds):
            jobs = [ln.jobs[i] for i in fold]
            assert jobs and all(j.tile == q for j in jobs)
            assert (jobs[0].par_id, jobs[0].col) == divmod(q, ln.n_tiles)
            # every k-tile exactly once, bottom (largest k, slice_idx 0) first, top piece starts at k = 0
            assert [j.slice_idx for j in jobs] == list(range(len(jobs)))
            assert all(j.slice_count == len(jobs) and j.nt > 0 for j in jobs)
            assert jobs[-1].t0 == 0 and jobs[0].t0 + jobs[0].nt == ln.k_tiles
            for lower, upper in zip(jobs, jobs[1:]):
                assert upper.t0 + upper.nt == lower.t0
            if q < ln.part1_tiles:
                assert len(jobs) == 1 and jobs[0].block == q % sms and jobs[0].slot == -1
            else:
                # a part-2 piece is block j's share of units [j*iters, (j+1)*iters): the kernel's closed form
                p = q - ln.part1_tiles
                for job in jobs:
                    lo, hi = job.block * ln.iters, (job.block + 1) * ln.iters
                    assert (max(lo, p * ln.k_tiles), min(hi, (p + 1) * ln.k_tiles)) == (
                        p * ln.k_tiles + job.t0, p * ln.k_tiles + job.t0 + job.nt)
                    r = p - lo // ln.k_tiles
                    assert 0 <= r < ln.max_pieces_per_block and job.slot == job.block * ln.max_pieces_per_block + r
                    assert job.block < ln.active_blocks
                    slots.add(job.slot)
                first, last = (p * ln.k_tiles) // ln.iters, ((p + 1) * ln.k_tiles - 1) // ln.iters
                assert [j.block for j in jobs] == list(range(last, first - 1, -1))
        assert len(slots) == sum(len(f) for f in ln.folds[ln.part1_tiles:]) and max(slots, default=0) < ln.slots
        # each block does P1 whole tiles, then at most MAXB part-2 pieces
        per_block = {}
        for job in ln.jobs:
            per_block[job.block] = per_block.get(job.block, 0) + 1
        assert max(per_block.values()) <= ln.part1_iters + ln.max_pieces_per_block


GOLDEN = Path(__file__).parent / "golden" / "marlin_golden.json"


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden file not recorded yet (python -m kernels.verify --golden)")
def test_schedules_of_golden_cases_are_unchanged():
    """The schedules that produced Marlin's recorded bits on the GPU are still what the builder returns (a pin of
    what ran there, not an independent check: the bits themselves are re-checked in test_marlin_exact_interp)."""
    data = json.loads(GOLDEN.read_text())
    assert data["cases"]
    for c in data["cases"]:
        g = -1 if c["group"] in (-1, c["k"]) else c["group"]
        sched = build_schedule(c["m"], c["n"], c["k"], g, "bfloat16" if c["dtype"] == "bf16" else "float16", c["sms"])
        assert sched.sha256()[:16] == c["schedule_sha"], c


def test_verify_counts_a_failed_sm_count_experiment():
    """kernels.verify exits non-zero on any failing case, and on an SM-count experiment row that failed: a worker
    or shim error, a mismatch, or a shim that did not make the worker see the SM count asked for."""
    from kernels.verify import failures

    ok_case = {"mismatches": 0}
    ok_row = {"sms": 114, "reported_by_shim": 114, "mismatches": 0, "errors": 0}
    assert failures([ok_case], [ok_row]) == 0
    for bad in ({**ok_row, "mismatches": 5}, {**ok_row, "errors": 1}, {**ok_row, "reported_by_shim": 132},
                {"error": "no C compiler"}, {"sms": 114, "error": "worker failed"}):
        assert failures([ok_case], [bad]) == 1, bad
