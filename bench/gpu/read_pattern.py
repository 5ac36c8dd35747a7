"""How fast can the decode kernel's weight-read pattern go, with no dequant and no MMA?

``python bench/gpu/read_pattern.py --out DIR``: read-only Triton kernels over an int32 ``[N, K/8]`` matrix (the
compressed-tensors ``weight_packed`` layout), XOR-reduced so the loads cannot be dropped, timed like the autotuner
(CUDA graphs over copies rotated past the L2):

* ``tile``: the decode kernel's pattern: program (n-tile, split) loads ``[BLOCK_N, BLOCK_K/8]`` words per K block;
* ``flat``: each program streams one contiguous chunk of the matrix (a copy kernel's pattern).

If ``tile`` is well below ``flat`` at the same bytes, the access pattern (not the dequant) caps the decode kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16_autotune import graph_time_us, n_copies  # noqa: E402


@triton.jit
def _tile_read(w_ptr, out_ptr, N, stride_wn, KB_PER_SPLIT, KB_TOTAL,
               BLOCK_N: tl.constexpr, WPB: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + tl.arange(0, WPB)[None, :]
    acc = tl.zeros([BLOCK_N, WPB], dtype=tl.int32)
    lo = pid_k * KB_PER_SPLIT
    hi = tl.minimum(lo + KB_PER_SPLIT, KB_TOTAL)
    for kb in range(lo, hi):
        acc ^= tl.load(ptrs + kb * WPB)
    tl.store(out_ptr + pid_k * N + rows, tl.xor_sum(acc, 1))


@triton.jit
def _flat_read(w_ptr, out_ptr, WORDS_PER_PROG, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * WORDS_PER_PROG
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, WORDS_PER_PROG, BLOCK):
        acc ^= tl.load(w_ptr + base + i + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.xor_sum(acc, 0))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", nargs="+", default=["16384x2560", "8192x8192", "2560x8192", "65536x2560"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        kw = k // 8
        nbytes = n * kw * 4
        copies = n_copies(nbytes)
        ws = [torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device=dev) for _ in range(copies)]
        # one int32 per (split, row) or per program: the largest grids below are 8 splits x N rows, 16 programs/SM
        out = torch.empty(max(8 * n, 16 * sms), dtype=torch.int32, device=dev)
        res = []
        for bn in (16, 32, 64, 128):
            for bk in (128, 256, 512, 1024):
                if bk > k:
                    continue
                wpb = bk // 8
                kb_total = k // bk
                for split in (1, 2, 4, 8):
                    if split > kb_total:
                        continue
                    kbs = triton.cdiv(kb_total, split)
                    grid = (triton.cdiv(n, bn), triton.cdiv(kb_total, kbs))
                    if grid[0] * grid[1] < sms // 2 or bn * wpb > 16384:
                        continue
                    for nw in (4, 8):
                        def call(i, bn=bn, wpb=wpb, kbs=kbs, grid=grid, nw=nw):
                            _tile_read[grid](ws[i % copies], out, n, kw, kbs, kb_total, BLOCK_N=bn, WPB=wpb,
                                             num_warps=nw)
                        us = graph_time_us(call, copies)
                        res.append(("tile", us, dict(bn=bn, bk=bk, split=split, warps=nw, programs=grid[0] * grid[1])))
        total = n * kw
        for progs in (sms, 2 * sms, 4 * sms, 8 * sms, 16 * sms):
            for block in (1024, 2048, 4096):
                wpp = triton.cdiv(triton.cdiv(total, progs), block) * block
                p = triton.cdiv(total, wpp)
                if p * wpp != total:
                    continue
                for nw in (4, 8):
                    def call(i, p=p, wpp=wpp, block=block, nw=nw):
                        _flat_read[(p,)](ws[i % copies], out, wpp, BLOCK=block, num_warps=nw)
                    us = graph_time_us(call, copies)
                    res.append(("flat", us, dict(programs=p, block=block, warps=nw)))
        res.sort(key=lambda r: r[1])
        for kind in ("tile", "flat"):
            best = [r for r in res if r[0] == kind][:6]
            for _, us, cfg in best:
                print(f"{shape} {kind}: {us:7.2f} us {nbytes / us / 1e6:.2f} TB/s {cfg}", flush=True)
        tile_tc = [r for r in res if r[0] == "tile" and r[2]["bk"] in (128, 256) and r[2]["bn"] in (64, 128)][:3]
        for _, us, cfg in tile_tc:
            print(f"{shape} tile (decode-like bn64/128 bk128/256): {us:7.2f} us {nbytes / us / 1e6:.2f} TB/s {cfg}",
                  flush=True)
        rows.append({"shape": shape, "bytes": nbytes, "results": [{"kind": a, "us": b, **c} for a, b, c in res]})
        ws = None
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "read_pattern.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "sm_count": sms, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
