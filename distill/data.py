"""Training tokens: read local text, pack into fixed windows, hand each rank its deterministic share.

Sources: ``None`` -> the evaluation bed's train split (:func:`bench.corpus.token_stream`, ``<bos> doc <eos>``
per document, cached per tokenizer); a ``.jsonl`` or ``.json`` file (any case) with one ``{"text": ...}``
(tokenized the same way) or ``{"input_ids": [...]}`` (used verbatim) per line; any other file is one UTF-8 text
document. Compressed files are refused (decompress them first).

Order: the stream is cut into non-overlapping ``seq_len`` windows (packing across documents, no padding).
Global row ``g`` of the run (step ``s`` holds rows ``s*B .. s*B+B-1``) is window ``perm_e[g mod n]`` with
``e = g div n`` and ``perm_e = randperm(n, Generator(seed + e))``; rank ``r`` of ``W`` takes the rows
``r*B/W .. (r+1)*B/W - 1`` of each step. A batch is thus a pure function of (seed, step, rank, world): a
resumed run continues on exactly the rows an uninterrupted one would see, and ``W`` ranks together see the
same global batch as one process.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["TokenBlocks", "load_tokenizer", "pair_tokenizer", "load_blocks"]


@dataclass
class TokenBlocks:
    """``blocks`` [n, seq_len] int64 windows plus where they came from (for lineage)."""

    blocks: torch.Tensor
    source: str
    sha256: str
    tokenizer_sha256: str | None
    selection: dict | None = None  # the sidecar of a python -m distill.select file (distill.select.read_meta)

    @property
    def tokens(self) -> int:
        return self.blocks.numel()

    def batch(self, step: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0) -> torch.Tensor:
        """Rank ``rank``'s rows of step ``step``: int64 [global_batch // world, seq_len]."""
        if global_batch % world:
            raise ValueError(f"--batch {global_batch} is not divisible by the {world} ranks")
        local = global_batch // world
        n = self.blocks.shape[0]
        rows = []
        for g in range(step * global_batch + rank * local, step * global_batch + (rank + 1) * local):
            epoch, i = divmod(g, n)
            rows.append(int(_perm(n, seed + epoch)[i]))
        return self.blocks[rows]


_PERM_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def _perm(n: int, seed: int) -> torch.Tensor:
    key = (n, seed)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _PERM_CACHE[key]


def load_tokenizer(*ckpts):
    """The tokenizer saved with the first checkpoint dir of ``ckpts`` that has one (None if none has)."""
    from transformers import AutoTokenizer

    for d in ckpts:
        d = Path(d)
        if any(d.glob("tokenizer*")):
            return AutoTokenizer.from_pretrained(d)
    return None


def pair_tokenizer(student, teacher):
    """The tokenizer the data is encoded with (the student's, else the teacher's: :func:`load_tokenizer`), after
    checking that a teacher and a student that both carry one carry the same (sha256 of the serialised backend):
    distillation compares the two models' logits id by id, so both must read the text as the same ids."""
    s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
    s_sha, t_sha = _tokenizer_sha256(s_tok), _tokenizer_sha256(t_tok)
    if s_sha is not None and t_sha is not None and s_sha != t_sha:
        raise ValueError(f"{student}: its tokenizer differs from the teacher's ({teacher}); distillation compares "
                         "logits id by id, so both models must use one tokenizer (if they do, copy the teacher's "
                         "tokenizer files into the student checkpoint)")
    return s_tok if s_tok is not None else t_tok


def _tokenizer_sha256(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def _encode(texts: list[str], tokenizer) -> list[int]:
    ids = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(([bos] if bos is not None else []) + list(enc) + ([eos] if eos is not None else []))
    return ids


JSONL_SUFFIXES = (".jsonl", ".json")   # (any case) JSON lines; any other file is plain text


def _read_file(path: Path, tokenizer, max_tokens: int | None) -> np.ndarray:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b" or magic == b"(\xb5/\xfd" or magic[:3] == b"BZh" or magic == b"PK\x03\x04":
        raise ValueError(f"{path}: a compressed file (gzip, zstd, bzip2 or zip); decompress it and pass the "
                         f"JSON-lines or text file")
    try:
        ids = _read_ids(path, tokenizer, max_tokens)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    try:
        return np.asarray(ids, dtype=np.int64)
    except OverflowError:
        raise ValueError(f"{path}: a token id does not fit in 64 bits; wrong file?") from None


def _read_ids(path: Path, tokenizer, max_tokens: int | None) -> list[int]:
    max_tokens = sys.maxsize if max_tokens is None else max_tokens
    out: list[int] = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        pending: list[str] = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e}); expected one object per line") from None
                if isinstance(rec, dict) and isinstance(rec.get("input_ids"), list):
                    ids = rec["input_ids"]
                    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                        raise ValueError(f"{path}:{lineno}: input_ids must be a list of integers")
                    if pending:  # keep file order: text lines before this one are encoded first
                        out.extend(_encode(pending, tokenizer))
                        pending = []
                    out.extend(ids)
                elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    if tokenizer is None:
                        raise ValueError(f"{path}: text lines need a tokenizer, and neither checkpoint has one; "
                                         "save the tokenizer with the teacher or student, or give input_ids")
                    pending.append(rec["text"])
                    if len(pending) >= 64:
                        out.extend(_encode(pending, tokenizer))
                        pending = []
                else:
                    raise ValueError(f"{path}:{lineno}: expected an object with a 'text' string or an "
                                     "'input_ids' list")
                if len(out) >= max_tokens:
                    break
        if pending and len(out) < max_tokens:
            out.extend(_encode(pending, tokenizer))
    else:
        if tokenizer is None:
            raise ValueError(f"{path}: text needs a tokenizer, and neither checkpoint has one")
        out = _encode([path.read_text(encoding="utf-8")], tokenizer)
    return out[:max_tokens]


def load_blocks(data: str | None, tokenizer, seq_len: int, max_tokens: int | None,
                vocab_size: int) -> TokenBlocks:
    """The first ``max_tokens`` tokens of ``data`` (all if None; see module docstring) as ``seq_len`` windows."""
    tok_sha = _tokenizer_sha256(tokenizer)
    if data is None:
        from bench import corpus

        if tokenizer is None:
            raise ValueError("the default data (bench train split) needs a tokenizer, and neither checkpoint has "
                             "one; save it with the checkpoint or pass --data with input_ids")
        stream = np.asarray(corpus.token_stream("train", tokenizer, max_tokens), dtype=np.int64)
        source, sha = "bench.corpus:train", corpus.corpus_sha256()
    else:
        path = Path(data)
        if path.is_dir():
            raise ValueError(f"--data {data}: is a folder; pass one JSON-lines or text file")
        if not path.is_file():
            raise FileNotFoundError(f"--data {data}: no such file")
        from pack.checkpoint import sha256_file

        stream = _read_file(path, tokenizer, max_tokens)
        source, sha = str(path.resolve()), sha256_file(path)   # (as typed, it would change with the working dir)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{source}: {len(stream)} tokens, fewer than one window of --seq-len {seq_len}")
    blocks = torch.from_numpy(stream[: n * seq_len]).view(n, seq_len)
    lo, hi = int(blocks.min()), int(blocks.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{source}: token id {hi if hi >= vocab_size else lo} outside the models' vocabulary "
                         f"[0, {vocab_size}); wrong tokenizer for these checkpoints?")
    return TokenBlocks(blocks, source, sha, tok_sha)
