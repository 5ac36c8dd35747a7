"""How good the fallback configs are: the GEMV heuristic (M <= 2) against the tuned table and the split-K heuristic.

``python bench/gpu/heuristic_check.py`` (GPU): for the E4B shapes (tuned) and the `small` evaluation model's shapes
(not tuned), at M = 1 and 2, times the tuned entry (if any), :func:`kernels.w4a16_config.heuristic_gemv` and the
split-K :func:`kernels.w4a16_config.heuristic_config` with the autotuner's timer (CUDA graphs over weight copies
rotated past the L2), each checked against the pure-torch reference first. Prints µs and the ratios.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16 import w4a16_gemm  # noqa: E402
from kernels.w4a16_autotune import E4B_SHAPES, check_tolerance, graph_time_us, rotated_problem  # noqa: E402
from kernels.w4a16_config import heuristic_config, heuristic_gemv, load_table, select_config  # noqa: E402

# the `small` model (bench/factory.py): qkv / o of the sliding and full layers, gate_up, down
SMALL_SHAPES = ((768, 512), (512, 512), (1536, 512), (512, 1024), (5120, 512), (512, 2560))


def main() -> int:
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    table = load_table(props.name)
    dtype = torch.bfloat16
    ratios = []
    for n, k in E4B_SHAPES + SMALL_SHAPES:
        wps, ss, nbytes = rotated_problem(n, k, dtype, dev)
        for m in (1, 2):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            sms = props.multi_processor_count
            cfgs = {"tuned": select_config(m, n, k, 128, props.name, sms) if (n, k) in table else None,
                    "gemv heuristic": heuristic_gemv(m, k, 128),
                    "split-K heuristic": heuristic_config(m, n, k, 128, sms)}
            us = {}
            for name, cfg in cfgs.items():
                if cfg is None:
                    continue
                tol = check_tolerance(w4a16_gemm(x, wps[0], ss[0], config=cfg), x, wps[0], ss[0])
                assert tol <= 1.0, f"{n}x{k} M={m} {name} {cfg}: tolerance ratio {tol}"
                us[name] = graph_time_us(lambda i, c=cfg: w4a16_gemm(x, wps[i % len(wps)], ss[i], config=c),
                                         len(wps), replays=5)
            g = us["gemv heuristic"]
            line = f"{n}x{k} M={m}: " + " | ".join(f"{name} {t:6.2f} us ({nbytes / t / 1e6:.2f} TB/s)"
                                                  for name, t in us.items())
            line += f" | split-K / gemv {us['split-K heuristic'] / g:.2f}x"
            if "tuned" in us:
                line += f" | gemv / tuned {us['tuned'] / g:.2f}x"
                ratios.append(us["tuned"] / g)
            print(line, flush=True)
        del wps, ss
        torch.cuda.empty_cache()
    if ratios:
        print(f"gemv heuristic vs tuned on the tuned shapes: {min(ratios):.2f}-{max(ratios):.2f} of the tuned speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
