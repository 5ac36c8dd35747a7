"""``python -m pack.sha256 [--chunk BYTES] FILE...``: print ``{file name: sha256 hex}`` of the files as one JSON line.

The child process behind :class:`pack.checkpoint.FileHasher`. It hashes in a process of its own (standard
library only: starts in ~30 ms) rather than in a thread of ``pack.quantize``, because a thread shares the GIL
with the main thread, which spends the first ~2.3 s importing torch and transformers (pure Python): every
16 MiB block the hasher reads and hashes (both release the GIL) ends with a wait for the GIL, and each wait
makes the importing thread hand it over. Measured on the 2-core CPU machine (1.1 B-parameter bench input,
2.2 GB): next to a hashing thread the imports and planning ended at 2.45-2.55 s and the hash at ~1.95 s; next
to this process at 2.27-2.45 s, with the hash done well before.

Exit status 0 with the JSON line on stdout, or 1 with a one-line message on stderr.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

__all__ = ["CHUNK", "sha256_files", "main"]

CHUNK = 16 << 20  # bytes per read: 16 MiB


def sha256_files(files: list[Path], chunk: int = CHUNK) -> dict[str, str]:
    """``{file name: sha256 hex}`` of ``files``, read ``chunk`` bytes at a time into one reused buffer (no fresh
    pages to fault in for every block)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
        out[Path(f).name] = h.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    chunk = CHUNK
    if args[:1] == ["--chunk"]:
        chunk, args = int(args[1]), args[2:]
    try:
        hashes = sha256_files([Path(a) for a in args], chunk)
    except OSError as e:
        print(f"{e.filename}: cannot read it ({e.strerror})", file=sys.stderr)
        return 1
    print(json.dumps(hashes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
