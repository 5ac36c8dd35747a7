"""Marlin-order exact W4A16 kernel vs vLLM 0.26.0 Marlin on the Gemma-4 E4B shapes (GPU).

    python -m bench.bench_marlin_exact [--json OUT.json] [--tune] [--m 1 16 256 4096]

Method: bf16, group 128, no bias. Each timed unit is a CUDA graph that calls the kernel once on each of ``c``
weight copies (c chosen so the copies exceed 3x the 60 MB L2: every call streams its weights from HBM);
time per call = median over 20 graph replays (CUDA events) / c (``kernels.w4a16_autotune.graph_time_us``).
Prints µs per call for both kernels, the ratio
(goal <= 3x), and the exact kernel's effective bandwidth (weight + scale bytes / time; activations and output left
out, as in every pdqkit benchmark) as TB/s and
as % of the device-to-device copy bandwidth measured in the same run. ``--tune`` also times a few Triton tile
choices of the exact kernel (all give identical bits).
"""
from __future__ import annotations

import argparse
import json
import re

import torch

from kernels.verify import E4B_FULL, E4B_PRUNED, MarlinWeights, make_weights
from kernels.w4a16_autotune import graph_time_us, n_copies  # the project's CUDA-graph timer (L2-rotated)

REPLAYS = 20
# Launch choices timed by --tune (kwargs of w4a16_gemm_exact; unset = pass_config's default). "default" first.
TUNE_VARIANTS = {
    "small": [
        {},
        dict(block_n=128, fuse=False, swap=False, wr_fast=False, prefetch=0),  # the two-pass SPLIT baseline
        dict(block_n=128, prefetch=1),
        dict(block_n=128, swap=True, wr_fast=True, prefetch=0),
        dict(block_n=64, num_warps=2, prefetch=2, wr_fast=True),
        # one program per piece, whole-tile-row loads split between the KW chains, fused fold
        dict(split=False, block_n=32, tile_load=True, fuse=True),
        dict(split=False, block_n=64, tile_load=True, fuse=True),
        dict(split=False, block_n=128, tile_load=True, fuse=True),
        dict(split=False, block_n=32, num_warps=2, tile_load=True, fuse=True),
        dict(split=False, block_n=64, tile_load=False, fuse=True),
        # occupancy: decode pass 1 is latency-bound at 4 resident programs per SM (126 registers)
        # (2026-11-29d: maxnreg 64 spills and halves the speed; 8 warps, 2 warps, BN 64 lose too)
        dict(maxnreg=80), dict(maxnreg=96), dict(num_stages=1),
        # deeper software pipelining of the chain's operand loads (shared memory, not registers)
        dict(num_stages=2), dict(num_stages=4), dict(num_stages=5), dict(num_stages=6), dict(num_stages=8),
        dict(num_stages=4, maxnreg=96), dict(num_stages=6, maxnreg=96),
    ],
    "large": [{}, dict(block_n=64), dict(block_n=256, num_warps=8), dict(num_stages=4),
              dict(fuse=True), dict(tile_load=True)],
}

# The launch kwargs of a variant key, in key order: (kwarg, abbreviation, type the key's integer is read back as).
_KEY_PARTS = (("block_m", "bm", int), ("block_n", "bn", int), ("num_warps", "w", int), ("num_stages", "s", int),
              ("split", "split", bool), ("prefetch", "pf", int), ("wr_fast", "wf", bool), ("swap", "sw", bool),
              ("fuse", "fu", bool), ("tile_load", "tl", bool), ("maxnreg", "r", int))


def variant_key(kw: dict) -> str:
    """``default`` or e.g. ``bn64-w2-pf2-wf1``: abbreviation + integer value per launch kwarg (inverse:
    :func:`variant_kwargs`)."""
    parts = [f"{ab}{int(kw[name])}" for name, ab, _ in _KEY_PARTS if name in kw]
    return "-".join(parts) or "default"


