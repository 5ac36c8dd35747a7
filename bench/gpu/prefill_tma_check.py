"""The Gluon prefill kernel (:mod:`kernels.w4a16_prefill_tma`) against the tuned path and cuBLAS, same process.

``python bench/gpu/prefill_tma_check.py [--ms 256 1024 4096] [--shapes 3072x2560 ...] [--configs 128,128,4 ...]``
(GPU, sm_90): checks every config against the pure-torch reference (§9B tolerance; bf16, plus fp16, bias and a
ragged M on the first shape), then times each (shape, M) with the autotuner's timer (CUDA graphs over weight copies
rotated past the L2): the tuned ``w4a16_gemm`` path, cuBLAS on the dequantized bf16 weight, and every config.
Prints µs, TFLOP/s and the speed against cuBLAS; then the geomean against cuBLAS of the tuned path and of the best
config per (shape, M).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16 import w4a16_gemm  # noqa: E402
from kernels.w4a16_autotune import (check_tolerance, graph_time_us, make_problem, n_copies,  # noqa: E402
                                    rotated_problem)
from kernels.w4a16_prefill_tma import w4a16_prefill_tma  # noqa: E402
from pack.packing import dequantize  # noqa: E402

SHAPES = ("3072x2560", "2560x2048", "16384x2560", "2560x8192", "8192x8192")


def geomean(v):
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def rotated_with_dequantized(n: int, k: int, dtype, dev):
    """The autotuner's rotated weight copies (``wps``, ``ss``) and the dequantized bf16 copies cuBLAS multiplies
    (enough of them to rotate past the L2, at least two)."""
    wps, ss, _ = rotated_problem(n, k, dtype, dev)
    wds = [dequantize(wp, s, (n, k)) for wp, s in zip(wps, ss)]
    return wps, ss, wds[:max(2, n_copies(n * k * 2))]


def peers_us(x, wps, ss, wds) -> tuple[float, float]:
    """µs of cuBLAS on the dequantized weights and of the tuned ``w4a16_gemm`` path, best of two timings each."""
    t_cublas = min(graph_time_us(lambda i: x @ wds[i % len(wds)].t(), len(wds), replays=5) for _ in range(2))
    t_tuned = min(graph_time_us(lambda i: w4a16_gemm(x, wps[i % len(wps)], ss[i % len(ss)]), len(wps), replays=5)
                  for _ in range(2))
    return t_cublas, t_tuned


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--configs", nargs="+", default=["128,64,64,4", "128,64,128,2", "128,64,128,3", "256,64,64,3",
                                                     "256,64,128,2", "128,128,64,4", "128,128,128,2", "64,64,64,4",
                                                     "64,64,128,3", "64,128,64,4", "256,128,64,3"],
                    help="block_m,block_n,block_k,num_stages")
    args = ap.parse_args()
    cfgs = [tuple(map(int, c.split(","))) for c in args.configs]
    dev, dtype = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)

    # correctness: every config, bf16; fp16 + bias + ragged M on the first shape
    n0, k0 = map(int, args.shapes[0].split("x"))
    fails = 0
    for dt in (torch.bfloat16, torch.float16):
        wp, s = make_problem(n0, k0, dt, dev, seed=5)
        for m in (1, 77, 300, 256):
            x = torch.randn(m, k0, device=dev, dtype=dt)
            bias = torch.randn(n0, device=dev, dtype=dt) if m == 300 else None
            for bm, bn, bk, st in cfgs:
                y = w4a16_prefill_tma(x, wp, s, bias, 128, block_m=bm, block_n=bn, block_k=bk, num_stages=st)
                tol = check_tolerance(y, x, wp, s, bias)
                fails += tol > 1
                print(f"check {dt} {n0}x{k0} M={m} bias={bias is not None} cfg={bm},{bn},{bk},{st}: tol {tol:.3f}"
                      f" {'ok' if tol <= 1 else 'FAIL'}", flush=True)
    # channelwise scales
    wp, s = make_problem(n0, k0, dtype, dev, group=k0, seed=6)
    x = torch.randn(200, k0, device=dev, dtype=dtype)
    for bk in (64, 128):
        y = w4a16_prefill_tma(x, wp, s, None, k0, block_m=128, block_n=64, block_k=bk, num_stages=3)
        tol = check_tolerance(y, x, wp, s)
        fails += tol > 1
        print(f"check channelwise block_k={bk}: tol {tol:.3f}", flush=True)
    print(f"correctness: {fails} failures", flush=True)

    vs_tuned, vs_cublas_best, vs_cublas_tuned = [], [], []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        wps, ss, wds = rotated_with_dequantized(n, k, dtype, dev)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            flop = 2.0 * m * n * k
            t_cublas, t_tuned = peers_us(x, wps, ss, wds)
            best = (math.inf, None)
            line = []
            for bm, bn, bk, st in cfgs:
                call = lambda i, bm=bm, bn=bn, bk=bk, st=st: w4a16_prefill_tma(
                    x, wps[i % len(wps)], ss[i % len(ss)], None, 128, block_m=bm, block_n=bn, block_k=bk,
                    num_stages=st)
                tol = check_tolerance(call(0), x, wps[0], ss[0])
                t = min(graph_time_us(call, len(wps), replays=5) for _ in range(2))
                line.append(f"{bm},{bn},{bk},{st}: {t:7.2f} ({flop / t / 1e6:5.0f} TF/s, x{t_cublas / t:.2f} cuBLAS"
                            f"{'' if tol <= 1 else ' TOL FAIL'})")
                if tol <= 1 and t < best[0]:
                    best = (t, (bm, bn, bk, st))
            print(f"{shape} M={m}: cuBLAS {t_cublas:7.2f} us ({flop / t_cublas / 1e6:5.0f} TF/s) | tuned "
                  f"{t_tuned:7.2f} (x{t_cublas / t_tuned:.2f}) | best tma {best[1]} {best[0]:7.2f} "
                  f"(x{t_cublas / best[0]:.2f} cuBLAS, x{t_tuned / best[0]:.2f} tuned)", flush=True)
            for ln in line:
                print("    " + ln, flush=True)
            vs_tuned.append(t_tuned / best[0])
            vs_cublas_best.append(t_cublas / min(best[0], t_tuned))
            vs_cublas_tuned.append(t_cublas / t_tuned)
        del wps, ss, wds
        torch.cuda.empty_cache()
    print(f"geomean vs cuBLAS: tuned path x{geomean(vs_cublas_tuned):.3f}; best of tuned and tma "
          f"x{geomean(vs_cublas_best):.3f}; tma best / tuned x{geomean(vs_tuned):.3f}")
    return 1 if fails else 0   # a correctness failure fails the run (the timings are printed all the same)


if __name__ == "__main__":
    sys.exit(main())
