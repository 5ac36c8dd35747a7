"""bench/gpu/pick_exact_variant.py: picks the exact kernel's decode launch shape with the lowest summed time over
the gate_up rows (M <= 16) of a ``bench_marlin_exact --tune`` JSON, skipping failed variants and other rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pick_exact_variant(tmp_path):
    rows = [
        {"shape": "gate_up", "m": 1, "tune": {"bm16-bn64-w4-s3-split": 40.0, "bm16-bn128-w4-s3-split-pf2-wf": 31.0,
                                              "bm16-bn32-w2-s4-split": 30.0, "bm16-bn64-w4-s3": "TypeError"}},
        {"shape": "gate_up_full", "m": 16, "tune": {"bm16-bn64-w4-s3-split": 50.0,
                                                    "bm16-bn128-w4-s3-split-pf2-wf": 41.0,
                                                    "bm16-bn32-w2-s4-split": 44.0}},
        # not gate_up, or not decode: ignored even though bn32 would win there
        {"shape": "down", "m": 1, "tune": {"bm16-bn32-w2-s4-split": 1.0, "bm16-bn128-w4-s3-split": 99.0}},
        {"shape": "gate_up", "m": 4096, "tune": {"bm64-bn64-w4-s3": 1.0}},
    ]
    f = tmp_path / "tune.json"
    f.write_text(json.dumps({"rows": rows}))
    r = subprocess.run([sys.executable, str(REPO / "bench/gpu/pick_exact_variant.py"), str(f)], capture_output=True,
                       text=True, check=True)
    assert json.loads(r.stdout) == {"block_m": 16, "block_n": 128, "num_warps": 4, "num_stages": 3, "split": True,
                                    "prefetch": 2, "wr_fast": True, "swap": False, "fuse": False}
