"""The plan cache: a checkpoint's :class:`~pack.targets.ModelPlan` kept across runs.

Planning (pack.targets.plan_model) builds the model's own module tree on the meta device and the
``quantization_config`` block with compressed-tensors' config models. Its imports alone (transformers'
architecture, compressed-tensors) take ~1.5 s, about 40% of a 1B-parameter CPU run. Its result depends on
nothing but the inputs named in :func:`plan_key`. So a run stores it under that key, and the next run with
the same inputs reads it back and imports neither library.

The key (sha256 of a JSON document) covers:
* the bytes of config.json;
* the recipe's targets, ignore list and weight args (rounding does not change the plan);
* the installed versions of transformers, compressed-tensors, pydantic (its ``model_dump`` writes the block) and
  torch;
* the source files of transformers' model package for every ``model_type`` in config.json (a type without a
  package of its own, such as ``gemma4_text``, maps to the longest prefix that has one: ``gemma4``) and of the
  transformers modules that build and save models (``modeling_utils``, ``configuration_utils``,
  ``conversion_mapping``, ``models/auto/configuration_auto``), so an edited or editable transformers is covered
  too;
* every source file of compressed-tensors (its matching rules and config models: ~115 files, ~0.5 MB, 4-9 ms);
* pdqkit's own planning sources: targets, qconfig, card and this module.

Where it lives: ``$PDQKIT_PLAN_CACHE`` if set, else ``$PDQKIT_CACHE/plans``; ``$PDQKIT_CACHE`` defaults to
``~/.cache/pdqkit``. Entries are written, read, marked used and pruned by :mod:`pack.cachedir` (atomic writes,
the :data:`MAX_ENTRIES` most recently used kept, stale temp files deleted, no other file touched). An entry that
cannot be read or does not parse is rebuilt. A cache that cannot be located, read or written only costs the
speed-up. Errors are never cached: a bad config is planned, and reported, on every run.

Size: an entry is ~17 KB for a 1B-parameter Gemma-4 (one name and shape per output tensor).
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from .cachedir import cache_dir, mark_used, prune, read_entry, store_entry

if TYPE_CHECKING:  # stdlib-only at import: ``python -m pack.quantize`` reads the cache before importing torch
    from .targets import ModelPlan

__all__ = ["PLAN_FORMAT", "MAX_ENTRIES", "plan_cache_dir", "plan_key", "cached_plan"]

PLAN_FORMAT = 1  # bump when ModelPlan's fields or their meaning change
MAX_ENTRIES = 256  # entries kept (least recently used go first): ~4 MB at ~17 KB each
_PDQKIT_SOURCES = ("targets.py", "qconfig.py", "card.py", "plancache.py")
_VERSIONED = ("transformers", "compressed-tensors", "pydantic", "torch")
_TRANSFORMERS_SHARED = ("modeling_utils.py", "configuration_utils.py", "conversion_mapping.py",
                        "models/auto/configuration_auto.py")


def plan_cache_dir() -> Path:
    """Where plans are kept: ``$PDQKIT_PLAN_CACHE`` if set, else ``$PDQKIT_CACHE/plans``."""
    return cache_dir("PDQKIT_PLAN_CACHE", "plans")


def _model_types(cfg) -> set[str]:
    """Every ``model_type`` in a config dict, sub-configs included (a multimodal model names its towers')."""
    found = set()
    if isinstance(cfg, dict):
        if isinstance(cfg.get("model_type"), str):
            found.add(cfg["model_type"])
        for v in cfg.values():
            found |= _model_types(v)
    elif isinstance(cfg, list):
        for v in cfg:
            found |= _model_types(v)
    return found


def _model_package(models: Path, model_type: str) -> Path | None:
    """transformers' package folder for ``model_type``: its own, else the longest ``_``-prefix that has one
    (``gemma4_text`` -> ``gemma4``, ``clip_vision_model`` -> ``clip``); None if there is none."""
    parts = model_type.replace("-", "_").split("_")
    for n in range(len(parts), 0, -1):
        d = models / "_".join(parts[:n])
        if d.is_dir():
            return d
    return None


def _package_root(name: str) -> Path | None:
    """The folder of installed top-level package ``name``, found without running any of its code (``find_spec`` of
    a top-level package imports nothing); None if it is not installed."""
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _sources_sha256(cfg: dict, pdqkit_dir: Path = Path(__file__).parent) -> str:
    """sha256 over pdqkit's planning sources and the transformers and compressed-tensors sources that shape
    ``cfg``'s plan; each file is named by its path below its package's folder (``pack/targets.py``,
    ``transformers/models/gemma4/modeling_gemma4.py``, ...), so the same sources hash alike wherever installed."""
    files = [(pdqkit_dir, pdqkit_dir / f) for f in _PDQKIT_SOURCES]
    root = _package_root("transformers")
    if root is not None:
        files += [(root, root / f) for f in _TRANSFORMERS_SHARED if (root / f).is_file()]
        packages = {_model_package(root / "models", mt) for mt in _model_types(cfg)} - {None}
        for d in sorted(packages):
            files += [(root, f) for f in sorted(d.glob("*.py"))]
    root = _package_root("compressed_tensors")
    if root is not None:
        files += [(root, f) for f in sorted(root.rglob("*.py")) if f.is_file()]
    h = hashlib.sha256()
    for top, f in files:
        h.update(str(f.relative_to(top.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def plan_key(config: dict, recipe) -> str:
    """The cache key of the plan of ``config`` (config.json as parsed) for ``recipe`` (pack.qconfig.QuantRecipe):
    hex sha256. The parsed config, not the file's bytes: the plan is the one of exactly the config a run holds."""
    doc = {"format": PLAN_FORMAT, "config": config,
           "recipe": {"targets": list(recipe.targets), "ignore": list(recipe.ignore),
                      "weights": recipe.weights_dict()},
           "versions": {p: _version(p) for p in _VERSIONED},
           "sources_sha256": _sources_sha256(config)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _to_json(plan: ModelPlan) -> dict:
    return {"format": PLAN_FORMAT, "architecture": plan.architecture, "targeted": list(plan.targeted),
            "saved": [[k, list(s)] for k, s in plan.saved.items()], "keep_fp32": list(plan.keep_fp32),
            "quantization_config": plan.quantization_config, "serving": plan.serving}


def _from_json(d, config: dict) -> ModelPlan | None:
    """The plan an entry holds, or None if it is not a well-formed entry of this format."""
    from .targets import ModelPlan

    try:
        if d["format"] != PLAN_FORMAT:
            return None
        saved = {k: tuple(int(n) for n in s) for k, s in d["saved"]}
        plan = ModelPlan(config, d["architecture"], tuple(d["targeted"]), saved, tuple(d["keep_fp32"]),
                         d["quantization_config"], d["serving"])
    except (KeyError, TypeError, ValueError):
        return None
    ok = (isinstance(plan.architecture, str) and all(isinstance(x, str) for x in plan.targeted + plan.keep_fp32)
          and isinstance(plan.quantization_config, dict) and isinstance(plan.serving, dict)
          and {"config_groups", "format", "ignore", "quant_method"} <= set(plan.quantization_config)
          and {"max_position_embeddings", "multimodal", "head_dim_fix"} <= set(plan.serving))
    return plan if ok else None


def cached_plan(ckpt: Path, recipe, *, use_cache: bool = True,
                config: dict | None = None) -> tuple[ModelPlan, bool]:
    """``ckpt``'s plan for ``recipe`` and whether it came from the cache.

    ``use_cache=False`` plans afresh and stores nothing. ``config``: ``ckpt``'s config.json as
    pack.targets.load_config returned it, if the caller has it (else it is read here). Raises
    pack.errors.QuantizeError for bad input (always from a fresh plan: only successes are stored)."""
    from .targets import load_config, plan_model

    if not use_cache:
        return plan_model(ckpt, recipe), False
    cfg = load_config(ckpt) if config is None else config  # the cheap checks first, as plan_model does them
    try:
        path = plan_cache_dir() / f"{plan_key(cfg, recipe)}.json"
    except (OSError, RuntimeError, ValueError):  # no home directory; a source file unreadable or its name not
        # UTF-8; a package in sys.modules without __spec__ (find_spec): plan without the cache
        return plan_model(ckpt, recipe), False
    entry = read_entry(path)  # None: absent, unreadable, not JSON
    plan = None if entry is None else _from_json(entry, cfg)
    if plan is not None:
        mark_used(path)
        return plan, True
    plan = plan_model(ckpt, recipe)
    if plan.config == cfg and store_entry(path, _to_json(plan)):  # config.json unchanged since it was read
        prune(path.parent, MAX_ENTRIES)
    return plan, False
