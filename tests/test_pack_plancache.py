"""pack.plancache: a warm run reads the model plan back instead of building it, and writes the same bytes.

The reference is the fresh plan (pack.targets.plan_model: transformers' meta model + compressed-tensors) and
the output of ``--no-plan-cache`` runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pack.errors import QuantizeError
from pack.plancache import PLAN_FORMAT, _sources_sha256, cached_plan, plan_key
from pack.qconfig import QuantRecipe
from pack.targets import plan_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory) -> Path:
    """Multimodal micro Gemma-4 (vision + audio towers, KV-shared layers, PLE), bf16."""
    from bench.factory import save_random_checkpoint

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("pc") / "mm", multimodal=True, vocab_size=4096)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PDQKIT_CACHE", str(d))
    return d


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "plans").glob("*.json")) if (cache / "plans").is_dir() else []


def test_cached_plan_equals_fresh_plan(mm_ckpt, cache):
    recipe = QuantRecipe()
    fresh = plan_model(mm_ckpt, recipe)
    first, hit1 = cached_plan(mm_ckpt, recipe)
    second, hit2 = cached_plan(mm_ckpt, recipe)
    assert (hit1, hit2) == (False, True)
    assert first == fresh and second == fresh
    assert list(second.saved) == list(fresh.saved)  # dict equality ignores order; the writer's layout does not
    assert len(_entries(cache)) == 1
    # the facts the card needs from a multimodal Gemma-4 survive the round trip
    assert second.serving["multimodal"] is True and second.serving["head_dim_fix"] == fresh.serving["head_dim_fix"]
    # use_cache=False neither reads nor writes
    shutil.rmtree(cache)
    assert cached_plan(mm_ckpt, recipe, use_cache=False) == (fresh, False) and _entries(cache) == []


def test_key_follows_every_input(mm_ckpt, tmp_path):
    base = plan_key(mm_ckpt, QuantRecipe())
    assert plan_key(mm_ckpt, QuantRecipe()) == base
    assert plan_key(mm_ckpt, QuantRecipe(rounding="eager")) == base  # rounding does not change the plan
    assert plan_key(mm_ckpt, QuantRecipe(group_size=64)) != base
    assert plan_key(mm_ckpt, QuantRecipe(ignore=("lm_head",))) != base
    assert plan_key(mm_ckpt, QuantRecipe(targets=("re:.*mlp.*",))) != base
    other = tmp_path / "other"
    shutil.copytree(mm_ckpt, other)
    assert plan_key(other, QuantRecipe()) == base  # the bytes of config.json, not the directory's path
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 128
    (other / "config.json").write_text(json.dumps(cfg))
    assert plan_key(other, QuantRecipe()) != base


def test_key_follows_transformers_model_sources(tmp_path, monkeypatch):
    """The model package of every model_type in config.json is hashed, found without importing transformers."""
    root = tmp_path / "site" / "transformers"
    for mt in ("gemma4", "siglip", "unrelated"):
        (root / "models" / mt).mkdir(parents=True)
        (root / "models" / mt / f"modeling_{mt}.py").write_text("x = 1\n")
    spec = types.SimpleNamespace(submodule_search_locations=[str(root)])
    monkeypatch.setattr("pack.plancache.find_spec", lambda name: spec if name == "transformers" else None)
    cfg = {"model_type": "gemma4", "vision_config": {"model_type": "siglip"}}
    base = _sources_sha256(cfg)
    (root / "models" / "unrelated" / "modeling_unrelated.py").write_text("x = 2\n")
    assert _sources_sha256(cfg) == base
    (root / "models" / "siglip" / "modeling_siglip.py").write_text("x = 2\n")  # a sub-config's model package
    changed = _sources_sha256(cfg)
    assert changed != base
    (root / "models" / "gemma4" / "configuration_gemma4.py").write_text("y = 1\n")  # a new file
    assert _sources_sha256(cfg) != changed


@pytest.mark.parametrize("damage", ["garbage", "wrong format", "missing field", "empty"])
def test_damaged_entry_is_rebuilt(mm_ckpt, cache, damage):
    recipe = QuantRecipe()
    fresh, _ = cached_plan(mm_ckpt, recipe)
    (entry,) = _entries(cache)
    good = json.loads(entry.read_text())
    bad = {"garbage": "{not json", "empty": "",
           "wrong format": json.dumps({**good, "format": PLAN_FORMAT + 1}),
           "missing field": json.dumps({k: v for k, v in good.items() if k != "serving"})}[damage]
    entry.write_text(bad)
    plan, hit = cached_plan(mm_ckpt, recipe)
    assert (plan, hit) == (fresh, False)
    assert json.loads(entry.read_text()) == good  # rewritten
    assert cached_plan(mm_ckpt, recipe) == (fresh, True)


def test_unwritable_cache_costs_only_the_speedup(mm_ckpt, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PDQKIT_CACHE", str(blocker))  # plans/ cannot be created under a file
    fresh = plan_model(mm_ckpt, QuantRecipe())
    assert cached_plan(mm_ckpt, QuantRecipe()) == (fresh, False)
    assert cached_plan(mm_ckpt, QuantRecipe()) == (fresh, False)


def test_errors_are_not_cached(mm_ckpt, cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(mm_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    for _ in range(2):
        with pytest.raises(QuantizeError, match="unknown architecture 'NoSuchModelForCausalLM'"):
            cached_plan(bad, QuantRecipe())
    assert _entries(cache) == []


# a warm CLI run in its own process: which libraries did it import, what did it print
_RUN = """
import json, sys
from pack.quantize import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "imported": sorted(m for m in ("transformers", "compressed_tensors") if m in sys.modules)}))
"""


def _cli(ckpt: Path, out: Path, cache: Path, *extra: str) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-c", _RUN, str(ckpt), "-o", str(out), "--no-progress", *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PDQKIT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[-2]


def test_warm_run_imports_neither_library_and_writes_the_same_bytes(mm_ckpt, tmp_path):
    cache = tmp_path / "cache"
    ref, ref_line = _cli(mm_ckpt, tmp_path / "ref", cache, "--no-plan-cache")
    assert ref == {"rc": 0, "imported": ["compressed_tensors", "transformers"]} and "plan built" in ref_line
    assert _entries(cache) == []
    cold, cold_line = _cli(mm_ckpt, tmp_path / "cold", cache)
    warm, warm_line = _cli(mm_ckpt, tmp_path / "warm", cache)
    assert "plan built" in cold_line and len(_entries(cache)) == 1
    assert warm == {"rc": 0, "imported": []} and "plan cached" in warm_line
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    for d in ("cold", "warm"):
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == names
        for n in names:
            assert (tmp_path / d / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), (d, n)
