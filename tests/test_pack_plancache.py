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


def _fake_transformers(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "site" / "transformers"
    for mt in ("gemma4", "clip", "unrelated", "auto"):
        (root / "models" / mt).mkdir(parents=True)
        (root / "models" / mt / f"modeling_{mt}.py").write_text("x = 1\n")
    (root / "models" / "auto" / "configuration_auto.py").write_text("x = 1\n")
    (root / "modeling_utils.py").write_text("x = 1\n")
    (root / "utils").mkdir()
    (root / "utils" / "hub.py").write_text("x = 1\n")
    spec = types.SimpleNamespace(submodule_search_locations=[str(root)])
    monkeypatch.setattr(pc, "find_spec", lambda name: spec if name == "transformers" else None)
    return root


def test_key_follows_transformers_sources(tmp_path, monkeypatch):
    """The model package of every model_type in config.json (or the longest prefix that has one) and transformers'
    model-building modules are hashed, found without importing transformers."""
    root = _fake_transformers(tmp_path, monkeypatch)
    monkeypatch.setattr(pc, "_as_distributed", lambda root: True)  # a wheel install: its version names its code
    # a text-only Gemma-4 (gemma4_text lives in models/gemma4) with a tower whose type has no package of its own
    cfg = {"model_type": "gemma4_text", "vision_config": {"model_type": "clip_vision_model"}}
    seen = _sources_sha256(cfg)
    for f in ("models/unrelated/modeling_unrelated.py", "utils/hub.py", "models/unrelated/new.py"):
        (root / f).write_text("x = 2\n")
        assert _sources_sha256(cfg) == seen, f
    for f in ("models/gemma4/modeling_gemma4.py", "models/clip/modeling_clip.py", "modeling_utils.py",
              "models/auto/configuration_auto.py", "models/gemma4/configuration_gemma4.py",  # the last one new
              "modeling_layers.py", "initialization.py", "models/auto/modeling_auto.py"):  # new too
        (root / f).write_text("x = 3\n")
        assert _sources_sha256(cfg) != seen, f
        seen = _sources_sha256(cfg)


def test_key_of_an_editable_transformers_follows_every_source(tmp_path, monkeypatch):
    """A transformers that is not its distribution's own files (editable, or a checkout on the path) has a version
    that names no fixed code: every .py file of the imported package is hashed."""
    root = _fake_transformers(tmp_path, monkeypatch)
    monkeypatch.setattr(pc, "_as_distributed", lambda root: False)
    cfg = {"model_type": "gemma4_text"}
    seen = _sources_sha256(cfg)
    (root / "models" / "unrelated" / "notes.txt").write_text("not a source\n")
    assert _sources_sha256(cfg) == seen
    for f in ("models/unrelated/modeling_unrelated.py", "utils/hub.py", "models/unrelated/new.py", "new.py"):
        (root / f).write_text("x = 4\n")
        assert _sources_sha256(cfg) != seen, f
        seen = _sources_sha256(cfg)


class _Dist:
    def __init__(self, site: Path, direct_url: str | None, record: str | None):
        self.site, self.direct_url, self.record = site, direct_url, record

    def read_text(self, name):
        return {"direct_url.json": self.direct_url, "RECORD": self.record}.get(name)

    def locate_file(self, path):
        return self.site / path


_RECORD = "transformers/__init__.py,sha256=abc,123\ntransformers/modeling_utils.py,sha256=def,456\n"


@pytest.mark.parametrize("direct_url, record, where, expected", [
    (None, _RECORD, "site", True),                                                # a wheel from an index
    ('{"url": "file:///src/t", "dir_info": {}}', _RECORD, "site", False),         # pip install ./t: any code
    ('{"url": "file:///src/t", "dir_info": {"editable": true}}', _RECORD, "site", False),  # pip install -e
    ('{"url": "https://x/t.git", "vcs_info": {"vcs": "git"}}', _RECORD, "site", False),  # pip install git+...
    (None, None, "site", False),                     # an .egg-info (setup.py develop, an old checkout): no RECORD
    (None, "transformers/utils.py,,\n", "site", False),   # a RECORD that does not list the package
    (None, _RECORD, "elsewhere", False),                                          # a checkout on PYTHONPATH
    ("{not json", _RECORD, "site", False),
])
def test_as_distributed(tmp_path, monkeypatch, direct_url, record, where, expected):
    site, other = tmp_path / "site", tmp_path / "src"
    for d in (site, other):
        (d / "transformers").mkdir(parents=True)
    monkeypatch.setattr(pc, "distribution", lambda name: _Dist(site, direct_url, record))
    root = (site if where == "site" else other) / "transformers"
    assert pc._as_distributed(root) is expected


def test_the_installed_transformers_counts_as_distributed():
    root = pc._package_root("transformers")
    assert root is not None and pc._as_distributed(root)  # the venv's transformers is a wheel install


_TINY_GEMMA3 = {
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "dtype": "bfloat16",
    "mm_tokens_per_image": 4,
    "text_config": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                    "vocab_size": 512, "sliding_window": 64},
    # no model_type: transformers takes Gemma3Config's default class for it, SiglipVisionConfig (models/siglip)
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
}


