"""Sweep of the TMA-fed GEMV (:mod:`kernels.w4a16_gemv_tma`) against the tuned table, M = 1..16.

``python bench/gpu/gemv_tma_sweep.py --out DIR`` compiles every tiling of ``--bns`` x ``--bks`` x ``--warps`` x
``--stages`` (``block_m`` 8 for M <= 8, else 16; ring at most ``--smem-kb``) in ``--jobs`` spawned processes, checks
each against the pure-torch reference (the autotuner's §9B tolerance at M = 1, 5 and 13), then times each on every
(shape, M) with the autotuner's timer (CUDA graphs over weight copies rotated past the L2, GPU-only interval)
beside the config the dispatcher picks for the same (shape, M), in the same process. Prints the best five per row
with µs, TB/s (weights + scales / time) and the speed-up over the table, then the top three re-timed alternately
with the table (the "confirmed" ratio: the best of ~100 single timings is biased low); writes
``gemv_tma_sweep.json``. A tiling is timed only if it passed the gate at every K it was checked at. (The thirty-
seventh session's two runs predate the confirmation step and took a tiling that passed at either K.)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16 import w4a16_gemm  # noqa: E402
from kernels.w4a16_autotune import (E4B_SHAPES, check_tolerance, graph_time_us, make_problem,  # noqa: E402
                                    rotated_problem)
from kernels.w4a16_gemv_tma import gemv_tma_ok, w4a16_gemv_tma  # noqa: E402


def tilings(bns, bks, warps, stages, smem_kb):
    out = []
    for bn, bk, nw, st in itertools.product(bns, bks, warps, stages):
        if gemv_tma_ok(bn, bk, nw) and st * bn * bk // 2 <= smem_kb << 10:
            out.append((bn, bk, nw, st))
    return out


def _run(x, wp, s, t, bm, bias=None):
    bn, bk, nw, st = t
    return w4a16_gemv_tma(x, wp, s, bias, 128, block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=st)


def _worker(ts):
    dev = torch.device("cuda")
    wp, s = make_problem(256, 2048, torch.bfloat16, dev)
    x = torch.randn(16, 2048, device=dev, dtype=torch.bfloat16)
    bad = []
    for t in ts:
        for bm, m in ((8, 1), (8, 5), (16, 13)):
            try:
                _run(x[:m], wp, s, t, bm)
            except Exception as e:  # noqa: BLE001 - reported, tiling dropped
                bad.append((t, bm, f"{type(e).__name__}: {str(e)[:300]}"))
    torch.cuda.synchronize()
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in E4B_SHAPES])
    ap.add_argument("--bns", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--bks", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 3, 4, 6])
    ap.add_argument("--smem-kb", type=int, default=160)
    ap.add_argument("--jobs", type=int, default=14)
    args = ap.parse_args()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    ts = tilings(args.bns, args.bks, args.warps, args.stages, args.smem_kb)
    t0 = time.time()
    chunks = [c for c in (ts[i::args.jobs] for i in range(args.jobs)) if c]
    bad = set()
    with mp.get_context("spawn").Pool(len(chunks)) as pool:
        for res in pool.imap_unordered(_worker, chunks):
            for t, bm, err in res:
                log(f"compile FAILED {t} bm={bm}: {err}")
                bad.add(t)
    ts = [t for t in ts if t not in bad]
    log(f"compiled {len(ts)} tilings (x2 block_m) in {time.time() - t0:.0f}s")

    dev, dtype = torch.device("cuda"), torch.bfloat16
    failed = set()
    bad_shown = False
    for k in (2560, 4096):
        wp, s = make_problem(512, k, dtype, dev, seed=1)
        for t in ts:
            if k % t[1]:
                continue
            worst = 0.0
            for m in (1, 5, 13):
                x = torch.randn(m, k, device=dev, dtype=dtype)
                bias = torch.randn(512, device=dev, dtype=dtype) if m == 5 else None
                worst = max(worst, check_tolerance(_run(x, wp, s, t, 8 if m <= 8 else 16, bias), x, wp, s, bias))
            if worst > 1.0:
                failed.add(t)
                log(f"WRONG {t} K={k}: tolerance ratio {worst:.3g}")
                if not bad_shown:   # where the first wrong tiling differs from the reference
                    bad_shown = True
                    from kernels.w4a16 import w4a16_reference
                    x = torch.randn(13, k, device=dev, dtype=dtype)
                    d = (_run(x, wp, s, t, 16).float() - w4a16_reference(x, wp, s, None).float()).abs()
                    log(f"    |err| by activation row {d.amax(1).tolist()}")
                    log(f"    |err| by output column (first 32) {d.amax(0)[:32].tolist()}")
    good_t = [t for t in ts if t not in failed]   # passed at every K it was checked at
    log(f"{len(good_t)} tilings pass the tolerance gate")

    results = []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        wps, ss, nbytes = rotated_problem(n, k, dtype, dev)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            bm = 8 if m <= 8 else 16
            table = lambda i: w4a16_gemm(x, wps[i % len(wps)], ss[i % len(ss)])  # noqa: E731
            t_tab = min(graph_time_us(table, len(wps), 5) for _ in range(2))
            rows = []
            for t in good_t:
                if k % t[1]:
                    continue
                us = graph_time_us(lambda i: _run(x, wps[i % len(wps)], ss[i % len(ss)], t, bm), len(wps), 5)
                rows.append((us, t))
            t_tab = min(t_tab, graph_time_us(table, len(wps), 5))
            rows.sort()
            # The best of ~100 single timings is biased low: re-time the top 3 and the table alternately, twice,
            # and report the ratio of those minima as the confirmed one.
            conf = {"table": t_tab}
            for _ in range(2):
                conf["table"] = min(conf["table"], graph_time_us(table, len(wps), 5))
                for _, t in rows[:3]:
                    us = graph_time_us(lambda i: _run(x, wps[i % len(wps)], ss[i % len(ss)], t, bm), len(wps), 5)
                    conf[t] = min(conf.get(t, math.inf), us)
            top = min((v, t) for t, v in conf.items() if t != "table") if rows else None
            log(f"{shape} M={m}: table {t_tab:7.2f} us ({nbytes / t_tab / 1e6:.2f} TB/s)")
            for us, t in rows[:5]:
                log(f"    bn{t[0]:<3} bk{t[1]:<5} w{t[2]} st{t[3]}  {us:7.2f} us ({nbytes / us / 1e6:.2f} TB/s)  "
                    f"x{t_tab / us:.3f}")
            if top:
                t = top[1]
                log(f"    confirmed: bn{t[0]} bk{t[1]} w{t[2]} st{t[3]} {top[0]:.2f} us against the table's "
                    f"{conf['table']:.2f} us: x{conf['table'] / top[0]:.3f}")
            results.append(dict(shape=shape, m=m, table_us=t_tab, nbytes=nbytes,
                                best=[dict(us=us, block_n=t[0], block_k=t[1], num_warps=t[2], num_stages=t[3])
                                      for us, t in rows[:20]],
                                confirmed=dict(table_us=conf["table"], us=top[0], block_n=top[1][0],
                                               block_k=top[1][1], num_warps=top[1][2], num_stages=top[1][3])
                                if top else None))
        wps = ss = None   # free the copies before the next shape
        torch.cuda.empty_cache()
    gains = [r["confirmed"]["table_us"] / r["confirmed"]["us"] for r in results if r["confirmed"]]
    if gains:
        geo = math.exp(sum(map(math.log, gains)) / len(gains))
        log(f"best gemv_tma vs table (confirmed): geomean x{geo:.3f} over {len(gains)} rows (min x{min(gains):.3f}, max x{max(gains):.3f})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemv_tma_sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
