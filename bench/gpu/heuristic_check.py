"""How good the fallback configs are: the GEMV heuristic against the tuned table and the split-K heuristic.

``python bench/gpu/heuristic_check.py [--ms 1 2] [--probe]`` (GPU): for the E4B shapes (tuned) and the `small`
evaluation model's shapes (not tuned), at each M, times the tuned entry (if any),
:func:`kernels.w4a16_config.heuristic_gemv` (where it gives a config) and the split-K
:func:`kernels.w4a16_config.heuristic_config` with the autotuner's timer (CUDA graphs over weight copies rotated past
the L2), each checked against the pure-torch reference first. Prints µs and the ratios. ``--probe`` also times a few
fixed ``gemv_mma8`` tilings at M >= 3 (:data:`MMA8_PROBE`), the data a rule for that kernel is read from; ``--tma``
the ``prefill_tma`` tilings of :data:`TMA_PROBE`; ``--splits 2 4 8`` the GEMV heuristic's config with those split-K
values; ``--shapes NxK ...`` other shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16 import w4a16_gemm  # noqa: E402
from kernels.w4a16_autotune import E4B_SHAPES, check_tolerance, graph_time_us, rotated_problem  # noqa: E402
from kernels.w4a16_config import (W4A16Config, heuristic_config, heuristic_gemv, heuristic_tma,  # noqa: E402
                                   load_table, mma8_ok, select_config)

# the `small` model (bench/factory.py): qkv / o of the sliding and full layers, gate_up, down
SMALL_SHAPES = ((768, 512), (512, 512), (1536, 512), (512, 1024), (5120, 512), (512, 2560))
# gemv_mma8 tilings timed by --probe: (block_n, block_k, num_warps, num_stages, chain); block_m 8, and 16 at M > 8
MMA8_PROBE = ((16, 512, 4, 3, False), (16, 512, 4, 2, True), (32, 512, 8, 2, True), (16, 1024, 8, 3, True),
              (16, 256, 2, 3, False), (32, 256, 2, 3, False), (16, 128, 1, 3, False))
# prefill_tma tilings timed by --tma (block_m, block_n, block_k, num_stages)
TMA_PROBE = ((64, 64, 128, 4), (64, 64, 64, 4), (128, 64, 128, 3), (128, 64, 128, 4), (256, 64, 64, 3),
            (128, 128, 128, 2))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--tma", action="store_true", help="also time the prefill_tma tilings of TMA_PROBE")
    ap.add_argument("--splits", nargs="+", type=int, default=[],
                    help="also time the GEMV heuristic's config with each of these split-K values")
    ap.add_argument("--shapes", nargs="+", help="NxK ... instead of the E4B and `small` shapes")
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    table = load_table(props.name)
    dtype = torch.bfloat16
    ratios = []
    shapes = E4B_SHAPES + SMALL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes]
    for n, k in shapes:
        wps, ss, nbytes = rotated_problem(n, k, dtype, dev)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            sms = props.multi_processor_count
            cfgs = {"tuned": select_config(m, n, k, 128, props.name, sms) if (n, k) in table else None,
                    "gemv heuristic": heuristic_gemv(m, n, k, 128),
                    "split-K heuristic": heuristic_config(m, n, k, 128, sms),
                    "tma heuristic": heuristic_tma(m, n, k, 128, sms)}
            if args.probe and m > 2:
                for bm in sorted({8, 16 if m > 8 else 8}):
                    for bn, bk, nw, st, ch in MMA8_PROBE:
                        if k % bk == 0 and mma8_ok(bn, bk, nw) and (bm == 16 or bn != 32 or bk != 256):
                            cfgs[f"mma8 bm{bm} bn{bn} bk{bk} w{nw} st{st}{' chain' if ch else ''}"] = W4A16Config(
                                "gemv_mma8", bm, bn, bk, 1, nw, st, chain=ch)
            if cfgs["gemv heuristic"] is not None:
                for sk in args.splits:
                    cfgs[f"gemv sk{sk}"] = dataclasses.replace(cfgs["gemv heuristic"], split_k=sk)
            if args.tma:
                for bm, bn, bk, st in TMA_PROBE:
                    if k % bk == 0 and n % bn == 0:
                        cfgs[f"tma bm{bm} bn{bn} bk{bk} st{st}"] = W4A16Config("prefill_tma", bm, bn, bk, 1,
                                                                               bn // 16, st)
            us = {}
            for name, cfg in cfgs.items():
                if cfg is None:
                    continue
                tol = check_tolerance(w4a16_gemm(x, wps[0], ss[0], config=cfg), x, wps[0], ss[0])
                assert tol <= 1.0, f"{n}x{k} M={m} {name} {cfg}: tolerance ratio {tol}"
                us[name] = graph_time_us(lambda i, c=cfg: w4a16_gemm(x, wps[i % len(wps)], ss[i], config=c),
                                         len(wps), replays=5)
            line = f"{n}x{k} M={m}: " + " | ".join(f"{name} {t:6.2f} us ({nbytes / t / 1e6:.2f} TB/s)"
                                                  for name, t in us.items())
            if "tma heuristic" in us:
                line += f" | split-K / tma {us['split-K heuristic'] / us['tma heuristic']:.2f}x"
                if "tuned" in us:
                    line += f" | tma / tuned {us['tuned'] / us['tma heuristic']:.2f}x"
            g = us.get("gemv heuristic")
            if g:
                line += f" | split-K / gemv {us['split-K heuristic'] / g:.2f}x"
                if "tuned" in us:
                    line += f" | gemv / tuned {us['tuned'] / g:.2f}x"
                    ratios.append(us["tuned"] / g)
            splits = {name: t for name, t in us.items() if name.startswith("gemv sk")}
            if splits and g:
                best = min(splits, key=splits.get)
                line += f" | best split {best}: {g / splits[best]:.2f}x the gemv heuristic"
            probes = {name: t for name, t in us.items() if name.startswith(("mma8", "tma "))}
            if probes:
                best = min(probes, key=probes.get)
                line += f" | best probe {best}: split-K / it {us['split-K heuristic'] / probes[best]:.2f}x"
            print(line, flush=True)
        del wps, ss
        torch.cuda.empty_cache()
    if ratios:
        print(f"gemv heuristic vs tuned on the tuned shapes: {min(ratios):.2f}-{max(ratios):.2f} of the tuned speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