def test_sources_name_the_package_of_a_sub_config_without_model_type(tmp_path):
    """A sub-config without model_type brings in a model package the key cannot name from config.json
    (SiglipVisionConfig, transformers' default for Gemma-3's vision_config): the model's classes name it, and an
    entry's ``depends`` record lists its files."""
    from pack.targets import _class_modules, build_meta_model

    ckpt = tmp_path / "gemma3"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_TINY_GEMMA3))
    _, model = build_meta_model(ckpt, _TINY_GEMMA3)  # plan_model refuses Gemma-3 (renamed tensors) after this
    assert type(model.config.vision_config).__module__ == "transformers.models.siglip.configuration_siglip"
    modules = _class_modules(model)
    assert {"transformers.models.siglip.configuration_siglip", "transformers.models.siglip.modeling_siglip",
            "transformers.models.gemma3.modeling_gemma3", "transformers.modeling_utils"} <= set(modules)
    assert not any("/siglip/" in f for f in _key_files_named(_TINY_GEMMA3))  # the key alone misses it
    files = pc._depends(_TINY_GEMMA3, modules)["files"]
    assert {"transformers/models/siglip/configuration_siglip.py", "transformers/models/siglip/modeling_siglip.py",
            "transformers/activations.py"} <= set(files)
    assert not set(files) & set(_key_files_named(_TINY_GEMMA3))  # what the key hashes is not hashed twice


def test_a_hit_checks_the_files_its_entry_depends_on(mm_ckpt, cache):
    """The entry records the sources beyond the key with their sha256; a hit whose listed files no longer hold
    those bytes (or are gone) is planned afresh and the entry rewritten."""
    recipe = QuantRecipe()
    fresh = plan_model(mm_ckpt, recipe)
    assert "transformers.models.gemma4.modeling_gemma4" in fresh.sources
    assert cached_plan(mm_ckpt, recipe) == (fresh, False)
    (entry,) = _entries(cache)
    stored = json.loads(entry.read_text())
    depends = stored["depends"]["files"]
    assert "transformers/activations.py" in depends  # the activations' classes: not among the key's files
    root = pc._package_root("transformers")
    assert stored["depends"]["sha256"] == pc._hash_files([(root, root.parent / n) for n in depends])
    assert cached_plan(mm_ckpt, recipe) == (fresh, True)
    entry.write_text(json.dumps({**stored, "depends": {**stored["depends"], "sha256": "0" * 64}}))  # other bytes
    assert cached_plan(mm_ckpt, recipe) == (fresh, False)
    assert json.loads(entry.read_text()) == stored
    entry.write_text(json.dumps({**stored, "depends": {**stored["depends"],
                                                       "files": depends + ["transformers/models/gone.py"]}}))
    assert cached_plan(mm_ckpt, recipe) == (fresh, False)
    assert cached_plan(mm_ckpt, recipe) == (fresh, True)