def variant_kwargs(key: str) -> dict:
    """``split0-bn64-tl1`` -> {"split": False, "block_n": 64, "tile_load": True}; ``default`` -> {}."""
    if key == "default":
        return {}
    by_abbrev = {ab: (name, typ) for name, ab, typ in _KEY_PARTS}
    out = {}
    for part in key.split("-"):
        m = re.fullmatch(r"([a-z]+)(\d+)", part)
        if not m or m[1] not in by_abbrev:
            raise ValueError(f"unknown variant key part {part!r} in {key!r}")
        name, typ = by_abbrev[m[1]]
        out[name] = typ(int(m[2]))
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second: the same eager measurement as
    bench.bench_kernels (a cudaMemcpy captured in a CUDA graph runs at only ~2/3 of it on the H200)."""
    from bench.bench_kernels import copy_bandwidth_tbs

    return copy_bandwidth_tbs() * 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="*", default=[1, 16, 256, 4096])
    ap.add_argument("--json")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all E4B shapes)")
    args = ap.parse_args(argv)
    from kernels.vllm_ops import load_vllm_ops
    from kernels.w4a16_marlin import LAST_COMPILED, w4a16_gemm_exact

    load_vllm_ops()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    rows = []
    shapes = {**E4B_PRUNED, **E4B_FULL}
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    for name, (n, k) in shapes.items():
        wbytes = n * k // 2 + n * (k // 128) * 2
        copies = n_copies(wbytes)
        weights = [make_weights(n, k, 128, torch.bfloat16, 1000 + c, "cuda") for c in range(copies)]
        marlin = [MarlinWeights(wp, ws, 128) for wp, ws in weights]
        for m in args.m:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            t_marlin = graph_time_us(lambda i: marlin[i](x, None, True), copies, REPLAYS)
            t_exact = graph_time_us(lambda i: w4a16_gemm_exact(x, *weights[i], None, True, sms), copies, REPLAYS)
            moved = wbytes  # weights + scales, as bench.bench_kernels counts (activations left out)
            row = {"shape": name, "n": n, "k": k, "m": m, "copies": copies, "marlin_us": round(t_marlin, 2),
                   "exact_us": round(t_exact, 2), "ratio": round(t_exact / t_marlin, 2),
                   "exact_tbps": round(moved / (t_exact * 1e-6) / 1e12, 3),
                   "exact_pct_copy_bw": round(100 * moved / (t_exact * 1e-6) / bw, 1),
                   "marlin_tbps": round(moved / (t_marlin * 1e-6) / 1e12, 3)}
            if args.tune and m in (1, 16, 4096):
                tune, regs = {}, {}
                for kw in TUNE_VARIANTS["small" if m <= 16 else "large"]:
                    key = variant_key(kw)
                    try:
                        tune[key] = round(graph_time_us(
                            lambda i: w4a16_gemm_exact(x, *weights[i], None, True, sms, **kw), copies, REPLAYS), 2)
                    except Exception as exc:  # e.g. out of shared memory for a large tile
                        tune[key] = f"{type(exc).__name__}"
                    else:  # registers / spilled bytes per thread of pass 1 (what sets its occupancy)
                        k1 = LAST_COMPILED.get("pass1")
                        if getattr(k1, "n_regs", None) is not None:
                            regs[key] = f"{k1.n_regs}/{k1.n_spills}"
                row["tune"] = tune
                row["tune_regs"] = regs
            rows.append(row)
            print(json.dumps(row), flush=True)
        del weights, marlin
        torch.cuda.empty_cache()
    dev = torch.cuda.get_device_properties(0).name
    print(f"\n{dev}, {sms} SMs, copy bandwidth {bw / 1e12:.2f} TB/s; bf16 g128; CUDA graphs, weights rotated past L2")
    print(f"{'shape':<13} {'N x K':>12} {'M':>5} {'Marlin us':>10} {'exact us':>9} {'ratio':>6} {'exact TB/s':>10} "
          f"{'% copy':>7}")
    for r in rows:
        print(f"{r['shape']:<13} {r['n']:>5}x{r['k']:<6} {r['m']:>5} {r['marlin_us']:>10} {r['exact_us']:>9} "
              f"{r['ratio']:>6} {r['exact_tbps']:>10} {r['exact_pct_copy_bw']:>7}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio exact/Marlin: {worst} (goal <= 3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "sms": sms, "copy_bw_Bps": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
