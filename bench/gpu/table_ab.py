"""A/B of two tuned tables: every (shape, M) whose entry differs, both configs timed in the same process.

``python bench/gpu/table_ab.py --old OLD.json [--new kernels/configs/NVIDIA_H200.json]`` (GPU): for each entry of
the new table that differs from the old one, runs both configs through :func:`kernels.w4a16.w4a16_gemm`, checks both
against the pure-torch reference, times both with the autotuner's timer (CUDA graphs over weight copies rotated
past the L2, median of 5 replays, twice in alternating order, best kept) and prints µs, TB/s and new/old speed;
then the geomean speed-up per M over the differing entries.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16 import w4a16_gemm  # noqa: E402
from kernels.w4a16_autotune import check_tolerance, graph_time_us, rotated_problem  # noqa: E402
from kernels.w4a16_config import CONFIG_DIR, W4A16Config  # noqa: E402


def read(path: str) -> dict:
    data = json.loads(open(path).read())
    return {tuple(map(int, shape.split("x"))): {int(m): W4A16Config(**c) for m, c in by_m.items()}
            for shape, by_m in data["shapes"].items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=str(CONFIG_DIR / "NVIDIA_H200.json"))
    args = ap.parse_args()
    old, new = read(args.old), read(args.new)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    gains = collections.defaultdict(list)
    for (n, k), by_m in sorted(new.items()):
        diff = [(m, c) for m, c in sorted(by_m.items()) if old.get((n, k), {}).get(m) not in (None, c)]
        if not diff:
            continue
        wps, ss, nbytes = rotated_problem(n, k, dtype, dev)
        for m, c_new in diff:
            c_old = old[(n, k)][m]
            x = torch.randn(m, k, device=dev, dtype=dtype)
            calls = {}
            for tag, c in (("old", c_old), ("new", c_new)):
                calls[tag] = lambda i, c=c: w4a16_gemm(x, wps[i % len(wps)], ss[i % len(ss)], config=c)
                tol = check_tolerance(calls[tag](0), x, wps[0], ss[0])
                assert tol <= 1.0, (n, k, m, c, tol)
            t = {tag: math.inf for tag in calls}
            for order in (("old", "new"), ("new", "old")):
                for tag in order:
                    t[tag] = min(t[tag], graph_time_us(calls[tag], len(wps), replays=5))
            gains[m].append(t["old"] / t["new"])
            print(f"{n}x{k} M={m}: old {c_old.brief()} {t['old']:6.2f} us ({nbytes / t['old'] / 1e6:.2f} TB/s) | "
                  f"new {c_new.brief()} {t['new']:6.2f} us ({nbytes / t['new'] / 1e6:.2f} TB/s) "
                  f"x{t['old'] / t['new']:.3f}", flush=True)
        torch.cuda.empty_cache()
    for m, g in sorted(gains.items()):
        print(f"M={m}: {len(g)} entries differ, geomean new/old speed x{math.exp(sum(map(math.log, g)) / len(g)):.3f}"
              f" (min x{min(g):.3f}, max x{max(g):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
