"""Plot bench/vllm_e2e_bench.py's JSON: decode tok/s at each batch size and prefill tok/s, one bar per variant.

    python bench/plot_e2e.py vllm_e2e_bench.json [-o vllm_e2e_bench.png]

Needs matplotlib (``pip install matplotlib``); runs anywhere (no GPU, no vLLM).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# same order and names as bench/vllm_e2e_bench.py's VARIANTS (kept literal so plotting imports nothing heavy)
ORDER = ("bf16-full", "bf16-pruned", "w4a16-vllm", "w4a16-marlin", "w4a16-pdqkit-fast", "w4a16-pdqkit-exact")
COLORS = {"bf16-full": "#9e9e9e", "bf16-pruned": "#616161", "w4a16-vllm": "#8d6e63", "w4a16-marlin": "#1565c0",
          "w4a16-pdqkit-fast": "#2e7d32", "w4a16-pdqkit-exact": "#81c784"}


def load(path: Path) -> tuple[dict, dict]:
    data = json.loads(Path(path).read_text())
    variants = {k: v for k, v in data.get("variants", {}).items() if "decode" in v}
    if not variants:
        raise SystemExit(f"error: {path}: no measured variant (run bench/vllm_e2e_bench.py to the end first)")
    return data.get("meta", {}), variants


def plot(meta: dict, variants: dict, out: Path) -> Path:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit("error: matplotlib is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ORDER if n in variants] + sorted(set(variants) - set(ORDER))
    batches = [str(b) for b in meta.get("batches", sorted(int(b) for b in variants[names[0]]["decode"]))]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4 * (len(batches) + 1), 4.2))
    panels = [(f"decode, batch {b}", [variants[n]["decode"][b]["tok_s"] for n in names],
               [variants[n]["decode"][b]["ms_per_step"] for n in names]) for b in batches]
    panels.append((f"prefill, {meta.get('prefill_len', 2048)}-token prompts",
                   [variants[n]["prefill"]["tok_s"] for n in names], None))
    for ax, (title, vals, ms) in zip(axes, panels):
        bars = ax.bar(range(len(names)), vals, color=[COLORS.get(n, "#455a64") for n in names])
        for i, bar in enumerate(bars):
            label = f"{vals[i]:.0f}" + (f"\n{ms[i]:.2f} ms" if ms else "")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("tokens / s")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.margins(y=0.18)
    graphs = {"vllm": "torch.compile + CUDA graphs", "none": "CUDA graphs (decode), no torch.compile",
              "eager": "eager"}.get(meta.get("compile", "vllm"))
    fig.suptitle(f"vLLM 0.26.0 end to end, {meta.get('scale', 'e4b')}-shaped Gemma-4 (random weights), {graphs}; "
                 f"pruned MLP {meta.get('pruned_width', '?')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="vllm_e2e_bench.json")
    ap.add_argument("-o", "--out", type=Path, help="PNG path (default: next to the JSON)")
    args = ap.parse_args(argv)
    meta, variants = load(args.json)
    out = plot(meta, variants, args.out or args.json.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
