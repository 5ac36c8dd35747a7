"""Sweep of the GEMVs (:mod:`kernels.w4a16_gemv`, :mod:`kernels.w4a16_gemv_mma`) against the tuned table, M = 1..16.

``python bench/gpu/gemv_sweep.py --out DIR`` compiles every GEMV tiling of ``--bns`` x ``--bks`` x ``--warps`` (for
each M the ``block_m`` values of ``gemv_block_ms``), drops the ones that fail the autotuner's tolerance gate, then
times each with the autotuner's timer (CUDA graphs over weight copies rotated past the L2, GPU-only interval) beside
the tuned table's config for the same (shape, M), in the same process. Prints the best five per row with µs, TB/s and
the speedup over the tuned config; writes ``--name`` (JSON, the best 20 per row). The timing loop is
:func:`bench.gpu.decode_sweep.sweep_against_table`, shared with the decode sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.gpu.decode_sweep import sweep_against_table  # noqa: E402
from kernels.w4a16_autotune import E4B_SHAPES, correctness_gate, precompile  # noqa: E402
from kernels.w4a16_config import W4A16Config  # noqa: E402


def gemv_block_ms(m: int) -> list[int]:
    """``block_m`` values worth timing at M: the smallest that covers M (up to 8), and the one below it."""
    top = min(8, 1 << (m - 1).bit_length())
    return sorted({top, max(1, top // 2)})


def candidates(bms, bns, bks, warps, max_words: int = 32, kernels=("gemv", "gemv_mma"),
               stages=(2,)) -> list[W4A16Config]:
    """GEMV tilings whose tile gives every thread at least one 4-word vector (gemv_mma: 2 words, one per row half,
    which it loads separately) and at most ``max_words`` words."""
    out = []
    for kern in kernels:
        for bm in bms:
            for bn in bns:
                for bk in bks:
                    for nw in warps:
                        words_per_thread = bn * bk // 8 / (32 * nw)
                        if kern == "gemv_mma" and (bm > 4 or bn < 2):
                            continue
                        if (2 if kern == "gemv_mma" else 4) <= words_per_thread <= max_words:
                            out += [W4A16Config(kern, bm, bn, bk, 1, nw, ns) for ns in stages]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in E4B_SHAPES])
    ap.add_argument("--bns", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--bks", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--max-words", type=int, default=32)
    ap.add_argument("--kernels", nargs="+", default=["gemv", "gemv_mma"])
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 3], help="register pipeline depths")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--name", default="gemv_sweep.json")
    args = ap.parse_args()
    dtype = torch.bfloat16
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    bms = sorted({bm for m in args.ms for bm in gemv_block_ms(m)})
    cands = candidates(bms, args.bns, args.bks, args.warps, args.max_words, args.kernels, args.stages)
    ok = precompile(cands, dtype, args.jobs, log)
    good = sorted(correctness_gate(ok, dtype, log), key=str)
    results = sweep_against_table(
        args.shapes, args.ms, dtype, log,
        lambda m, n, k: [c for c in good if c.block_m in gemv_block_ms(m) and c.fits(k, 128) and n % c.block_n == 0])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
