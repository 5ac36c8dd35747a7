"""Pick the exact kernel's fastest decode launch shape on the gate_up layers from bench_marlin_exact --tune JSON.

    python bench/gpu/pick_exact_variant.py bench_marlin_exact.json   # prints the kwargs as JSON (for
                                                                     # kernels.verify --decode-variant)
Sums each variant's µs over the gate_up rows (M <= 16); keys are ``bench.bench_marlin_exact.variant_key``'s:
``default`` or e.g. ``split0-bn64-tl1-fu1`` (abbreviation + integer value per launch kwarg).
"""
import json
import re
import sys

ABBREV = {"bm": "block_m", "bn": "block_n", "w": "num_warps", "s": "num_stages", "split": "split",
          "pf": "prefetch", "wf": "wr_fast", "sw": "swap", "fu": "fuse", "tl": "tile_load"}
BOOLS = {"split", "wr_fast", "swap", "fuse", "tile_load"}


def parse_key(key: str) -> dict:
    """``split0-bn64-tl1`` -> {"split": False, "block_n": 64, "tile_load": True}; ``default`` -> {}."""
    if key == "default":
        return {}
    out = {}
    for part in key.split("-"):
        m = re.fullmatch(r"([a-z]+)(\d+)", part)
        if not m or m[1] not in ABBREV:
            raise ValueError(f"unknown variant key part {part!r} in {key!r}")
        name = ABBREV[m[1]]
        out[name] = bool(int(m[2])) if name in BOOLS else int(m[2])
    return out


if __name__ == "__main__":
    rows = json.load(open(sys.argv[1]))["rows"]
    total: dict[str, float] = {}
    for r in rows:
        if r["shape"].startswith("gate_up") and r["m"] <= 16 and "tune" in r:
            for key, us in r["tune"].items():
                if isinstance(us, (int, float)):
                    total[key] = total.get(key, 0.0) + us
    best = min(total, key=total.get)
    print(json.dumps(parse_key(best)))
    print(sorted(total.items(), key=lambda t: t[1]), file=sys.stderr)
