"""Pick the exact kernel's fastest decode launch shape on the gate_up layers from bench_marlin_exact --tune JSON.

    python bench/gpu/pick_exact_variant.py bench_marlin_exact.json   # prints the kwargs as JSON (for
                                                                     # kernels.verify --decode-variant)
Sums each variant's µs over the gate_up rows (M <= 16), among the variants timed on every such row (a failed
variant stores its error text instead of a time); the keys are ``bench.bench_marlin_exact.variant_key``'s, read
back with its ``variant_kwargs``.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.bench_marlin_exact import variant_kwargs  # noqa: E402

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        rows = json.load(f)["rows"]
    tunes = [r["tune"] for r in rows if r["shape"].startswith("gate_up") and r["m"] <= 16 and "tune" in r]
    total = {key: sum(t[key] for t in tunes) for key in (tunes[0] if tunes else ())
             if all(isinstance(t.get(key), (int, float)) for t in tunes)}
    if not total:
        sys.exit(f"{sys.argv[1]}: no variant was timed on every gate_up row with M <= 16")
    best = min(total, key=total.get)
    print(json.dumps(variant_kwargs(best)))
    print(sorted(total.items(), key=lambda t: t[1]), file=sys.stderr)
