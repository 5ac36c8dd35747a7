"""The plan cache: a checkpoint's :class:`~pack.targets.ModelPlan` kept across runs.

Planning (pack.targets.plan_model) builds the model's own module tree on the meta device and the
``quantization_config`` block with compressed-tensors' config models. Its imports alone (transformers'
architecture, compressed-tensors) take ~1.5 s, about 40% of a 1B-parameter CPU run. Its result depends on
nothing but the inputs named in :func:`plan_key`. So a run stores it under that key, and the next run with
the same inputs reads it back and imports neither library.

The key (sha256 of a JSON document) covers:
* the bytes of config.json (the plan is built from the dict this run read and keyed: config.json is read once);
* the recipe's targets, ignore list and weight args (rounding does not change the plan);
* the installed versions of transformers, compressed-tensors, pydantic (its ``model_dump`` writes the block) and
  torch;
* the source files of transformers' model package for every ``model_type`` in config.json (a type without a
  package of its own, such as ``gemma4_text``, maps to the longest prefix that has one: ``gemma4``) and of the
  transformers modules that build and save models (``modeling_utils``, ``configuration_utils``,
  ``conversion_mapping``, ``modeling_layers``, ``initialization``, ``models/auto/configuration_auto`` and
  ``modeling_auto``);
* when the imported transformers is not its distribution's own files as installed from an index (any install
  with a ``direct_url.json``: editable, a local directory, a VCS or archive URL; a legacy develop install or a
  checkout with an ``.egg-info``; a package found elsewhere than the distribution's files, e.g. a source checkout
  on ``PYTHONPATH``), so that its version names no fixed code: every source file of that package instead (~2,700
  files, ~53 MB: ~0.1 s);
* every source file of compressed-tensors (its matching rules and config models: ~115 files, ~0.5 MB, 4-9 ms);
* pdqkit's own planning sources: targets, qconfig, card and this module.

An entry also names the other transformers sources the plan was derived from, found when it was built: the model
packages and modules that define the classes of the model's modules and configs (a sub-config that config.json
leaves out, or gives no ``model_type``, takes its class's default, which may live in another model package), with
their sha256. A hit whose listed files are missing or differ is planned afresh and stored again. A config.json
that lists ``configuration_files`` (transformers may read a versioned ``config.X.json`` instead, which the key
does not cover) is planned without the cache.

Where it lives: ``$PDQKIT_PLAN_CACHE`` if set, else ``$PDQKIT_CACHE/plans``; ``$PDQKIT_CACHE`` defaults to
``~/.cache/pdqkit``. Entries are written, read, marked used and pruned by :mod:`pack.cachedir` (atomic writes,
the :data:`MAX_ENTRIES` most recently used kept, stale temp files deleted, no other file touched). An entry that
cannot be read, does not parse, or names another key than its file's is rebuilt. A cache that cannot be located,
read or written only costs the speed-up. Errors are never cached: a bad config is planned, and reported, on every
run.

Size: an entry is ~17 KB for a 1B-parameter Gemma-4 (one name and shape per output tensor).
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, distribution, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from .cachedir import cache_dir, mark_used, prune, read_entry, store_entry

if TYPE_CHECKING:  # stdlib-only at import: ``python -m pack.quantize`` reads the cache before importing torch
    from .targets import ModelPlan

__all__ = ["PLAN_FORMAT", "MAX_ENTRIES", "plan_cache_dir", "plan_key", "cached_plan"]

PLAN_FORMAT = 3  # bump when ModelPlan's fields or their meaning change, or an entry's layout (2: "depends"; 3:
#                  entries name their key)
CACHE_NAME = "plans"  # what its entries name as their cache (pack.cachedir: a folder may hold both caches)
MAX_ENTRIES = 256  # entries kept (least recently used go first): ~4 MB at ~17 KB each
_PDQKIT_SOURCES = ("targets.py", "qconfig.py", "card.py", "plancache.py")
_VERSIONED = ("transformers", "compressed-tensors", "pydantic", "torch")
_TRANSFORMERS_SHARED = ("modeling_utils.py", "configuration_utils.py", "conversion_mapping.py", "modeling_layers.py",
                        "initialization.py", "models/auto/configuration_auto.py", "models/auto/modeling_auto.py")


def plan_cache_dir() -> Path:
    """Where plans are kept: ``$PDQKIT_PLAN_CACHE`` if set, else ``$PDQKIT_CACHE/plans``."""
    return cache_dir("PDQKIT_PLAN_CACHE", CACHE_NAME)


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


def _as_distributed(root: Path, top: str = "transformers", dist_name: str = "transformers") -> bool:
    """Whether package ``top``, found at ``root``, is distribution ``dist_name``'s own files as installed from an
    index, whose version then names its code. Not so for: an install from a local directory, a VCS or an archive
    URL (any ``direct_url.json``: editable or not, its version string pins no code); a legacy develop install or a
    source checkout with an ``.egg-info`` (no ``RECORD`` listing ``top/__init__.py``); a package found elsewhere
    than the distribution's files (a checkout on ``PYTHONPATH``)."""
    try:
        dist = distribution(dist_name)
        if dist.read_text("direct_url.json") is not None:
            return False
        record = dist.read_text("RECORD") or ""
    except (PackageNotFoundError, OSError, ValueError):
        return False
    if f"\n{top}/__init__.py," not in "\n" + record:  # one substring search of ~300 KB (~0.3 ms), every run
        return False
    return Path(dist.locate_file(top)).resolve() == root.resolve()


