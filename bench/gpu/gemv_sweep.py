"""Sweep of the GEMVs (:mod:`kernels.w4a16_gemv`, :mod:`kernels.w4a16_gemv_mma`, :mod:`kernels.w4a16_gemv_mma8`)
against the tuned table, M = 1..16.

``python bench/gpu/gemv_sweep.py --out DIR`` compiles every GEMV tiling of ``--bns`` x ``--bks`` x ``--warps`` (for
each M the ``block_m`` values of :func:`kernels.w4a16_autotune.gemv_block_ms`; candidates from its
``gemv_candidates``; ``gemv_mma8``, for M >= 3, from its ``gemv_mma8_candidates`` over that kernel's own tile
grid), drops the ones that fail the autotuner's tolerance gate, then times each with the autotuner's timer (CUDA
graphs over weight copies rotated past the L2, GPU-only interval) beside the config the dispatcher picks for the
same (shape, M) (the tuned table's, else its heuristic), in the same process. Prints the best five per row with
µs, TB/s and the speedup over that config, then per row the best ``gemv_mma`` variant with and without ``chain``
among the 20 fastest; writes ``--name`` (JSON, the best 20 per row). ``--splits 1 2 4``: each tiling also with
those split-K values (where the autotuner would time them). The timing loop is
:func:`bench.gpu.decode_sweep.sweep_against_table`, shared with the decode sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.gpu.decode_sweep import save_results, sweep_against_table  # noqa: E402
from kernels.w4a16_autotune import (E4B_SHAPES, correctness_gate, gemv_block_ms, gemv_candidates,  # noqa: E402
                                    gemv_mma8_candidates, precompile, split_candidates)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in E4B_SHAPES])
    ap.add_argument("--bns", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--bks", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--max-words", type=int, default=32)
    ap.add_argument("--kernels", nargs="+", default=["gemv", "gemv_mma", "gemv_mma8"])
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 3], help="register pipeline depths")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--name", default="gemv_sweep.json")
    ap.add_argument("--splits", nargs="+", type=int, default=[1],
                    help="split-K values timed for every tiling (those the autotuner would time: "
                    "kernels.w4a16_autotune.split_candidates)")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dtype = torch.bfloat16
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    kerns = [k for k in args.kernels if k != "gemv_mma8"]
    cands = {c for m in args.ms for c in gemv_candidates(m, kerns, args.bns, args.bks, args.warps, args.stages,
                                                         args.max_words)}
    if "gemv_mma8" in args.kernels:
        cands |= {c for m in args.ms if m > 2 for c in gemv_mma8_candidates(m, stages=args.stages,
                                                                             max_words=args.max_words)}
    cands = sorted(cands, key=str)
    ok = precompile(cands, dtype, args.jobs, log)
    good = sorted(correctness_gate(ok, dtype, log), key=str)
    results = sweep_against_table(
        args.shapes, args.ms, dtype, log,
        lambda m, n, k: [dataclasses.replace(c, split_k=sk) for c in good
                         if c.block_m in gemv_block_ms(m, c.kernel) and c.fits(k, 128) and n % c.block_n == 0
                         and (m > 2 or c.kernel != "gemv_mma8")
                         for sk in split_candidates(c, m, n, k, sms) if sk in args.splits])
    for row in results["rows"]:   # gemv_mma with and without `chain` (one accumulator set per 16-byte vector)
        plain = min((b["us"] for b in row["best"] if b["kernel"] == "gemv_mma" and not b["chain"]), default=None)
        chained = min((b["us"] for b in row["best"] if b["chain"]), default=None)
        if plain and chained:
            log(f"{row['shape']} M={row['m']}: best gemv_mma per word {plain:.2f} us, chained {chained:.2f} us: "
                f"x{plain / chained:.3f}")
    save_results(results, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
