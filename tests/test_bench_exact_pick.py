"""bench/gpu/pick_exact_variant.py: picks the exact kernel's decode launch shape with the lowest summed time over
the gate_up rows (M <= 16) of a ``bench_marlin_exact --tune`` JSON, skipping failed variants and other rows; its
key format (``bench.bench_marlin_exact.variant_key`` / ``variant_kwargs``) round-trips every tuned variant."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pick_exact_variant(tmp_path):
    rows = [
        {"shape": "gate_up", "m": 1, "tune": {"default": 40.0, "split0-bn64-fu1-tl1": 31.0,
                                              "bn32-w2-pf2": 30.0, "split0-bn128-tl1": "OutOfResources"}},
        {"shape": "gate_up_full", "m": 16, "tune": {"default": 50.0, "split0-bn64-fu1-tl1": 41.0,
                                                    "bn32-w2-pf2": 44.0}},
        # not gate_up, or not decode: ignored even though bn32 would win there
        {"shape": "down", "m": 1, "tune": {"bn32-w2-pf2": 1.0, "split0-bn64-fu1-tl1": 99.0}},
        {"shape": "gate_up", "m": 4096, "tune": {"bn64": 1.0}},
    ]
    assert _pick(tmp_path, rows) == {"split": False, "block_n": 64, "fuse": True, "tile_load": True}


def test_pick_skips_a_variant_that_failed_on_some_row(tmp_path):
    """A variant that failed on one row has fewer times to sum: it must not win on that account."""
    rows = [
        {"shape": "gate_up", "m": 1, "tune": {"default": 40.0, "bn32-w2-pf2": 10.0}},
        {"shape": "gate_up", "m": 16, "tune": {"default": 50.0, "bn32-w2-pf2": "OutOfResources"}},
    ]
    assert _pick(tmp_path, rows) == {}  # "default": no kwargs


def _pick(tmp_path, rows) -> dict:
    f = tmp_path / "tune.json"
    f.write_text(json.dumps({"rows": rows}))
    r = subprocess.run([sys.executable, str(REPO / "bench/gpu/pick_exact_variant.py"), str(f)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout)


def test_keys_round_trip():
    from bench.bench_marlin_exact import TUNE_VARIANTS, variant_key, variant_kwargs

    for group in TUNE_VARIANTS.values():
        keys = [variant_key(kw) for kw in group]
        assert len(set(keys)) == len(keys)
        for kw, key in zip(group, keys):
            assert variant_kwargs(key) == kw, key
