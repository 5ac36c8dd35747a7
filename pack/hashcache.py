"""The input-hash cache: the sha256 of a checkpoint's files kept across runs, under what ``stat`` says of them.

Every ``pack.quantize`` run records the sha256 of each input safetensors file in its lineage. Hashing is the
largest CPU cost of a repeat run on the same checkpoint (2.24 GB at ~2.2 GB/s per core on the 2-core CPU machine:
~1 CPU-s of a ~4 CPU-s run; ~7 s for E4B's 16 GB). So a run stores each file's hash under a key of the file's
identity and state, and a later run finds it there instead of reading the file again, the rule git's index uses
to call a file unchanged.

The key (sha256 of a JSON document) covers the file's real path (symlinks resolved, as the Hugging Face hub cache
links its snapshots to blobs), its device and inode, its size, and its modification and status-change times in
nanoseconds. On a local POSIX filesystem, writing a file sets its mtime and ctime to the current time, replacing
it (a rename onto it) gives another inode, and no call sets a ctime: as long as the system clock is not set back,
a file with the same key holds the bytes that were hashed. The state is taken from a freshly opened file
(``fstat``), so an NFS client revalidates it with the server (close-to-open) rather than answering from its
attribute cache. Not covered: filesystems that fake or do not keep ctime (FAT, some FUSE and network
filesystems), and writes through a shared ``mmap`` whose timestamps the kernel has not updated yet; for such
inputs pass ``--no-hash-cache``. Two guards keep a file that was still being written out of the cache:

* a hash is stored only if the file's ctime lay at least :data:`SETTLE_NS` before the run looked at it (a file
  written within a timestamp tick of the lookup could change again without its times changing);
* and only if the file's state after hashing equals the one before.

A file that fails either guard is hashed again on the next run. ``--no-hash-cache`` (``use_cache=False``) reads
and stores nothing: every file is hashed.

Where it lives: ``$PDQKIT_HASH_CACHE`` if set, else ``$PDQKIT_CACHE/hashes`` (``~/.cache/pdqkit/hashes``).
Whoever can write there can supply the input hashes of later runs' lineages: share the folder only among users
who trust each other. Entries (~0.2 KB, one per file) are written, read and pruned by :mod:`pack.cachedir`: the
:data:`MAX_ENTRIES` most recently used are kept. An entry that cannot be read, or is not a well-formed entry of
this format and the file's path and size, or names another key than its file's (an entry copied over another's
name), is ignored. Standard library only: the CLI consults the cache before it imports
torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cachedir import cache_dir, mark_used, prune, read_entry, store_entry

__all__ = ["HASH_FORMAT", "MAX_ENTRIES", "SETTLE_NS", "FileState", "hash_cache_dir", "fd_state", "file_state",
           "open_files", "lookup", "store"]

HASH_FORMAT = 2  # bump when the key's fields or an entry's layout change (2: entries name their key)
CACHE_NAME = "hashes"  # what its entries name as their cache (pack.cachedir: a folder may hold both caches)
MAX_ENTRIES = 4096  # entries kept (least recently used go first): ~1 MB; one per input file
SETTLE_NS = 2_000_000_000  # a file changed less than this before the lookup may still be being written
_HEX = re.compile(r"[0-9a-f]{64}")


def hash_cache_dir() -> Path:
    """Where input hashes are kept: ``$PDQKIT_HASH_CACHE`` if set, else ``$PDQKIT_CACHE/hashes``."""
    return cache_dir("PDQKIT_HASH_CACHE", CACHE_NAME)


@dataclass(frozen=True)
class FileState:
    """What ``stat`` says of a file (symlinks followed), and when it was asked (``seen_ns``, not in the key)."""

    path: str  # the real path
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    seen_ns: int

    def identity(self) -> tuple:
        """Everything but ``seen_ns``: equal for the same file in the same state."""
        return self.path, self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns

    def key(self) -> str:
        doc = {"format": HASH_FORMAT, **asdict(self)}
        del doc["seen_ns"]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def same_file(self, other: FileState) -> bool:
        return self.identity() == other.identity()

    def settled(self) -> bool:
        return self.seen_ns - self.ctime_ns >= SETTLE_NS


def fd_state(f: Path, fd: int, seen_ns: int | None = None) -> FileState:
    """The :class:`FileState` of file ``f`` open as ``fd`` (``fstat``: the file that descriptor reads, whatever
    the path names by now); ``seen_ns``: when it was looked at (default: now)."""
    seen = time.time_ns() if seen_ns is None else seen_ns
    st = os.fstat(fd)
    return FileState(os.path.realpath(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, seen)


def file_state(f: Path) -> FileState:
    """The :class:`FileState` of ``f`` now, from the file opened for reading (``fstat``: on NFS, revalidated
    with the server on open). Raises OSError if it cannot be opened."""
    seen = time.time_ns()
    fd = os.open(f, os.O_RDONLY)
    try:
        return fd_state(f, fd, seen)
    finally:
        os.close(fd)


def open_files(files: list[Path]) -> tuple[dict[Path, int], dict[Path, FileState]]:
    """Open the ``files`` for reading and keep them open: ``({file: fd}, {file: FileState})`` of those that can
    be opened (the others are left out, not raised; whoever reads them reports it). Every later read through
    these descriptors is of the file in that state, even once the path names another file (a rename onto it).
    The caller closes the descriptors."""
    fds, found = {}, {}
    try:
        for f in files:
            seen = time.time_ns()
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            fds[f] = fd
            try:
                found[f] = fd_state(f, fd, seen)
            except OSError:   # (fstat of an open file hardly fails; the file is then read and reported as any other)
                pass
    except BaseException:   # (a stop signal half-way: close what was opened)
        for fd in fds.values():
            os.close(fd)
        raise
    return fds, found


def lookup(found: dict[Path, FileState]) -> dict[Path, str]:
    """``{file: sha256 hex}`` of the files in ``found`` (their states, e.g. from :func:`open_files`) that the
    cache knows; the states go to :func:`store` once the others are hashed. Never raises: a cache that cannot be
    located or read simply knows nothing."""
    known = {}
    try:
        cache = hash_cache_dir()
    except RuntimeError:  # no $PDQKIT_CACHE and no home directory
        return known
    for f, state in found.items():
        path = cache / f"{state.key()}.json"
        entry = read_entry(path)
        if (isinstance(entry, dict) and entry.get("format") == HASH_FORMAT and entry.get("size") == state.size
                and entry.get("path") == state.path
                and isinstance(entry.get("sha256"), str) and _HEX.fullmatch(entry["sha256"])):
            known[f] = entry["sha256"]
            mark_used(path)
    return known


def store(seen: dict[Path, FileState], hashes: dict[Path, str]) -> int:
    """Store the ``hashes`` just computed for files whose states :func:`lookup` took (``seen``): those that had
    settled before it and are unchanged since. Returns how many were stored; best effort, never raises."""
    try:
        cache = hash_cache_dir()
    except RuntimeError:
        return 0
    stored = 0
    for f, digest in hashes.items():
        before = seen.get(f)
        if before is None or not before.settled() or not _HEX.fullmatch(digest):
            continue
        try:
            unchanged = file_state(f).same_file(before)
        except OSError:
            continue
        if unchanged:
            stored += store_entry(cache / f"{before.key()}.json",
                                  {"format": HASH_FORMAT, "path": before.path, "size": before.size, "sha256": digest},
                                  CACHE_NAME)
    if stored:
        prune(cache, MAX_ENTRIES, CACHE_NAME)  # once, however many files were stored
    return stored
