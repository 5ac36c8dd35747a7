"""Wider decode-config sweep for the fast W4A16 kernel (M = 1..16): deeper cp.async pipelines and more splits.

``python bench/gpu/decode_sweep.py --out DIR`` times, for each E4B shape and M in ``--ms``, the tuned table's config
and every candidate of a wider space than :func:`kernels.w4a16_autotune.decode_candidates` (``num_stages`` up to 8,
split-K up to 16 programs per SM), with the autotuner's own timer (CUDA graphs over weight copies rotated past the L2,
GPU-only interval). Every variant passes the autotuner's tolerance gate first (unless ``--no-gate``). Prints the best
five per (shape, M) with µs, TB/s and the speedup over the tuned config, and writes ``--name`` (JSON, the best 20 per
row) with the registers and spills of every variant compiled (``compiled:`` lines). Measured on the H200
(kernels/README.md, "Where the time goes"): no variant beats the tuned table by more than 4 %, i.e. the decode
kernel is not limited by bytes in flight.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16 import asm_ok, w4a16_gemm  # noqa: E402
from kernels.w4a16_autotune import (E4B_SHAPES, SPLITS, correctness_gate, graph_time_us,  # noqa: E402
                                    precompile, rotated_problem, split_candidates)
from kernels.w4a16_config import W4A16Config, select_config  # noqa: E402


def candidates(stages, pairs, bks) -> list[W4A16Config]:
    """Decode configs with the weight as the MMA's A operand: ``pairs`` of (BLOCK_N, num_warps); BLOCK_N >= 64 with
    4 or 8 warps lowers to Hopper wgmma, fewer rows or warps to mma.sync (m16n8k16, both operands in registers)."""
    return [W4A16Config("decode", 16, bn, bk, 1, nw, ns, True, True)
            for bn, nw in pairs for bk in bks for ns in stages]


# the sweep's wider split-K range: up to 40 splits and 16 programs per SM (the autotuner: 32 and 8)
SWEEP_SPLITS = dict(max_per_sm=16, values=SPLITS + (40,))


def compiled_stats() -> list[dict]:
    """Registers and spills of every decode variant this process compiled (best effort: Triton's cache layout
    is not a public API; an empty list if it moved)."""
    from kernels.w4a16_decode import _w4a16_splitk_kernel as kern

    out = []
    try:
        for cache in kern.device_caches.values():
            for ck in cache[0].values():
                md = ck.metadata
                out.append({"n_regs": ck.n_regs, "n_spills": ck.n_spills, "num_warps": md.num_warps,
                             "num_stages": md.num_stages, "maxnreg": getattr(md, "maxnreg", None),
                             "shared": md.shared})
    except Exception:  # noqa: BLE001
        return []
    return sorted(out, key=lambda d: tuple(str(v) for v in d.values()))


def sweep_against_table(shapes, ms, dtype, log, configs_for) -> dict:
    """Time, for each ``"NxK"`` shape and M, the config the dispatcher picks (the tuned table's, else its heuristic)
    and then every config of ``configs_for(m, n, k)`` with the autotuner's timer; log the best five per row, return
    the JSON-able results (``rows``: shape, m, bytes, tuned_us, tuned, the 20 fastest as ``best``). Shared by the
    GEMV sweep."""
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    results = {"device": props.name, "sm_count": sms, "date": time.strftime("%Y-%m-%d"), "rows": []}
    for shape in shapes:
        n, k = (int(v) for v in shape.split("x"))
        wps, ss, nbytes = rotated_problem(n, k, dtype, dev)
        copies = len(wps)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            tuned = select_config(m, n, k, 128, props.name, sms, gemv=asm_ok(x))   # what the dispatcher runs
            rows = []
            for cfg in [tuned] + configs_for(m, n, k):
                try:
                    us = graph_time_us(lambda i: w4a16_gemm(x, wps[i % copies], ss[i], config=cfg), copies)
                except Exception as e:  # noqa: BLE001
                    log(f"  {shape} M={m} {cfg}: {type(e).__name__} {str(e)[:160]}")
                    continue
                rows.append((us, cfg))
            t_tuned = rows[0][0]
            rows.sort(key=lambda r: r[0])
            log(f"{shape} M={m}: tuned {t_tuned:.2f} us ({nbytes / t_tuned / 1e6:.2f} TB/s) {tuned}")
            for us, cfg in rows[:5]:
                log(f"    {us:7.2f} us {nbytes / us / 1e6:.2f} TB/s  x{t_tuned / us:.3f}  {cfg.brief()}")
            results["rows"].append({"shape": shape, "m": m, "bytes": nbytes, "tuned_us": t_tuned,
                                    "tuned": dataclasses.asdict(tuned),
                                    "best": [{"us": us, **dataclasses.asdict(cfg)} for us, cfg in rows[:20]]})
        wps = ss = None
        torch.cuda.empty_cache()
    return results


def save_results(results: dict, out: str, name: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(results, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in E4B_SHAPES])
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 3, 4, 5, 6, 8])
    ap.add_argument("--pairs", nargs="+", default=["64:4", "128:4", "128:8", "256:4", "256:8"],
                    help="BLOCK_N:num_warps pairs (BLOCK_N < 64 or fewer than 4 warps: mma.sync, which "
                    "kernels.w4a16_config refuses for w_is_a; bench/results/h200-2026-11-30f/decode has the patch)")
    ap.add_argument("--bks", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--name", default="decode_sweep.json")
    ap.add_argument("--no-gate", action="store_true", help="time variants that fail the tolerance gate too "
                    "(timing experiments whose arithmetic is knowingly changed)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    dtype = torch.bfloat16
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs]
    cands = [c for c in candidates(args.stages, pairs, args.bks)
             if not (c.block_n == 256 and c.block_k == 256 and c.num_stages > 6)]
    ok = precompile(cands, dtype, args.jobs, log)
    if args.no_gate:
        log(f"{len(ok)}/{len(cands)} variants compiled (tolerance gate NOT applied: --no-gate)")
    good = sorted(ok if args.no_gate else correctness_gate(ok, dtype, log), key=str)
    results = sweep_against_table(
        args.shapes, args.ms, dtype, log,
        lambda m, n, k: [dataclasses.replace(c, split_k=sk) for c in good if c.fits(k, 128)
                         for sk in split_candidates(c, m, n, k, sms, **SWEEP_SPLITS)])
    results["compiled"] = compiled_stats()
    for c in results["compiled"]:
        log(f"compiled: {c}")
    save_results(results, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
