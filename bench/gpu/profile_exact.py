"""Run the exact (Marlin-order) kernel on one shape for a few launch variants, for a profiler to look at (GPU).

    ncu --clock-control none -k regex:_marlin_pass --section SpeedOfLight --section WarpStateStats \\
        python bench/gpu/profile_exact.py --n 16384 --k 2560 --m 1 '{}' '{"prefetch": 2, "wr_fast": true}'

Each variant (JSON kwargs of ``w4a16_gemm_exact``: block_m, block_n, num_warps, num_stages, split, prefetch,
wr_fast, swap, fuse, tile_load, maxnreg) runs ``--repeat`` times back to back (default 2; the first call
compiles), so a profiler sees each variant's kernels; every output is compared bit for bit with the default's
(``kernels.verify.compare``; every variant must give the same bits; many repeats stress the fused fold's arrival
counters).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels.verify import compare, make_weights
from kernels.w4a16_marlin import w4a16_gemm_exact


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=2560)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="calls per variant, each compared bit for bit")
    ap.add_argument("variants", nargs="*", default=["{}"], help="JSON kwargs per variant")
    args = ap.parse_args(argv)
    wp, ws = make_weights(args.n, args.k, 128, torch.bfloat16, 1, "cuda")
    x = torch.randn(args.m, args.k, device="cuda").to(torch.bfloat16)
    ref = w4a16_gemm_exact(x, wp, ws, None, True, -1)
    for v in args.variants:
        kw = json.loads(v)
        outs = [w4a16_gemm_exact(x, wp, ws, None, True, -1, **kw) for _ in range(args.repeat)]
        torch.cuda.synchronize()
        bad = sum(compare(o, ref)[0] for o in outs)
        print(f"variant {kw}: {bad} elements differ from the default's bits over {args.repeat} calls", flush=True)
        if bad:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