def _key_files_named(cfg: dict) -> list[str]:
    return [pc._rel(top, f) for top, f in pc._key_files(cfg)]


def test_depends_follow_the_listed_files(tmp_path, monkeypatch):
    """The check of a hit reads the listed files as they are now: an edit of one of them is a miss."""
    root = _fake_transformers(tmp_path, monkeypatch)
    monkeypatch.setattr(pc, "_as_distributed", lambda root: True)
    (root / "models" / "clip" / "configuration_clip.py").write_text("x = 1\n")
    record = pc._depends({"model_type": "gemma4"}, ["transformers.models.clip.configuration_clip",
                                                    "transformers.utils.hub", "transformers.modeling_utils",
                                                    "torch.nn.modules.linear"])
    # the clip package whole, utils/hub.py; modeling_utils.py is in the key already, torch is not transformers
    assert record["files"] == ["transformers/models/clip/configuration_clip.py",
                               "transformers/models/clip/modeling_clip.py", "transformers/utils/hub.py"]
    assert pc._depends_unchanged(record)
    (root / "models" / "clip" / "modeling_clip.py").write_text("x = 5\n")
    assert not pc._depends_unchanged(record)
    assert pc._depends_unchanged(pc._depends({"model_type": "gemma4"}, ["transformers.models.clip.modeling_clip"]))
    for bad in (None, {}, {"files": "x", "sha256": ""}, {"files": [1], "sha256": ""}):
        assert not pc._depends_unchanged(bad)


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


@pytest.mark.parametrize("damage", ["garbage", "wrong format", "missing field", "empty", "block without ignore",
                                    "another key's", "no key"])
def test_damaged_entry_is_rebuilt(mm_ckpt, cache, damage):
    recipe = QuantRecipe()
    fresh, _ = cached_plan(mm_ckpt, recipe)
    (entry,) = _entries(cache)
    good = json.loads(entry.read_text())
    bad = {"garbage": "{not json", "empty": "",
           "wrong format": json.dumps({**good, "format": PLAN_FORMAT + 1}),
           "missing field": json.dumps({k: v for k, v in good.items() if k != "serving"}),
           "block without ignore": json.dumps({**good, "quantization_config": {
               k: v for k, v in good["quantization_config"].items() if k != "ignore"}}),
           "another key's": json.dumps({**good, "key": "0" * 64}),   # copied or renamed from another key's name
           "no key": json.dumps({k: v for k, v in good.items() if k != "key"})}[damage]
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


def _config_only(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")  # planning reads nothing else
    return dst


@pytest.mark.parametrize("when", ["after each read", "before transformers reads it", "both"])
def test_the_plan_is_built_from_the_config_the_key_holds(mm_ckpt, tmp_path, cache, monkeypatch, when):
    """config.json rewritten while a run plans (after a read of it, or just before transformers would read it again
    to build its config object: the window where the key's bytes and the model's could differ): the plan returned
    and stored under the key of the bytes read is that config's plan, not the other one's."""
    import transformers

    import pack.targets

    ckpt = _config_only(mm_ckpt, tmp_path / "racy")
    keyed = json.loads((ckpt / "config.json").read_text())
    other = json.loads(json.dumps(keyed))
    other["text_config"]["intermediate_size"] += 128  # other shapes: another plan
    expected = plan_model(_config_only(mm_ckpt, tmp_path / "pristine"), QuantRecipe())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(other))
    assert plan_model(tmp_path / "other", QuantRecipe()).saved != expected.saved

    def rewrite() -> None:
        (ckpt / "config.json").write_text(json.dumps(other))

    real_load, real_from_pretrained = pack.targets.load_config, transformers.AutoConfig.from_pretrained

    def load_then_rewrite(path):
        cfg = real_load(path)
        rewrite()  # every later read sees the other config
        return cfg

    def rewrite_then_read(cls, *args, **kwargs):
        rewrite()
        return real_from_pretrained(*args, **kwargs)

    if when != "before transformers reads it":
        monkeypatch.setattr(pack.targets, "load_config", load_then_rewrite)
    if when != "after each read":
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(rewrite_then_read))
    for keyed_config in (None, keyed):  # read by cached_plan, or handed over by the writer (which read it)
        (ckpt / "config.json").write_text(json.dumps(keyed))
        plan, hit = cached_plan(ckpt, QuantRecipe(), config=keyed_config)
        assert plan == expected and plan.saved == expected.saved
        (entry,) = _entries(cache)
        assert entry.name == f"{plan_key(keyed, QuantRecipe())}.json"
        assert pc._from_json(json.loads(entry.read_text()), keyed) == expected  # what a later hit returns
        # use_cache=False builds from the same single read
        (ckpt / "config.json").write_text(json.dumps(keyed))
        assert cached_plan(ckpt, QuantRecipe(), use_cache=False, config=keyed_config) == (expected, False)


