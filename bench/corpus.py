"""The bench text corpus: built at run time, identical on every machine, nothing downloaded or shipped.

Source — the Python sources of the installed **transformers 5.17.0** wheel (``transformers/**/*.py``).
Why not the Python standard library: the CPU machines run Python 3.11 and the GPU machine Python 3.12, whose
stdlib sources differ. transformers is pinned to 5.17.0 on both (constraints.txt; the GPU image has it), and
a wheel's files are the same bytes whatever the interpreter, so the corpus is too. Every file read is checked
against the sha256 that the wheel's ``RECORD`` lists, and the whole corpus against :data:`PINNED_SHA256`;
any difference (another transformers version, an edited install) fails loudly with :class:`CorpusError`.

Selection (fixed, in code): every ``transformers/**/*.py`` file listed in ``RECORD`` whose text has at least
:data:`MIN_DOC_CHARS` characters, except ``modular_*.py`` (the sources ``modeling_*.py`` is generated from:
near-copies). One file = one document, its text verbatim. 2,387 documents, 41.6 MB, English docstrings
and comments plus Python code.

Splits, by *group* so that near-duplicates of one model family stay on one side: a file under
``transformers/models/<name>/`` belongs to group ``models/<name>``, any other file is a group of its own.
Groups are ordered by ``sha256(SALT + "\\0" + group)``; whole groups go to ``valid`` until it holds at least
:data:`VALID_BYTES`, the next to ``calib`` until it holds at least :data:`CALIB_BYTES`, the rest is ``train``.
Documents keep path order inside a split. (Held-out caveat: transformers copies code between model families, so validation text has near-copies in
train; the bench compares models against each other on the same tokens, which this does not bias.)

Files in the cache entry ``corpus-<sha16>/``: ``train.jsonl``, ``valid.jsonl``, ``calib.jsonl`` (one
``{"text": ...}`` per line) and ``manifest.json`` (per document: split, path, sha256; per split: bytes,
documents, jsonl sha256). ``python -m bench.corpus --export DIR`` copies them; ``--info`` prints the sizes
(also in tokens of the micro/small tokenizers).

Token streams: a split is tokenized document by document as ``<bos> text <eos>`` and concatenated
(:func:`token_stream`, cached per tokenizer); :func:`packed_sequences` / :func:`token_batches` cut it into
fixed-length windows (packing across document boundaries, no padding).
"""
from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from bench.cache import cache_root, cached_dir

SOURCE = "transformers"
SOURCE_VERSION = "5.17.0"
SALT = "pdqkit-bench-corpus/1"
MIN_DOC_CHARS = 200
VALID_BYTES = 1_000_000
CALIB_BYTES = 1_000_000
SPLITS = ("train", "valid", "calib")
# sha256 of the manifest (split, path, file sha256 of every document, in order) for transformers 5.17.0.
PINNED_SHA256 = "ce08901d5d3a731878a23a5392efe1b34daed01e56fe947ceeb4843b6f97fc41"
UNPINNED_ENV = "PDQKIT_CORPUS_UNPINNED"

__all__ = [
    "CorpusError", "corpus_dir", "corpus_sha256", "split_path", "load_texts", "manifest", "token_stream",
    "packed_sequences", "token_batches", "export", "SPLITS",
]


class CorpusError(RuntimeError):
    """The corpus source differs from the pinned one (or its cache entry is corrupt)."""


def _group(path: str) -> str:
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "models":  # transformers/models/<name>/<file>.py
        return "models/" + parts[2]
    return path


def _record_sha256(f) -> str | None:
    if f.hash is None or f.hash.mode != "sha256":
        return None
    v = f.hash.value
    return base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)).hex()


def source_documents() -> list[tuple[str, str, str]]:
    """``[(path, sha256, text)]`` of the selected source files, sorted by path, each verified against the
    wheel's RECORD. Raises :class:`CorpusError` for another transformers version (unless
    ``$PDQKIT_CORPUS_UNPINNED=1``) or a file that does not match RECORD."""
    try:
        dist = md.distribution(SOURCE)
    except md.PackageNotFoundError:
        raise CorpusError(f"bench corpus: {SOURCE} is not installed; pip install {SOURCE}=={SOURCE_VERSION}") \
            from None
    if dist.version != SOURCE_VERSION and os.environ.get(UNPINNED_ENV) != "1":
        raise CorpusError(
            f"bench corpus: {SOURCE} {dist.version} is installed but the corpus is pinned to {SOURCE_VERSION}; "
            f"pip install -c constraints.txt {SOURCE}=={SOURCE_VERSION} (or set {UNPINNED_ENV}=1 to build an "
            f"unpinned corpus whose numbers are not comparable)")
    docs = []
    for f in sorted(dist.files or [], key=lambda p: p.as_posix()):
        path = f.as_posix()
        if not (path.startswith(SOURCE + "/") and path.endswith(".py")) or path.rsplit("/", 1)[-1].startswith(
                "modular_"):
            continue
        data = Path(dist.locate_file(f)).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        want = _record_sha256(f)
        if want is not None and want != sha:
            raise CorpusError(f"bench corpus: {dist.locate_file(f)} differs from its wheel RECORD hash (edited "
                              f"install?); reinstall: pip install --force-reinstall {SOURCE}=={dist.version}")
        text = data.decode("utf-8")
        if len(text) >= MIN_DOC_CHARS:
            docs.append((path, sha, text))
    if not docs:
        raise CorpusError(f"bench corpus: no {SOURCE} sources found under {dist.locate_file('')}")
    return docs


