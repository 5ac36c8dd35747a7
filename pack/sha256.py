"""``python -m pack.sha256 [--chunk BYTES] [--fd N FILE]... [FILE...]``: print ``{file name: sha256 hex}`` of the
files as one JSON line.

The child process behind :class:`pack.checkpoint.FileHasher`. It hashes in a process of its own (standard
library only: starts in ~30 ms) rather than in a thread of ``pack.quantize``, because a thread shares the GIL
with the main thread, which spends the first ~2.3 s importing torch and transformers (pure Python): every
16 MiB block the hasher reads and hashes (both release the GIL) ends with a wait for the GIL, and each wait
makes the importing thread hand it over. Measured on the 2-core CPU machine (1.1 B-parameter bench input,
2.2 GB): next to a hashing thread the imports and planning ended at 2.45-2.55 s and the hash at ~1.95 s; next
to this process at 2.27-2.45 s, with the hash done well before.

``--fd N FILE``: hash the file open as descriptor ``N``, inherited from the parent (``subprocess``'s ``pass_fds``),
named ``FILE``: the parent reads the tensors through that same descriptor, so the hash is of the bytes it reads
even if ``FILE`` is replaced meanwhile (a rename onto it). Read through an open file of the child's own for the
same file (``/proc/self/fd/N``), so the parent's readers do not share its read-ahead, else through the descriptor
itself with ``pread`` (its offset, shared with the parent, is never moved).

Exit status 0 with the JSON line on stdout, or 1 with a one-line message on stderr.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

__all__ = ["CHUNK", "sha256_fd", "sha256_files", "main"]

CHUNK = 16 << 20  # bytes per read: 16 MiB


def sha256_fd(fd: int, buf: bytearray) -> str:
    """sha256 hex of everything the file open as ``fd`` holds, read into ``buf`` (reused: no fresh pages to
    fault in for every block): a regular file with ``pread`` from its start, anything else (a pipe) as it comes."""
    h, view, off = hashlib.sha256(), memoryview(buf), 0
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    while n := (os.preadv(fd, [buf], off) if regular else os.readv(fd, [buf])):
        h.update(view[:n])
        off += n
    return h.hexdigest()


def _own_open_file(fd: int) -> int | None:
    """A descriptor of this process's own open file for the regular file open as ``fd`` (``/proc/self/fd/N``:
    the same file even once its path names another), so that the parent's readers, which share ``fd``'s open
    file, do not share its read-ahead state; None where that cannot be had (no /proc, not a regular file)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    except OSError:
        return None


def sha256_files(files: list[Path | tuple[int, Path]], chunk: int = CHUNK) -> dict[str, str]:
    """``{file name: sha256 hex}`` of ``files``: paths, or ``(fd, path)`` for a file already open as ``fd``;
    ``chunk`` bytes per read (at least 1: a 0-byte buffer reads nothing and would give every file the hash of no
    bytes). An OSError names the file's path."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk {chunk!r}: must be a positive number of bytes")
    buf = bytearray(chunk)
    out = {}
    for f in files:
        fd, f = f if isinstance(f, tuple) else (None, f)
        try:
            own = os.open(f, os.O_RDONLY) if fd is None else _own_open_file(fd)
            try:
                out[Path(f).name] = sha256_fd(fd if own is None else own, buf)
            finally:
                if own is not None:
                    os.close(own)
        except OSError as e:
            e.filename = str(f)   # the file, not a descriptor or None
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    chunk = CHUNK
    if args[:1] == ["--chunk"]:
        chunk, args = int(args[1]), args[2:]
    files: list[Path | tuple[int, Path]] = []
    while args[:1] == ["--fd"]:
        files.append((int(args[1]), Path(args[2])))
        args = args[3:]
    files += [Path(a) for a in args]
    try:
        hashes = sha256_files(files, chunk)
    except OSError as e:
        print(f"{e.filename}: cannot read it ({e.strerror})", file=sys.stderr)
        return 1
    print(json.dumps(hashes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
