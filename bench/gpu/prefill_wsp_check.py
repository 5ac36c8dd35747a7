"""The warp-specialised Gluon prefill kernel (:mod:`kernels.w4a16_prefill_wsp`) against ``prefill_tma``, the tuned
path and cuBLAS, same process.

``python bench/gpu/prefill_wsp_check.py [--ms 256 1024 4096] [--shapes 3072x2560 ...] [--configs 128,128,128,4 ...]``
(GPU, sm_90): checks every config against the pure-torch reference (§9B tolerance; bf16 and fp16, bias, ragged M,
a ragged N, channelwise scales). Without split-K and with 128 weight rows it also checks, bit for bit, against
``prefill_tma`` with the same activation rows and K block (each output is one chain of k16 MMAs in K order in
both); the other configs (64 weight rows: the two warpgroups split K; split-K; stream-K, a fifth field ``s``)
against a repeat of themselves; the channelwise check runs two stream-K tilings too.
Then times each (shape, M) with the autotuner's timer (CUDA graphs over weight copies rotated past the L2): the
tuned ``w4a16_gemm`` path, cuBLAS on the dequantized bf16 weight, ``prefill_tma`` tilings and every ``wsp`` config.
Prints µs, TFLOP/s and the speed against cuBLAS, then geomeans against cuBLAS. (``--configs`` took
``block_m,block_k,num_stages[,split_k]`` with 128 rows before the twenty-eighth session; it now names ``block_n``.)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.gpu.prefill_tma_check import geomean, peers_us, rotated_with_dequantized  # noqa: E402
from kernels.w4a16_autotune import check_tolerance, graph_time_us, make_problem  # noqa: E402
from kernels.w4a16_prefill_tma import w4a16_prefill_tma  # noqa: E402
from kernels.w4a16_prefill_wsp import w4a16_prefill_wsp  # noqa: E402

SHAPES = ("3072x2560", "2560x2048", "16384x2560", "2560x8192", "8192x8192")
TMA = ("128,64,128,4", "128,64,128,3", "256,64,64,3", "64,64,128,4")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 512, 1024, 4096])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--configs", nargs="+", default=["128,128,128,4", "256,128,128,3", "128,64,128,4", "128,64,128,5",
                                                     "128,64,64,6", "256,64,128,2", "256,64,64,4", "64,64,128,4",
                                                     "128,64,128,4,2", "128,128,128,4,3"],
                    help="block_m,block_n,block_k,num_stages[,split_k or s] (block_n 64: the warpgroups split K; "
                         "s: stream-K)")
    ap.add_argument("--tma", nargs="*", default=list(TMA), help="prefill_tma block_m,block_n,block_k,stages")
    ap.add_argument("--regs", type=int, default=232, help="consumer registers (setmaxnreg)")
    args = ap.parse_args()
    # the fifth field: split_k (>= 1, default 1), or "s" for stream-K (encoded as split_k 0 here)
    cfgs = []
    for c in args.configs:
        f = (c + ",1").split(",")[:5]
        if f[4] != "s" and int(f[4]) < 1:
            ap.error(f"--configs: the fifth field is a split_k >= 1 or s (stream-K), got {c}")
        cfgs.append(tuple(int(v) for v in f[:4]) + (0 if f[4] == "s" else int(f[4]), ))
    tmas = [tuple(map(int, c.split(","))) for c in args.tma]
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)

    fails = 0
    for dt, n0, k0, ms in ((torch.bfloat16, 3072, 2560, (1, 77, 300)), (torch.bfloat16, 2624, 2048, (77, 300)),
                           (torch.float16, 2624, 2048, (300, ))):
        wp, s = make_problem(n0, k0, dt, dev, seed=5)
        for m in ms:
            x = torch.randn(m, k0, device=dev, dtype=dt)
            bias = torch.randn(n0, device=dev, dtype=dt) if m == 300 else None
            for bm, bn, bk, st, sk in cfgs:
                y = w4a16_prefill_wsp(x, wp, s, bias, 128, block_m=bm, block_n=bn, block_k=bk, num_stages=st,
                                      split_k=max(sk, 1), stream_k=sk == 0, consumer_regs=args.regs)
                y2 = w4a16_prefill_wsp(x, wp, s, bias, 128, block_m=bm, block_n=bn, block_k=bk, num_stages=st,
                                       split_k=max(sk, 1), stream_k=sk == 0, consumer_regs=args.regs)
                tol = check_tolerance(y, x, wp, s, bias)
                if sk == 1 and bn == 128:
                    ref = w4a16_prefill_tma(x, wp, s, bias, 128, block_m=bm, block_n=64, block_k=bk, num_stages=2)
                    bits = "= prefill_tma" if torch.equal(y, ref) else "DIFFER from prefill_tma"
                else:
                    bits = "repeat identical" if torch.equal(y, y2) else "REPEAT DIFFERS"
                fails += tol > 1 or bits[0].isupper()
                print(f"check {dt} {n0}x{k0} M={m} bias={bias is not None} cfg={bm},{bn},{bk},{st},{sk or 's'}: "
                      f"tol {tol:.3f} "
                      f"{'ok' if tol <= 1 else 'FAIL'}, {bits}", flush=True)
    wp, s = make_problem(3072, 2560, torch.bfloat16, dev, group=2560, seed=6)
    x = torch.randn(200, 2560, device=dev, dtype=torch.bfloat16)
    for bn, bk, stream in ((128, 64, False), (128, 128, False), (64, 128, False), (128, 128, True), (64, 64, True)):
        tol = check_tolerance(w4a16_prefill_wsp(x, wp, s, None, 2560, block_m=128, block_n=bn, block_k=bk,
                                                num_stages=3, stream_k=stream), x, wp, s)
        fails += tol > 1
        print(f"check channelwise block_n={bn} block_k={bk} stream_k={stream}: tol {tol:.3f}", flush=True)
    print(f"correctness: {fails} failures", flush=True)

    dtype = torch.bfloat16
    g_tuned, g_tma, g_wsp, g_best = [], [], [], []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        wps, ss, wds = rotated_with_dequantized(n, k, dtype, dev)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            flop = 2.0 * m * n * k
            t_cublas, t_tuned = peers_us(x, wps, ss, wds)
            best = {"tma": (math.inf, None), "wsp": (math.inf, None)}
            lines = []
            for kind, grid in (("tma", tmas), ("wsp", cfgs)):
                for cfg in grid:
                    if kind == "tma":
                        bm, bn, bk, st = cfg
                        call = lambda i, bm=bm, bn=bn, bk=bk, st=st: w4a16_prefill_tma(
                            x, wps[i % len(wps)], ss[i % len(ss)], None, 128, block_m=bm, block_n=bn, block_k=bk,
                            num_stages=st)
                    else:
                        bm, bn, bk, st, sk = cfg
                        call = lambda i, bm=bm, bn=bn, bk=bk, st=st, sk=sk: w4a16_prefill_wsp(
                            x, wps[i % len(wps)], ss[i % len(ss)], None, 128, block_m=bm, block_n=bn, block_k=bk,
                            num_stages=st, split_k=max(sk, 1), stream_k=sk == 0, consumer_regs=args.regs)
                    tol = check_tolerance(call(0), x, wps[0], ss[0])
                    t = min(graph_time_us(call, len(wps), replays=5) for _ in range(2))
                    tag = ",".join(map(str, cfg[:4])) + ("" if len(cfg) < 5 else ",s" if cfg[4] == 0
                                                         else f",{cfg[4]}")
                    lines.append(f"{kind} {tag}: {t:7.2f} ({flop / t / 1e6:5.0f} TF/s, x{t_cublas / t:.3f} cuBLAS"
                                 f"{'' if tol <= 1 else ' TOL FAIL'})")
                    if tol <= 1 and t < best[kind][0]:
                        best[kind] = (t, tag)
            tb, tw = best["tma"][0], best["wsp"][0]
            print(f"{shape} M={m}: cuBLAS {t_cublas:7.2f} us ({flop / t_cublas / 1e6:5.0f} TF/s) | tuned {t_tuned:7.2f}"
                  f" (x{t_cublas / t_tuned:.3f}) | tma {best['tma'][1]} {tb:7.2f} (x{t_cublas / tb:.3f}) | wsp "
                  f"{best['wsp'][1]} {tw:7.2f} (x{t_cublas / tw:.3f} cuBLAS, x{min(tb, t_tuned) / tw:.3f} best other)",
                  flush=True)
            for ln in lines:
                print("    " + ln, flush=True)
            g_tuned.append(t_cublas / t_tuned)
            g_tma.append(t_cublas / min(tb, t_tuned))
            g_wsp.append(t_cublas / tw)
            g_best.append(t_cublas / min(tb, tw, t_tuned))
        del wps, ss, wds
        torch.cuda.empty_cache()
    print(f"geomean vs cuBLAS over {len(g_tuned)} rows: tuned x{geomean(g_tuned):.3f}; best of tuned and tma "
          f"x{geomean(g_tma):.3f}; wsp best x{geomean(g_wsp):.3f}; best of all x{geomean(g_best):.3f}", flush=True)
    return 1 if fails else 0   # a correctness failure fails the run (the timings are printed all the same)


if __name__ == "__main__":
    sys.exit(main())
