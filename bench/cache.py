"""The bench cache: content-addressed directories under ``$PDQKIT_CACHE`` (default ``~/.cache/pdqkit``).

Every entry (corpus splits, tokenizers, token arrays, the test suite's trained micro model) is a directory
whose name carries the hash of everything it was made from, built in a hidden temp dir beside it and
renamed into place, so a crashed build never leaves a half entry and two processes building the same entry
at once both end up using the one that was renamed first.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from pack.cachedir import cache_root as pack_cache_root

__all__ = ["cache_root", "cached_dir", "sha256_text", "write_json_atomic"]


def cache_root() -> Path:
    """``$PDQKIT_CACHE`` if set, else ``~/.cache/pdqkit`` (created on demand); shared with pack.cachedir."""
    root = pack_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """The cache entry ``name``; if absent, ``build(tmp_dir)`` fills a temp dir that is then renamed to it.

    An entry counts as present once its ``.complete`` marker exists (written last, inside the temp dir)."""
    root = cache_root()
    out = root / name
    if (out / ".complete").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build(tmp)
        (tmp / ".complete").write_text("")
        if out.exists() and not (out / ".complete").is_file():  # leftover of an interrupted older layout
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / ".complete").is_file():  # not a lost race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Deterministic JSON (sorted keys, indent 2) written via a temp file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
