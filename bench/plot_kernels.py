"""``python -m bench.plot_kernels bench_kernels.json -o roofline.png``: roofline plot of a bench_kernels run.

x: arithmetic intensity (FLOP per byte of weights + scales + activations + output, as each implementation moves
them); y: achieved TFLOP/s. Ceilings: the run's measured copy bandwidth (read+write, used as the streaming
ceiling) and the dense bf16 matrix rate given by ``--peak-tflops`` (default 790, measured on the H200 here).
"""
from __future__ import annotations

import argparse
import json
import sys

STYLE = {"pdqkit": ("o", "tab:red"), "cublas": ("s", "tab:blue"), "marlin": ("^", "tab:green"),
         "machete": ("v", "tab:purple")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plot_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("-o", "--out", default="roofline.png")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(open(args.json).read())
    bw = res["copy_tbs"]
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, (marker, color) in STYLE.items():
        xs, ys = [], []
        for r in res["rows"]:
            if name not in r:
                continue
            m, n, k = r["M"], r["N"], r["K"]
            nbytes = r[name]["weight_bytes"] + 2 * m * k + 2 * m * n
            xs.append(2 * m * n * k / nbytes)
            ys.append(r[name]["tflops"])
        if xs:
            ax.scatter(xs, ys, marker=marker, color=color, label=name, alpha=0.75, s=22)
    lo, hi = 0.5, 1e4
    ridge = args.peak_tflops / bw
    ax.plot([lo, ridge, hi], [lo * bw, args.peak_tflops, args.peak_tflops], "k--", lw=1,
            label=f"roofline: {bw:.2f} TB/s copy, {args.peak_tflops:.0f} TFLOP/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"W4A16 GEMM, {res['device']}, {res['dtype']}, {res['date']} (E4B shapes, M=1..4096)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
