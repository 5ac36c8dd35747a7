"""The Marlin-order Triton kernel on CPU (Triton interpreter), bit for bit against independent references.

What these tests prove, and what they do not:

* The interpreter runs the kernel's real index arithmetic (pieces from the launch scalars, warp-row chains,
  tree, fold slots, epilogue) but its ``tl.dot`` is numpy's fp32 matmul, not the tensor core. On inputs whose
  32-wide warp-row dot products are exact (``exact_chunk_inputs``) every summation model agrees on each dot, so
  the output bits are fixed by the order of the remaining fp32 additions — exactly what the kernel must get right.
  The reference is ``kernels.marlin_emulate``, pure torch over the explicit job table that
  ``kernels.marlin_schedule`` derives block by block (not the kernel's closed form). The "cancelling" inputs make
  every order error visible: ``test_the_comparison_detects_wrong_orders`` shows deliberately wrong orders fail.
* Golden cases (tests/golden/marlin_golden.json, recorded on an H200 by ``python -m kernels.verify --golden``)
  hold Marlin's own output hashes for small integer-data cases, where every sum is exact until the epilogue:
  there the interpreter must reproduce vLLM Marlin's bits exactly (dequant, tile/launch split, the fp16-reduce
  rounding of partials, channelwise scale, bias).
* NOT proven on CPU: that the tensor-core chain (``tl.dot`` -> mma.sync/wgmma) rounds like Marlin's HMMA chain for
  general data. That is checked only on the GPU, against Marlin itself (``python -m kernels.verify``).

The kernel runs in a subprocess with TRITON_INTERPRET=1 (it must be set before Triton is imported).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
GOLDEN = HERE.parent / "golden" / "marlin_golden.json"

# (m, n, k, group, dtype, bias, use_fp32_reduce, sms): decode / m8 / multi-launch, KW 4 and 2, both reduce modes
CASES = [
    (1, 256, 1024, 128, "bf16", False, True, 132),
    (9, 128, 1024, 128, "bf16", True, False, 16),
    (17, 256, 512, -1, "bf16", True, True, 16),
    (65, 128, 512, 128, "bf16", False, True, 8),
    (3, 192, 768, 64, "fp16", True, True, 7),
    (33, 128, 1024, 128, "fp16", False, False, 16),
    (70, 256, 256, -1, "fp16", True, False, 5),
    (5, 128, 2048, 128, "bf16", True, True, 3),  # few SMs: long pieces, so chain order matters too
    (40, 256, 1024, -1, "bf16", False, False, 4),
    (65, 512, 512, 128, "bf16", True, True, 4),  # thread_k 64 (KW = 2) with split tiles, then a KW = 4 launch
]
MUTANT_CASES = (0, 7, 8)
VARIANT_CASES = (2, 6, 7, 9)  # channelwise + bias (fused-FMA epilogue), bf16 / fp16; long chains; KW = 2
# Launch choices every tiling states explicitly (so pass_config's defaults never decide a variant)
BASE = dict(prefetch=0, wr_fast=False, swap=False, fuse=False, tile_load=False)
MUTANTS = {"chains": dict(chains="blocked"), "tree": dict(tree="pairwise"), "fold": dict(fold="top_down"),
           "sms": dict(sms=11)}


def _worker() -> dict:
    import torch

    from kernels.marlin_emulate import emulate_marlin, exact_chunk_inputs
    from kernels.verify import Case, exact_inputs, out_hash
    from kernels.w4a16_marlin import w4a16_gemm_exact

    dts = {"bf16": torch.bfloat16, "fp16": torch.float16}
    report: dict = {"cases": [], "mutants": {}, "golden": []}

    def bits(t):
        return t.view(torch.int16)

    for i, (m, n, k, g, dt, has_bias, red, sms) in enumerate(CASES):
        big, small = (10, (-14, -6)) if dt == "bf16" else (2, (-24, -14))
        x, wp, ws = exact_chunk_inputs(m, n, k, g, dts[dt], seed=100 + i, big=big, small=small)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(i)).to(dts[dt]) if has_bias else None
        out = w4a16_gemm_exact(x, wp, ws, bias, red, sms)
        ref = emulate_marlin(x, wp, ws, bias, red, sms)
        # the same bits with the other tilings: BM 16/64, one program per warp-row chain or per piece, operand
        # prefetch depth and launch order of the chain programs
        tilings = ({**BASE, "block_m": 16, "split": False},
                   {**BASE, "block_m": 64, "split": True},
                   {**BASE, "block_m": 64, "split": False},
                   {**BASE, "block_m": 16, "split": True, "prefetch": 1},
                   {**BASE, "block_m": 16, "split": True, "prefetch": 2, "wr_fast": True},
                   {**BASE, "block_m": 16, "split": True, "wr_fast": True, "swap": True},
                   {**BASE, "block_m": 16, "split": True, "wr_fast": True, "fuse": True},
                   {**BASE, "block_m": 64, "split": True, "prefetch": 1, "swap": True, "fuse": True},
                   {**BASE, "block_m": 16, "split": False, "fuse": True, "tile_load": True},
                   {**BASE, "block_m": 64, "split": False, "fuse": True, "tile_load": True},
                   {**BASE, "block_m": 16, "split": False, "tile_load": True})
        alts = [w4a16_gemm_exact(x, wp, ws, bias, red, sms, **kw) for kw in tilings] if i in VARIANT_CASES else []
        report["cases"].append({"case": CASES[i], "mismatches": int((bits(out) != bits(ref)).sum()),
                                "variant_mismatches": [int((bits(a) != bits(ref)).sum()) for a in alts],
                                "finite": bool(torch.isfinite(out.float()).all())})
        if i in MUTANT_CASES:  # show that each wrong order is detected
            for name, kw in MUTANTS.items():
                kw = dict(kw)
                mut = emulate_marlin(x, wp, ws, bias, red, kw.pop("sms", sms), **kw)
                report["mutants"].setdefault(name, []).append(int((bits(out) != bits(mut)).sum()))
    # Large M: the launch group of 2 x 8192 rows cut into one grid per launch (the int32 limit lowered so that
    # one launch's rows fit and two do not), views that start at each grid's first row, and a row-strided x
    import kernels.w4a16_marlin as wm
    x, wp, ws = exact_chunk_inputs(16400, 64, 128, 128, torch.float16, seed=7, big=2, small=(-24, -14))
    xs = torch.zeros(16400, 192, dtype=torch.float16)
    xs[:, :128] = x
    whole = w4a16_gemm_exact(x, wp, ws, None, True, 4)
    saved, wm.INT32_LIMIT = wm.INT32_LIMIT, 8192 * 192 + 1
    try:
        cut = [w4a16_gemm_exact(v, wp, ws, None, True, 4) for v in (x, xs[:, :128])]
    finally:
        wm.INT32_LIMIT = saved
    ref = emulate_marlin(x, wp, ws, None, True, 4)
    report["big_m"] = {"mismatches": [int((bits(o) != bits(ref)).sum()) for o in [whole] + cut],
                       "grids": sum(1 for _ in wm._grid_chunks(wm.build_schedule(16400, 64, 128, 128, "float16", 4),
                                                               (8192 * 192) // 192))}
    from kernels.w4a16_marlin import _COUNTERS  # the fused fold's arrival counters: used, and left at zero
    report["counters"] = [int(b.abs().sum()) for bufs in _COUNTERS.values() for b in bufs]
    if GOLDEN.exists():
        for c in json.loads(GOLDEN.read_text())["cases"]:
            if c["data"] != "exact":
                continue
            case = Case(c["id"], c["n"], c["k"], c["m"], c["dtype"], c["group"], c["bias"], c["fp32_reduce"],
                        c["seed"], "exact", "exact")
            x, wp, ws, bias = exact_inputs(case)
            out = w4a16_gemm_exact(x, wp, ws, bias, c["fp32_reduce"], c["sms"])
            report["golden"].append({"id": c["id"], "marlin_sha": c["marlin_sha"], "ours_sha": out_hash(out)})
    return report


@pytest.fixture(scope="module")
def interp():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE)], env=env, capture_output=True, text=True, timeout=1200,
                          cwd=HERE.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernel_matches_emulation_bit_for_bit(interp):
    assert len(interp["cases"]) == len(CASES)
    for c in interp["cases"]:
        assert c["finite"], c
        assert c["mismatches"] == 0 and not any(c["variant_mismatches"]), c
    assert interp["counters"] and not any(interp["counters"]), interp["counters"]  # fused fold ran and reset


def test_large_m_cut_into_int32_safe_grids(interp):
    """M = 16,400 (two 8,192-row Marlin launches in one group, then 16 rows): with the int32 limit lowered below
    two launches' rows, each launch gets its own grid on views from its first row; the bits stay Marlin's (the
    emulation) for contiguous and row-strided x, and equal to the uncut run."""
    big = interp["big_m"]
    assert big["grids"] == 3, big
    assert big["mismatches"] == [0, 0, 0], big


def test_the_comparison_detects_wrong_orders(interp):
    for name, counts in interp["mutants"].items():
        assert max(counts) > 0, f"a wrong {name} order went unnoticed: {counts}"


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden file not recorded yet (python -m kernels.verify --golden)")
def test_golden_cases_reproduce_marlin_bits(interp):
    assert interp["golden"], "no exact-data cases in the golden file"
    for g in interp["golden"]:
        assert g["ours_sha"] == g["marlin_sha"], g


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    print(json.dumps(_worker()))
