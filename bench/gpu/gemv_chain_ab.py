"""A/B of the tensor-core GEMV's accumulator chaining and register-pipeline depth (same process, same timer).

``python bench/gpu/gemv_chain_ab.py [--shapes 16384x2560 ...] [--ms 1 2] [--bns 4 8 16] [--bks 512 1024]
[--warps 1 2] [--prefetch 1 2 3]`` (GPU): for every shape and M, times :func:`kernels.w4a16_gemv_mma.w4a16_gemv_mma`
on every tiling of the grid with one accumulator set per word (``chain=False``) and, where the tiling allows it, per
4-word vector (``chain=True``), at every prefetch depth; each variant is checked against the pure-torch reference
first. Prints the tuned table's entry and the dispatcher's heuristic for shapes without one, then the best eight
variants with µs, TB/s and speed relative to the tuned entry (the heuristic where there is none); all timed in the
same process with the autotuner's timer (CUDA graphs over weight copies rotated past the L2).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16 import w4a16_gemm  # noqa: E402
from kernels.w4a16_autotune import check_tolerance, graph_time_us, rotated_problem  # noqa: E402
from kernels.w4a16_config import heuristic_config, load_table  # noqa: E402
from kernels.w4a16_config import chain_ok  # noqa: E402
from kernels.w4a16_gemv_mma import w4a16_gemv_mma  # noqa: E402


def variants(n: int, k: int, m: int, args) -> list[tuple]:
    """``(block_m, block_n, block_k, num_warps, prefetch, chain)`` of the grid that can run (N, K) at M."""
    out = []
    bm = 4 if m == 3 else min(m, 4)
    for bn, bk, nw, pf, chain in itertools.product(args.bns, args.bks, args.warps, args.prefetch, (False, True)):
        words = bn * bk // 8 / (32 * nw)
        if k % bk == 0 and n % bn == 0 and 2 <= words <= args.max_words and (chain_ok(bn, bk, nw) or not chain):
            out.append((bm, bn, bk, nw, pf, chain))
    return out


def _compile(jobs: list[tuple]) -> int:
    """Worker: launch each ``(n, k, m, variant)`` once so that Triton's on-disk cache holds its binary."""
    from kernels.w4a16_autotune import make_problem

    problems = {}
    for n, k, m, (bm, bn, bk, nw, pf, chain) in jobs:
        if (n, k) not in problems:
            problems[(n, k)] = make_problem(n, k, torch.bfloat16, "cuda")
        wp, s = problems[(n, k)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w4a16_gemv_mma(x, wp, s, None, 128, block_m=bm, block_n=bn, block_k=bk, num_warps=nw, prefetch=pf,
                       chain=chain)
    torch.cuda.synchronize()
    return len(jobs)


def precompile(jobs: list[tuple], n_proc: int) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    parts = [jobs[i::n_proc] for i in range(n_proc)]
    with cf.ProcessPoolExecutor(n_proc, mp_context=mp.get_context("spawn")) as ex:
        done = sum(ex.map(_compile, [p for p in parts if p]))
    print(f"precompiled {done} variants in {n_proc} processes", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["16384x2560", "8192x8192", "2560x8192", "3072x2560"])
    ap.add_argument("--ms", nargs="+", type=int, default=[1])
    ap.add_argument("--bns", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--bks", nargs="+", type=int, default=[512, 1024, 2048])
    ap.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--prefetch", nargs="+", type=int, default=[1, 2],
                    help="register pipeline depths (3 needs the kernel of bench/results/h200-2026-11-30i/exp/)")
    ap.add_argument("--max-words", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=14)
    args = ap.parse_args()
    shapes = [tuple(map(int, sh.split("x"))) for sh in args.shapes]
    precompile([(n, k, m, v) for n, k in shapes for m in args.ms for v in variants(n, k, m, args)], args.jobs)
    dev = torch.device("cuda")
    table = dict(load_table(torch.cuda.get_device_name(dev)))
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dtype = torch.bfloat16
    for n, k in shapes:
        shape = f"{n}x{k}"
        wps, ss, nbytes = rotated_problem(n, k, dtype, dev)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            base = {"tuned": dict(table.get((n, k), [])).get(m),
                    "heuristic": heuristic_config(m, n, k, 128, sms, gemv=True)}
            t_base = {tag: graph_time_us(lambda i, c=c: w4a16_gemm(x, wps[i % len(wps)], ss[i % len(ss)], config=c),
                                         len(wps), replays=5) for tag, c in base.items() if c is not None}
            t_tuned = t_base.get("tuned", t_base["heuristic"])
            rows = []
            for bm, bn, bk, nw, pf, chain in variants(n, k, m, args):
                def call(i, bn=bn, bk=bk, nw=nw, pf=pf, chain=chain, bm=bm):
                    return w4a16_gemv_mma(x, wps[i % len(wps)], ss[i % len(ss)], None, 128, block_m=bm,
                                          block_n=bn, block_k=bk, num_warps=nw, prefetch=pf, chain=chain)
                tol = check_tolerance(call(0), x, wps[0], ss[0])
                assert tol <= 1.0, (n, k, m, bn, bk, nw, pf, chain, tol)
                rows.append((graph_time_us(call, len(wps), replays=5), bn, bk, nw, pf, chain))
            rows.sort()
            for tag, t in t_base.items():
                c = base[tag]
                print(f"{shape} M={m}: {tag} {c.kernel} bn{c.block_n} bk{c.block_k} w{c.num_warps} st{c.num_stages}"
                      f"{' chain' if c.chain else ''} {t:6.2f} us ({nbytes / t / 1e6:.2f} TB/s)", flush=True)
            print(f"   {len(rows)} variants", flush=True)
            for us, bn, bk, nw, pf, chain in rows[:8]:
                print(f"   bn{bn:<3} bk{bk:<5} w{nw} prefetch {pf} chain {int(chain)}: {us:6.2f} us "
                      f"({nbytes / us / 1e6:.2f} TB/s) x{t_tuned / us:.3f}", flush=True)
            best_plain = min((r for r in rows if not r[5]), default=None)
            best_chain = min((r for r in rows if r[5]), default=None)
            if best_plain and best_chain:
                print(f"   best per word {best_plain[0]:.2f} us, best chained {best_chain[0]:.2f} us: "
                      f"x{best_plain[0] / best_chain[0]:.3f}", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