def _snapshot(src: Path, root: Path) -> Path:
    d = root / "models--org--name" / "snapshots" / ("ab12" * 10)
    return _config_only(src, d)


@pytest.mark.parametrize("which", ["mm_ckpt", "text_ckpt", "snapshot", "special float", "mistral layer_types",
                                   "unknown model_type"])
def test_hf_config_is_what_from_pretrained_builds(request, tmp_path, which):
    """pack.targets.hf_config builds from the dict already read the same config object as transformers'
    AutoConfig.from_pretrained reading the file (the reference)."""
    from transformers import AutoConfig

    from pack.targets import hf_config

    if which in ("mm_ckpt", "text_ckpt"):
        ckpt = request.getfixturevalue(which)
    elif which == "snapshot":  # a hub snapshot: transformers records its commit hash
        ckpt = _snapshot(request.getfixturevalue("text_ckpt"), tmp_path)
    else:
        ckpt = tmp_path / "c"
        ckpt.mkdir()
        text = json.loads((request.getfixturevalue("text_ckpt") / "config.json").read_text())
        cfg = ({**text, "pdqkit_test_float": {"__float__": "Infinity"}} if which == "special float" else
               {**text, "model_type": "no_such_model_type"} if which == "unknown model_type" else
               {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "vocab_size": 256, "layer_types": ["full_attention"] * 2})
        (ckpt / "config.json").write_text(json.dumps(cfg))
    cfg = json.loads((ckpt / "config.json").read_text())
    if which == "unknown model_type":  # the same first line (what pdqkit's one-line error quotes)
        with pytest.raises(ValueError) as ref_error:
            AutoConfig.from_pretrained(str(ckpt))
        with pytest.raises(ValueError) as our_error:
            hf_config(ckpt, cfg)
        assert str(our_error.value).splitlines()[0] == str(ref_error.value).splitlines()[0]
        return
    ours, ref = hf_config(ckpt, cfg), AutoConfig.from_pretrained(str(ckpt))
    # compared as transformers serialises them (PreTrainedConfig.__eq__ trips over Gemma-4's per-layer attributes)
    assert type(ours) is type(ref) and ours.to_json_string(use_diff=False) == ref.to_json_string(use_diff=False)
    # not serialised; the commit hash is a config attribute in transformers 5.17, gone by 5.24 (which drops the key)
    commit = lambda c: getattr(c, "_commit_hash", None)  # noqa: E731
    assert (ours.name_or_path, commit(ours)) == (ref.name_or_path, commit(ref))
    if which == "snapshot" and hasattr(ref, "_commit_hash"):
        assert ours._commit_hash == "ab12" * 10
    if which == "special float":
        assert ours.pdqkit_test_float == float("inf")
    if which == "mistral layer_types":
        assert ours.model_type == "ministral" and cfg["model_type"] == "mistral"  # the dict read is not changed
