"""The plan cache: a checkpoint's :class:`~pack.targets.ModelPlan` kept across runs.

Planning (pack.targets.plan_model) builds the model's own module tree on the meta device and the
``quantization_config`` block with compressed-tensors' config models. Its imports alone (transformers'
architecture, compressed-tensors) take ~1.5 s, about 40% of a 1B-parameter CPU run. Its result depends on
nothing but the inputs named in :func:`plan_key`. So a run stores it under that key, and the next run with
the same inputs reads it back and imports neither library.

The key (sha256 of a JSON document) covers:
* the bytes of config.json;
* the recipe's targets, ignore list and weight args (rounding does not change the plan);
* the installed versions of transformers, compressed-tensors and torch;
* the source files of transformers' model packages for every ``model_type`` in config.json, so an edited
  or editable install is covered too;
* pdqkit's own planning sources: targets, qconfig, card and this module.

Where it lives: ``$PDQKIT_CACHE/plans/<key>.json``; ``$PDQKIT_CACHE`` defaults to ``~/.cache/pdqkit``. Entries are
written to a temp file and renamed. An entry that cannot be read or does not parse is rebuilt. A cache
directory that cannot be written only costs the speed-up. Errors are never cached: a bad config is planned,
and reported, on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # stdlib-only at import: bench.cache takes cache_root from here without importing torch
    from .targets import ModelPlan

__all__ = ["PLAN_FORMAT", "cache_root", "plan_key", "cached_plan"]

PLAN_FORMAT = 1  # bump when ModelPlan's fields or their meaning change
_PDQKIT_SOURCES = ("targets.py", "qconfig.py", "card.py", "plancache.py")
_VERSIONED = ("transformers", "compressed-tensors", "torch")


def cache_root() -> Path:
    """``$PDQKIT_CACHE`` if set, else ``~/.cache/pdqkit`` (not created here)."""
    return Path(os.environ.get("PDQKIT_CACHE") or Path.home() / ".cache" / "pdqkit")


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


def _sources_sha256(cfg: dict) -> str:
    """sha256 over transformers' model-package sources for ``cfg``'s model types and pdqkit's planning sources;
    found without importing transformers (``find_spec`` of a top-level package runs none of its code)."""
    h = hashlib.sha256()
    files = [Path(__file__).parent / f for f in _PDQKIT_SOURCES]
    spec = find_spec("transformers")
    if spec is not None and spec.submodule_search_locations:
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        for mt in sorted(_model_types(cfg)):
            d = models / mt.replace("-", "_")
            if d.is_dir():
                files += sorted(d.glob("*.py"))
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def plan_key(ckpt: Path, recipe) -> str:
    """The cache key of ``ckpt``'s plan for ``recipe`` (pack.qconfig.QuantRecipe): hex sha256."""
    raw = (Path(ckpt) / "config.json").read_bytes()
    doc = {"format": PLAN_FORMAT, "config_sha256": hashlib.sha256(raw).hexdigest(),
           "recipe": {"targets": list(recipe.targets), "ignore": list(recipe.ignore),
                      "weights": recipe.weights_dict()},
           "versions": {p: _version(p) for p in _VERSIONED},
           "sources_sha256": _sources_sha256(json.loads(raw))}
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
          and {"max_position_embeddings", "multimodal", "head_dim_fix"} <= set(plan.serving))
    return plan if ok else None


def _store(path: Path, plan: ModelPlan) -> None:
    """Write the entry atomically; a cache dir that cannot be written is skipped silently."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(_to_json(plan), fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def cached_plan(ckpt: Path, recipe, *, use_cache: bool = True) -> tuple[ModelPlan, bool]:
    """``ckpt``'s plan for ``recipe`` and whether it came from the cache.

    ``use_cache=False`` plans afresh and stores nothing. Raises pack.errors.QuantizeError for bad input (always
    from a fresh plan: only successes are stored)."""
    from .targets import load_config, plan_model

    if not use_cache:
        return plan_model(ckpt, recipe), False
    cfg = load_config(ckpt)  # the cheap checks first, as plan_model does them
    path = cache_root() / "plans" / f"{plan_key(ckpt, recipe)}.json"
    try:
        plan = _from_json(json.loads(path.read_text()), cfg)
    except (OSError, ValueError):  # absent, unreadable, not JSON
        plan = None
    if plan is not None:
        return plan, True
    plan = plan_model(ckpt, recipe)
    _store(path, plan)
    return plan, False