def _assign_splits(docs) -> dict[str, str]:
    """path -> split (see module docstring)."""
    sizes: dict[str, int] = {}
    for path, _, text in docs:
        g = _group(path)
        sizes[g] = sizes.get(g, 0) + len(text.encode("utf-8"))
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{SALT}\0{g}".encode()).hexdigest())
    group_split, filled = {}, {"valid": 0, "calib": 0}
    for g in order:
        split = "train"
        for name, cap in (("valid", VALID_BYTES), ("calib", CALIB_BYTES)):
            if filled[name] < cap:
                split = name
                filled[name] += sizes[g]
                break
        group_split[g] = split
    return {path: group_split[_group(path)] for path, _, _ in docs}


def _manifest_sha256(entries) -> str:
    h = hashlib.sha256(f"{SALT}\n".encode())
    for e in entries:
        h.update(f"{e['split']}\t{e['path']}\t{e['sha256']}\n".encode())
    return h.hexdigest()


def _build(tmp: Path, docs, split_of, sha: str) -> None:
    entries = [{"split": split_of[p], "path": p, "sha256": s} for p, s, _ in docs]
    splits = {}
    for name in SPLITS:
        f = tmp / f"{name}.jsonl"
        h, nbytes, ndocs = hashlib.sha256(), 0, 0
        with open(f, "w", encoding="utf-8", newline="\n") as fh:
            for path, _, text in docs:
                if split_of[path] != name:
                    continue
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                fh.write(line)
                h.update(line.encode("utf-8"))
                nbytes += len(text.encode("utf-8"))
                ndocs += 1
        splits[name] = {"documents": ndocs, "text_bytes": nbytes, "jsonl_sha256": h.hexdigest()}
    # the version the documents came from (SOURCE_VERSION unless built with $PDQKIT_CORPUS_UNPINNED=1)
    meta = {"schema": "pdqkit_bench_corpus/1", "source": f"{SOURCE}=={md.version(SOURCE)}", "salt": SALT,
            "corpus_sha256": sha, "min_doc_chars": MIN_DOC_CHARS, "valid_bytes": VALID_BYTES,
            "calib_bytes": CALIB_BYTES, "splits": splits, "documents": entries}
    (tmp / "manifest.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _expected_sha() -> str | None:
    return None if os.environ.get(UNPINNED_ENV) == "1" else PINNED_SHA256


@functools.lru_cache(maxsize=None)
def corpus_dir() -> Path:
    """Build (once, cached) and verify the corpus; the cache entry's path."""
    want = _expected_sha()
    if want is not None:
        d = cache_root() / f"corpus-{want[:16]}"
        if (d / ".complete").is_file():
            _verify(d, want)
            return d
    docs = source_documents()
    split_of = _assign_splits(docs)
    sha = _manifest_sha256([{"split": split_of[p], "path": p, "sha256": s} for p, s, _ in docs])
    if want is not None and sha != want:
        raise CorpusError(
            f"bench corpus: built corpus sha256 {sha[:16]}… differs from the pinned {want[:16]}… although "
            f"{SOURCE}=={SOURCE_VERSION} is installed: bench/corpus.py's selection changed or the install is not "
            f"the {SOURCE_VERSION} wheel; restore it, or if the change is intended update PINNED_SHA256 (every "
            f"bench number changes with it)")
    d = cached_dir(f"corpus-{sha[:16]}", lambda tmp: _build(tmp, docs, split_of, sha))
    _verify(d, sha)
    return d


def _verify(d: Path, sha: str) -> None:
    try:
        meta = json.loads((d / "manifest.json").read_text())
        ok = meta["corpus_sha256"] == sha and all(
            hashlib.sha256((d / f"{n}.jsonl").read_bytes()).hexdigest() == meta["splits"][n]["jsonl_sha256"]
            for n in SPLITS)
    except (OSError, ValueError, KeyError):
        ok = False
    if not ok:
        raise CorpusError(f"bench corpus: cache entry {d} is corrupt; delete it (rm -r {d}) and rerun")


def corpus_sha256() -> str:
    """The corpus hash (recorded in every lineage step that uses bench data)."""
    return manifest()["corpus_sha256"]


def manifest() -> dict:
    return json.loads((corpus_dir() / "manifest.json").read_text())


def split_path(name: str) -> Path:
    """Path of split ``name`` (train/valid/calib) as jsonl, one ``{"text": ...}`` per line; built on demand."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
    return corpus_dir() / f"{name}.jsonl"


def load_texts(name: str) -> list[str]:
    """The documents of split ``name``, in corpus order."""
    with open(split_path(name), encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def tokenizer_sha256(tokenizer) -> str:
    """Hash of a fast tokenizer's full definition (its ``tokenizer.json`` text)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def _encode_stream(texts, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("bench corpus: the tokenizer needs bos and eos tokens to build a token stream")
    out, n = [], 0
    for i in range(0, len(texts), 16):
        for enc in backend.encode_batch(texts[i:i + 16], add_special_tokens=False):
            out.append(np.asarray([bos, *enc.ids, eos], dtype=np.int32))
            n += len(out[-1])
        if max_tokens is not None and n >= max_tokens:
            break
    s = np.concatenate(out) if out else np.zeros(0, dtype=np.int32)
    return s if max_tokens is None else s[:max_tokens]


STREAM_FORMAT = "bde1"  # <bos> doc <eos> per document, int32: part of the cache key, bump it when _encode_stream changes


def token_stream(name: str, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Split ``name`` as one int32 token stream ``<bos> doc <eos> <bos> doc <eos> ...`` (documents in corpus
    order). The whole split is cached per tokenizer; ``max_tokens`` returns the stream's first tokens,
    encoding only the documents needed when the whole split is not cached yet (fast tests)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
    key = f"tokens-{STREAM_FORMAT}-{corpus_sha256()[:12]}-{tokenizer_sha256(tokenizer)[:12]}-{name}"
    f = cache_root() / key / "tokens.npy"
    if max_tokens is not None and not f.is_file():
        return _encode_stream(load_texts(name), tokenizer, max_tokens)
    d = cached_dir(key, lambda tmp: np.save(tmp / "tokens.npy", _encode_stream(load_texts(name), tokenizer)))
    s = np.load(d / "tokens.npy")
    return s if max_tokens is None else s[:max_tokens]


def packed_sequences(name: str, tokenizer, seq_len: int, max_tokens: int | None = None):
    """Split ``name`` cut into non-overlapping windows: int64 tensor ``[N, seq_len]``, N = the whole windows
    (at most ``max_tokens // seq_len`` of them when given), in corpus order."""
    import torch

    if max_tokens is not None:
        max_tokens = max(seq_len, max_tokens // seq_len * seq_len)
    stream = token_stream(name, tokenizer, max_tokens)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"bench corpus: split {name} has {len(stream)} tokens, fewer than seq_len={seq_len}")
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)


def token_batches(name: str, tokenizer, seq_len: int, batch_size: int, *, seed: int | None = 0,
                  steps: int | None = None, max_tokens: int | None = None) -> Iterator:
    """Batches ``[batch_size, seq_len]`` (int64) of packed windows of split ``name`` (of its first
    ``max_tokens`` tokens when given).

    ``seed`` None: corpus order, one pass (last partial batch kept). Else: shuffled by
    ``torch.Generator(seed)``, a fresh permutation per epoch, ``steps`` batches (endless if None)."""
    import torch

    seqs = packed_sequences(name, tokenizer, seq_len, max_tokens)
    if seed is None:
        for i in range(0, len(seqs), batch_size):
            if steps is not None and i // batch_size >= steps:
                return
            yield seqs[i:i + batch_size]
        return
    g = torch.Generator().manual_seed(seed)
    perm, pos, step = torch.randperm(len(seqs), generator=g), 0, 0
    while steps is None or step < steps:
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(seqs), generator=g), 0
        yield seqs[perm[pos:pos + batch_size]]
        pos += batch_size
        step += 1


