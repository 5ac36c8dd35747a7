"""pdqkit's on-disk caches: where they live, and how an entry is written, read, marked used and pruned.

Two caches use this module (standard library only, so ``python -m pack.quantize`` can consult them before it
imports torch): the plan cache (:mod:`pack.plancache`, ``$PDQKIT_PLAN_CACHE``) and the input-hash cache
(:mod:`pack.hashcache`, ``$PDQKIT_HASH_CACHE``), each a folder under ``$PDQKIT_CACHE`` (default
``~/.cache/pdqkit``) unless its own variable points elsewhere.

An entry is one JSON object in a file named ``<64 hex digits>.json`` (its key), which it names again in its
``"key"`` field: a reader ignores an entry whose field and name differ. It is written to a temp file beside it
(``.<key>.<random>.tmp``) and renamed, so a reader sees a whole entry or none. A run that uses an entry marks it
used (its mtime); a run that stores entries then prunes the folder: it keeps the ``max_entries`` most recently
used of its own cache's entries and deletes the rest, and deletes temp files older than :data:`STALE_TMP_S` (left
by a writer killed mid-write; a younger one may be another run's write in progress). Each entry names its cache
(``"cache"``), so both variables may point at one folder: a cache's pruning counts and deletes only its own entries
(and those that name no cache: damaged, or written before entries named theirs), never the other cache's. Nothing
touches a file whose name is not an entry's or a temp file's, so a cache variable pointed at a folder that holds
other files loses none of them. Every operation is best effort: a cache that cannot be located, read or written
only costs the speed-up.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from contextlib import suppress
from pathlib import Path

__all__ = ["STALE_TMP_S", "cache_root", "cache_dir", "read_entry", "mark_used", "store_entry", "prune"]

STALE_TMP_S = 3600  # a temp file this old (seconds) belongs to no live writer
_ENTRY = re.compile(r"[0-9a-f]{64}\.json")
_TEMP = re.compile(r"\.[0-9a-f]{64}\..+\.tmp", re.DOTALL)


def cache_root() -> Path:
    """``$PDQKIT_CACHE`` if set, else ``~/.cache/pdqkit`` (not created here). Raises RuntimeError when neither is
    set and the home directory cannot be determined."""
    return Path(os.environ.get("PDQKIT_CACHE") or Path.home() / ".cache" / "pdqkit")


def cache_dir(env_var: str, name: str) -> Path:
    """``$<env_var>`` if set, else ``cache_root() / name``."""
    return Path(os.environ.get(env_var) or cache_root() / name)


def read_entry(path: Path) -> dict | None:
    """The value of entry ``path`` (a JSON object); None if it is absent, unreadable, not JSON, or does not name
    ``path``'s key as its own (an entry copied or renamed to another key's name, or one written before entries
    named their key, is not trusted for that key)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != path.stem:
        return None
    return entry


def mark_used(path: Path) -> None:
    """Mark entry ``path`` used now (its mtime): the last to be pruned. A read-only shared cache still serves."""
    with suppress(OSError):
        os.utime(path)


def store_entry(path: Path, value: dict, cache: str) -> bool:
    """Write entry ``path`` (``<key>.json``) atomically: the object ``value`` with ``"key"`` set to the key, which
    :func:`read_entry` checks, and ``"cache"`` to ``cache`` (the cache's name, which :func:`prune` checks);
    whether it was written. A folder that cannot be written, or a value JSON cannot hold, is skipped. The caller
    prunes the folder (:func:`prune`) once it has stored its entries."""
    try:
        value = {**value, "key": path.stem, "cache": cache}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the entry from other users of a shared cache
            with os.fdopen(fd, "w") as fh:
                json.dump(value, fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except (OSError, TypeError, ValueError):  # cannot write, or a value JSON cannot hold: no entry, same run
        return False
    return True


def _names_other_cache(path: Path, name: str) -> bool:
    """Whether entry ``path`` names a cache other than ``name`` (one that names none, or cannot be read, does not)."""
    try:
        entry = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(entry, dict) and isinstance(entry.get("cache"), str) and entry["cache"] != name


def prune(cache: Path, max_entries: int, name: str) -> None:
    """Keep the ``max_entries`` most recently used of the entries in folder ``cache`` that belong to the cache
    called ``name`` (those naming another cache are neither counted nor deleted); delete temp files older than
    :data:`STALE_TMP_S`. Best effort: another run may be pruning too, or the cache may be read-only. The entries
    are read only when the folder holds more than ``max_entries`` of them."""
    try:
        names = list(cache.iterdir())
    except OSError:
        return
    now, entries = time.time(), []
    for f in names:
        with suppress(OSError):  # gone meanwhile (another run pruned it), or not ours to delete
            if _TEMP.fullmatch(f.name):
                if now - f.stat().st_mtime > STALE_TMP_S:
                    f.unlink()
            elif _ENTRY.fullmatch(f.name):
                entries.append((f.stat().st_mtime_ns, f.name, f))
    if len(entries) > max_entries:  # over the limit counting every entry: count this cache's alone
        entries = [e for e in entries if not _names_other_cache(e[2], name)]
    entries.sort(reverse=True)  # most recently used first; the name breaks ties, so every run agrees
    for *_, f in entries[max_entries:]:
        with suppress(OSError):
            f.unlink()
