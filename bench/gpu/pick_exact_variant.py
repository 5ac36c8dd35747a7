"""Pick the exact kernel's fastest decode launch shape on the gate_up layers from bench_marlin_exact --tune JSON.

    python bench/gpu/pick_exact_variant.py bench_marlin_exact.json   # prints the kwargs as JSON (for
                                                                     # kernels.verify --decode-variant)
Sums each variant's µs over the gate_up rows (M <= 16); keys look like ``bm16-bn64-w2-s3-split-pf2-wf-sw-fu``
(``bench.bench_marlin_exact.variant_key``).
"""
import json
import re
import sys

rows = json.load(open(sys.argv[1]))["rows"]
total: dict[str, float] = {}
for r in rows:
    if r["shape"].startswith("gate_up") and r["m"] <= 16 and "tune" in r:
        for key, us in r["tune"].items():
            if isinstance(us, (int, float)):
                total[key] = total.get(key, 0.0) + us
best = min(total, key=total.get)
m = re.fullmatch(r"bm(\d+)-bn(\d+)-w(\d+)-s(\d+)(-split)?(?:-pf(\d))?(-wf)?(-sw)?(-fu)?", best)
print(json.dumps({"block_m": int(m[1]), "block_n": int(m[2]), "num_warps": int(m[3]), "num_stages": int(m[4]),
                  "split": bool(m[5]), "prefetch": int(m[6] or 0), "wr_fast": bool(m[7]), "swap": bool(m[8]),
                  "fuse": bool(m[9])}))
print(sorted(total.items(), key=lambda t: t[1]), file=sys.stderr)