def export(out: str | os.PathLike) -> Path:
    """Copy train/valid/calib.jsonl and manifest.json into directory ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for n in (*SPLITS, "manifest"):
        src = corpus_dir() / (f"{n}.jsonl" if n != "manifest" else "manifest.json")
        tmp = out / f".{src.name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out / src.name)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--export", metavar="DIR", help="write train.jsonl/valid.jsonl/calib.jsonl/manifest.json")
    ap.add_argument("--info", action="store_true", help="print split sizes (documents, bytes, tokens)")
    args = ap.parse_args(argv)
    try:
        d = corpus_dir()
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"corpus {corpus_sha256()[:16]} ({manifest()['source']}) at {d}")
    if args.export:
        print(f"exported to {export(args.export)}")
    if args.info:
        from bench.tokenizer import TOKENIZER_SCALES, get_tokenizer

        meta = manifest()
        toks = {s: get_tokenizer(s) for s in TOKENIZER_SCALES}
        print(f"{'split':6} {'docs':>6} {'MB':>7} " + " ".join(f"{'tok@' + s:>12}" for s in toks))
        for n in SPLITS:
            sp = meta["splits"][n]
            print(f"{n:6} {sp['documents']:6d} {sp['text_bytes'] / 1e6:7.2f} "
                  + " ".join(f"{len(token_stream(n, t)):12d}" for t in toks.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