def _key_files(cfg: dict, pdqkit_dir: Path = Path(__file__).parent) -> list[tuple[Path, Path]]:
    """``(package folder, file)`` of every source file the key hashes for ``cfg`` (see the module doc)."""
    files = [(pdqkit_dir, pdqkit_dir / f) for f in _PDQKIT_SOURCES]
    root = _package_root("transformers")
    if root is not None:
        if not _as_distributed(root):  # its version names no fixed code: any of its files may have been edited
            files += [(root, f) for f in sorted(root.rglob("*.py")) if f.is_file()]
        else:
            files += [(root, root / f) for f in _TRANSFORMERS_SHARED if (root / f).is_file()]
            packages = {_model_package(root / "models", mt) for mt in _model_types(cfg)} - {None}
            for d in sorted(packages):
                files += [(root, f) for f in sorted(d.glob("*.py"))]
    root = _package_root("compressed_tensors")
    if root is not None:
        files += [(root, f) for f in sorted(root.rglob("*.py")) if f.is_file()]
    return files


def _rel(top: Path, f: Path) -> str:
    """``f``'s name below its package's parent folder (``transformers/models/gemma4/modeling_gemma4.py``): the same
    sources hash alike wherever installed."""
    return f.relative_to(top.parent).as_posix()


def _hash_files(files: list[tuple[Path, Path]]) -> str:
    h = hashlib.sha256()
    for top, f in files:
        h.update(_rel(top, f).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _sources_sha256(cfg: dict, pdqkit_dir: Path = Path(__file__).parent) -> str:
    """sha256 over pdqkit's planning sources and the transformers and compressed-tensors sources that shape
    ``cfg``'s plan (:func:`_key_files`), each named by its path below its package's folder."""
    return _hash_files(_key_files(cfg, pdqkit_dir))


def _module_files(root: Path, modules) -> list[Path]:
    """The source files of transformers modules ``modules`` (dotted names): a module of a model package brings
    its whole package (as a model_type does in the key), any other module its own file."""
    files: set[Path] = set()
    for name in modules:
        parts = name.split(".")
        if parts[0] != "transformers" or len(parts) < 2:
            continue
        if parts[1] == "models" and len(parts) >= 3:
            files.update((root / "models" / parts[2]).glob("*.py"))
            continue
        f = root.joinpath(*parts[1:])
        f = f.with_name(f.name + ".py") if f.with_name(f.name + ".py").is_file() else f / "__init__.py"
        if f.is_file():
            files.add(f)
    return sorted(files)


def _depends(cfg: dict, modules) -> dict:
    """The ``depends`` record of an entry: the transformers sources among ``modules``' files that the key does not
    hash, by name, and their sha256."""
    root = _package_root("transformers")
    if root is None:
        return {"files": [], "sha256": _hash_files([])}
    covered = {_rel(top, f) for top, f in _key_files(cfg)}
    files = [(root, f) for f in _module_files(root, modules) if _rel(root, f) not in covered]
    return {"files": [_rel(root, f) for _, f in files], "sha256": _hash_files(files)}


def _depends_unchanged(record) -> bool:
    """Whether the files an entry's ``depends`` record names still hold the bytes it hashed (False: rebuild)."""
    if not (isinstance(record, dict) and isinstance(record.get("files"), list)
            and all(isinstance(n, str) for n in record["files"]) and isinstance(record.get("sha256"), str)):
        return False
    if not record["files"]:
        return record["sha256"] == _hash_files([])
    root = _package_root("transformers")
    if root is None:
        return False
    files = [(root, root.parent / n) for n in record["files"]]
    if not all(f.is_file() for _, f in files):
        return False
    return _hash_files(files) == record["sha256"]


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


def _to_json(plan: ModelPlan, depends: dict) -> dict:
    return {"format": PLAN_FORMAT, "architecture": plan.architecture, "targeted": list(plan.targeted),
            "saved": [[k, list(s)] for k, s in plan.saved.items()], "keep_fp32": list(plan.keep_fp32),
            "quantization_config": plan.quantization_config, "serving": plan.serving,
            "sources": list(plan.sources), "depends": depends}


def _from_json(d, config: dict) -> ModelPlan | None:
    """The plan an entry holds, or None if it is not a well-formed entry of this format."""
    from .targets import ModelPlan

    try:
        if d["format"] != PLAN_FORMAT:
            return None
        saved = {k: tuple(int(n) for n in s) for k, s in d["saved"]}
        plan = ModelPlan(config, d["architecture"], tuple(d["targeted"]), saved, tuple(d["keep_fp32"]),
                         d["quantization_config"], d["serving"], tuple(d["sources"]))
    except (KeyError, TypeError, ValueError):
        return None
    ok = (isinstance(plan.architecture, str)
          and all(isinstance(x, str) for x in plan.targeted + plan.keep_fp32 + plan.sources)
          and isinstance(plan.quantization_config, dict) and isinstance(plan.serving, dict)
          and {"config_groups", "format", "ignore", "quant_method"} <= set(plan.quantization_config)
          and {"max_position_embeddings", "multimodal", "head_dim_fix"} <= set(plan.serving))
    return plan if ok else None


def cached_plan(ckpt: Path, recipe, *, use_cache: bool = True,
                config: dict | None = None) -> tuple[ModelPlan, bool]:
    """``ckpt``'s plan for ``recipe`` and whether it came from the cache.

    ``use_cache=False`` plans afresh and stores nothing. ``config``: ``ckpt``'s config.json as
    pack.targets.load_config returned it, if the caller has it (else it is read here); either way the plan is
    built from that one dict, the one the key holds, and config.json is not read again. Raises
    pack.errors.QuantizeError for bad input (always from a fresh plan: only successes are stored)."""
    from .targets import load_config, plan_model

    cfg = load_config(ckpt) if config is None else config  # the cheap checks first, as plan_model does them
    if not use_cache or "configuration_files" in cfg:  # the latter: transformers may read another config file
        return plan_model(ckpt, recipe, cfg), False
    try:
        path = plan_cache_dir() / f"{plan_key(cfg, recipe)}.json"
    except (OSError, RuntimeError, ValueError):  # no home directory; a source file unreadable or its name not
        # UTF-8; a package in sys.modules without __spec__ (find_spec): plan without the cache
        return plan_model(ckpt, recipe, cfg), False
    entry = read_entry(path)  # None: absent, unreadable, not JSON, or another key's entry
    plan = None if entry is None else _from_json(entry, cfg)
    try:
        if plan is not None and _depends_unchanged(entry.get("depends")):
            mark_used(path)
            return plan, True
    except (OSError, ValueError):  # a listed file unreadable: plan afresh, as for a damaged entry
        pass
    plan = plan_model(ckpt, recipe, cfg)
    try:
        depends = _depends(cfg, plan.sources)
    except (OSError, RuntimeError, ValueError):  # as for the key: the plan stands, it is not stored
        return plan, False
    if store_entry(path, _to_json(plan, depends), CACHE_NAME):
        prune(path.parent, MAX_ENTRIES, CACHE_NAME)
    return plan, False
