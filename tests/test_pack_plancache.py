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
import time
import types
from pathlib import Path

import pytest

from pack.errors import QuantizeError
import pack.cachedir as cachedir
import pack.plancache as pc
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
    d = tmp_path / "plans"
    monkeypatch.setenv("PDQKIT_PLAN_CACHE", str(d))
    return d


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.is_dir() else []


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


def _key(ckpt: Path, recipe: QuantRecipe) -> str:
    return plan_key(json.loads((ckpt / "config.json").read_text()), recipe)


def test_key_follows_every_input(mm_ckpt, tmp_path, monkeypatch):
    base = _key(mm_ckpt, QuantRecipe())
    assert _key(mm_ckpt, QuantRecipe()) == base
    assert _key(mm_ckpt, QuantRecipe(rounding="eager")) == base  # rounding does not change the plan
    assert _key(mm_ckpt, QuantRecipe(group_size=64)) != base
    assert _key(mm_ckpt, QuantRecipe(ignore=("lm_head",))) != base
    assert _key(mm_ckpt, QuantRecipe(targets=("re:.*mlp.*",))) != base
    cfg = json.loads((mm_ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 128
    assert plan_key(cfg, QuantRecipe()) != base
    for pkg in ("transformers", "compressed-tensors", "pydantic", "torch"):  # each library's version
        real = pc._version
        monkeypatch.setattr(pc, "_version", lambda p, pkg=pkg, real=real: "0.0.0-other" if p == pkg else real(p))
        assert _key(mm_ckpt, QuantRecipe()) != base, pkg
        monkeypatch.setattr(pc, "_version", real)
    assert _key(mm_ckpt, QuantRecipe()) == base


def test_key_follows_pdqkit_planning_sources(tmp_path):
    pdqkit = tmp_path / "pack"
    shutil.copytree(REPO / "pack", pdqkit)
    cfg = {"model_type": "gemma4"}
    assert _sources_sha256(cfg, pdqkit) == _sources_sha256(cfg)
    for name in ("targets.py", "qconfig.py", "card.py", "plancache.py"):
        f = pdqkit / name
        keep = f.read_bytes()
        f.write_bytes(keep + b"# edited\n")
        assert _sources_sha256(cfg, pdqkit) != _sources_sha256(cfg), name
        f.write_bytes(keep)


def test_key_follows_transformers_sources(tmp_path, monkeypatch):
    """The model package of every model_type in config.json (or the longest prefix that has one) and transformers'
    model-building modules are hashed, found without importing transformers."""
    root = tmp_path / "site" / "transformers"
    for mt in ("gemma4", "clip", "unrelated", "auto"):
        (root / "models" / mt).mkdir(parents=True)
        (root / "models" / mt / f"modeling_{mt}.py").write_text("x = 1\n")
    (root / "models" / "auto" / "configuration_auto.py").write_text("x = 1\n")
    (root / "modeling_utils.py").write_text("x = 1\n")
    spec = types.SimpleNamespace(submodule_search_locations=[str(root)])
    monkeypatch.setattr(pc, "find_spec", lambda name: spec if name == "transformers" else None)
    # a text-only Gemma-4 (gemma4_text lives in models/gemma4) with a tower whose type has no package of its own
    cfg = {"model_type": "gemma4_text", "vision_config": {"model_type": "clip_vision_model"}}
    seen = _sources_sha256(cfg)
    (root / "models" / "unrelated" / "modeling_unrelated.py").write_text("x = 2\n")
    assert _sources_sha256(cfg) == seen
    for f in ("models/gemma4/modeling_gemma4.py", "models/clip/modeling_clip.py", "modeling_utils.py",
              "models/auto/configuration_auto.py", "models/gemma4/configuration_gemma4.py"):  # the last one new
        (root / f).write_text("x = 3\n")
        assert _sources_sha256(cfg) != seen, f
        seen = _sources_sha256(cfg)


def test_no_home_directory_plans_without_the_cache(mm_ckpt, monkeypatch):
    monkeypatch.delenv("PDQKIT_PLAN_CACHE")
    monkeypatch.delenv("PDQKIT_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(pc.Path, "home", staticmethod(no_home))
    assert cached_plan(mm_ckpt, QuantRecipe()) == (plan_model(mm_ckpt, QuantRecipe()), False)


@pytest.mark.parametrize("error", [ValueError("transformers.__spec__ is None"),  # find_spec on a bare module
                                   UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")])
def test_a_key_that_cannot_be_computed_plans_without_the_cache(mm_ckpt, cache, monkeypatch, error):
    def fail(name):
        raise error

    monkeypatch.setattr(pc, "find_spec", fail)
    assert cached_plan(mm_ckpt, QuantRecipe()) == (plan_model(mm_ckpt, QuantRecipe()), False)
    assert _entries(cache) == []


@pytest.mark.parametrize("damage", ["garbage", "wrong format", "missing field", "empty", "block without ignore"])
def test_damaged_entry_is_rebuilt(mm_ckpt, cache, damage):
    recipe = QuantRecipe()
    fresh, _ = cached_plan(mm_ckpt, recipe)
    (entry,) = _entries(cache)
    good = json.loads(entry.read_text())
    bad = {"garbage": "{not json", "empty": "",
           "wrong format": json.dumps({**good, "format": PLAN_FORMAT + 1}),
           "missing field": json.dumps({k: v for k, v in good.items() if k != "serving"}),
           "block without ignore": json.dumps({**good, "quantization_config": {
               k: v for k, v in good["quantization_config"].items() if k != "ignore"}})}[damage]
    entry.write_text(bad)
    plan, hit = cached_plan(mm_ckpt, recipe)
    assert (plan, hit) == (fresh, False)
    assert json.loads(entry.read_text()) == good  # rewritten
    assert cached_plan(mm_ckpt, recipe) == (fresh, True)


def test_unwritable_cache_costs_only_the_speedup(mm_ckpt, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PDQKIT_PLAN_CACHE", str(blocker / "plans"))  # cannot be created under a file
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
                       env={**os.environ, "PDQKIT_PLAN_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[-2]


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    """Text-only micro Gemma-4 (Gemma4ForCausalLM, model_type gemma4_text), bf16."""
    from bench.factory import save_random_checkpoint

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("pc") / "text", vocab_size=4096)


@pytest.mark.parametrize("which", ["multimodal, default recipe", "text-only, more ignored, group 64"])
def test_warm_run_imports_neither_library_and_writes_the_same_bytes(request, tmp_path, which):
    ckpt, extra = ((request.getfixturevalue("mm_ckpt"), ()) if which.startswith("multimodal") else
                   (request.getfixturevalue("text_ckpt"), ("--extra-ignore", "re:.*down_proj", "--group-size", "64")))
    cache = tmp_path / "plans"
    ref, ref_line = _cli(ckpt, tmp_path / "ref", cache, "--no-plan-cache", *extra)
    assert ref == {"rc": 0, "imported": ["compressed_tensors", "transformers"]} and "plan built" in ref_line
    assert _entries(cache) == []
    cold, cold_line = _cli(ckpt, tmp_path / "cold", cache, *extra)
    warm, warm_line = _cli(ckpt, tmp_path / "warm", cache, *extra)
    assert "plan built" in cold_line and len(_entries(cache)) == 1
    assert warm == {"rc": 0, "imported": []} and "plan cached" in warm_line
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    for d in ("cold", "warm"):
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == names
        for n in names:
            assert (tmp_path / d / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), (d, n)


def test_key_follows_compressed_tensors_sources(tmp_path, monkeypatch):
    """Every source file of compressed-tensors (its matching rules and config models shape the plan) is hashed,
    subpackages included, found without importing it."""
    root = tmp_path / "site" / "compressed_tensors"
    (root / "utils").mkdir(parents=True)
    (root / "__init__.py").write_text("x = 1\n")
    (root / "utils" / "match.py").write_text("x = 1\n")
    spec = types.SimpleNamespace(submodule_search_locations=[str(root)])
    monkeypatch.setattr(pc, "find_spec", lambda name: spec if name == "compressed_tensors" else None)
    cfg = {"model_type": "gemma4"}
    seen = _sources_sha256(cfg)
    (root / "README.md").write_text("not a source\n")
    assert _sources_sha256(cfg) == seen
    for f in ("utils/match.py", "__init__.py", "quantization/quant_args.py"):  # the last one new
        (root / f).parent.mkdir(exist_ok=True)
        (root / f).write_text("x = 3\n")
        assert _sources_sha256(cfg) != seen, f
        seen = _sources_sha256(cfg)
    # the same sources installed elsewhere hash alike (paths are taken below the package's parent folder)
    shutil.copytree(root, tmp_path / "other-site" / "compressed_tensors")
    spec.submodule_search_locations = [str(tmp_path / "other-site" / "compressed_tensors")]
    assert _sources_sha256(cfg) == seen


def _fake_entry(cache: Path, name: str, mtime: float) -> Path:
    f = cache / name
    f.write_text("{}")
    os.utime(f, (mtime, mtime))
    return f


def test_store_keeps_the_most_recently_used_entries(mm_ckpt, cache, monkeypatch):
    """A run that stores an entry keeps the MAX_ENTRIES most recently used, deletes stale temp files, and touches
    no other file of the folder."""
    monkeypatch.setattr(pc, "MAX_ENTRIES", 2)
    cache.mkdir(parents=True)
    # names in the reverse order of their last use (2001): an order by name would keep the wrong one
    for i, c in enumerate("fdb"):
        _fake_entry(cache, c * 64 + ".json", 1e9 + i)
    stale = _fake_entry(cache, "." + "e" * 64 + ".json.k2j_8x.tmp", 1e9)  # a killed writer's file
    _fake_entry(cache, "." + "e" * 64 + ".json.q0a9zz.tmp", time.time())  # a writer still at work
    for other in ("package.json", ".vimswap.tmp", "notes.txt"):  # not the cache's: never deleted, however old
        _fake_entry(cache, other, 1e9)
    cached_plan(mm_ckpt, QuantRecipe())
    left = {p.name for p in cache.iterdir()}
    new = f"{_key(mm_ckpt, QuantRecipe())}.json"
    assert left == {new, "b" * 64 + ".json", "." + "e" * 64 + ".json.q0a9zz.tmp",
                    "package.json", ".vimswap.tmp", "notes.txt"}
    assert not stale.exists()


@pytest.mark.parametrize("refusal", [PermissionError(13, "Permission denied"),
                                     OSError(30, "Read-only file system")])
def test_a_hit_marks_its_entry_used(mm_ckpt, cache, monkeypatch, refusal):
    recipe = QuantRecipe()
    plan, _ = cached_plan(mm_ckpt, recipe)
    (entry,) = _entries(cache)
    os.utime(entry, (1e9, 1e9))
    newer = _fake_entry(cache, "c" * 64 + ".json", 1e9 + 60)
    assert cached_plan(mm_ckpt, recipe) == (plan, True)
    assert entry.stat().st_mtime > 1e9 + 3600
    # the hit protects the entry from the next store's pruning; the entry not used since goes
    monkeypatch.setattr(pc, "MAX_ENTRIES", 2)
    cached_plan(mm_ckpt, QuantRecipe(group_size=64))
    assert entry.exists() and not newer.exists() and len(_entries(cache)) == 2

    # a cache this run may read but not touch (read-only, another user's) still serves the plan
    def refuse(*a, **k):
        raise refusal

    monkeypatch.setattr(cachedir.os, "utime", refuse)
    assert cached_plan(mm_ckpt, recipe) == (plan, True)
