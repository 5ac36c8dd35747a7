"""Calibration data: a local text file tokenized with the checkpoint's tokenizer into fixed-length windows.

File formats: ``*.jsonl`` or ``*.json``, any case (one JSON object with a ``"text"`` field per line, e.g.
``bench.corpus`` splits) or any other file read as one UTF-8 text document. Default file: the evaluation bed's
calibration split, ``bench.corpus.split_path("calib")`` (built on demand, identical on every machine);
``bench:train`` names the bed's train split instead (what the bench teacher was trained on; ``bench:valid`` is
refused: it is what the bed evaluates on).

Windows: documents are read in file order, each tokenized as ``<bos> text <eos>`` (the same stream layout the
bench trains on) and concatenated; the stream is cut into non-overlapping ``seq_len`` windows and the first
``samples`` windows are used (packing across document boundaries, no padding). A ``.jsonl`` file is read in
batches of 64 documents until ``samples * seq_len`` tokens are in, so a large one costs little more than what is
used; a plain-text file is one document, read and tokenized whole. A smaller file gives fewer windows (the run
reports the count it used). Shuffle the file beforehand for a random sample.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pack.checkpoint import sha256_file

__all__ = ["CalibrationSet", "BENCH_PREFIX", "bench_split", "default_calib_path", "load_calibration"]

BENCH_PREFIX = "bench:"  # --calib bench:SPLIT names a split of the evaluation bed's corpus

_ENCODE_BATCH = 64  # documents per tokenizer call (the fast tokenizer parallelises within a call)


@dataclass(frozen=True)
class CalibrationSet:
    """``input_ids``: int64 ``[samples, seq_len]``; ``sha256`` hashes those exact ids (int32 little-endian)."""

    input_ids: torch.Tensor
    path: str
    file_sha256: str
    sha256: str
    documents: int

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def bench_split(calib: str | None) -> str | None:
    """The bench corpus split that ``--calib`` names (None: the default, ``calib``; ``bench:train``: ``train``),
    or None when ``calib`` is a file path. ``bench:valid`` raises: calibrating on the validation split would leak
    it into every number the bed reports."""
    if calib is None:
        return "calib"
    if not calib.startswith(BENCH_PREFIX):
        return None
    split = calib[len(BENCH_PREFIX):]
    if split not in ("calib", "train"):
        raise ValueError(f"--calib {calib}: choose bench:calib or bench:train (bench:valid is the evaluation "
                         f"split and cannot calibrate), or pass a file")
    return split


def default_calib_path(split: str = "calib") -> Path:
    """The evaluation bed's ``split`` (``bench.corpus``; default the calibration split), built on first use."""
    try:
        from bench.corpus import split_path
    except ImportError as e:
        raise FileNotFoundError(f"no --calib file given and the bench corpus is unavailable ({e}); "
                                f"pass --calib FILE (.jsonl with a 'text' field per line, or plain text)") from None
    return split_path(split)


def _documents(path: Path):
    """Yield the documents of ``path`` (see module docstring)."""
    try:
        if path.suffix.lower() not in (".jsonl", ".json"):
            yield path.read_text(encoding="utf-8")
            return
        yield from _jsonl_documents(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _jsonl_documents(path: Path):
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: not a JSON object with a \"text\" field; calibration jsonl needs "
                                 f"one {{\"text\": ...}} per line") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: \"text\" is not a string")
            yield text


def load_calibration(path, tokenizer, samples: int, seq_len: int) -> CalibrationSet:
    """Tokenize calibration file ``path`` into at most ``samples`` windows of ``seq_len`` tokens.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` when it holds less than one window."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path}: no such file; pass --calib FILE (.jsonl with a 'text' "
                                f"field per line, or plain text)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need = samples * seq_len
    stream: list[int] = []
    starts: list[int] = []  # where each document begins in the stream
    batch = []

    def flush():
        texts = list(batch)
        batch.clear()
        if backend is not None:
            encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            starts.append(len(stream))
            stream.extend(head + list(ids) + tail)

    for text in _documents(path):
        batch.append(text)
        if len(batch) == _ENCODE_BATCH:
            flush()
            if len(stream) >= need:
                break
    if batch and len(stream) < need:
        flush()
    n = min(samples, len(stream) // seq_len)
    if n == 0:
        raise ValueError(f"calibration file {path}: {len(stream)} tokens, fewer than one --seq-len {seq_len} "
                         f"window; give more text or a smaller --seq-len")
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.int32)
    sha = hashlib.sha256(ids.numpy().astype("<i4").tobytes()).hexdigest()
    docs = sum(1 for st in starts if st < n * seq_len)  # documents that reach the windows used
    return CalibrationSet(ids.to(torch.int64).view(n, seq_len), str(path), sha256_file(path), sha, docs)
