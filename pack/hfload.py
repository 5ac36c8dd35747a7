"""Read a bf16 Hugging Face checkpoint dir with transformers, every way it can be wrong said in one line.

``prune`` and ``distill`` load their inputs with ``from_pretrained``, which tolerates what they must not: a tensor
the files lack is left randomly initialised (a load report on the log, and the run trains or prunes noise, then
writes it out as if it were the model), a config.json that does not match the weights is a traceback, a truncated
file is safetensors' error without the file's name, an index that is not one an ``AttributeError``, integer or fp8
weights are cast to bf16 as if they were values. Each is a :class:`ValueError` here (the CLIs' exit status 2,
:func:`pack.errors.cli_status`), naming the checkpoint and the fix, and raised before the model loads where the
files alone tell (:func:`weight_files`, :func:`check_weight_dtypes`, :func:`read_config`).

:func:`weight_files` is also what the stages hash for the lineage: the files ``from_pretrained`` reads, in its own
order (``model.safetensors`` before an index, safetensors before PyTorch's ``.bin``), not every ``*.safetensors``
lying in the folder.
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

from .checkpoint import INDEX_NAME, SINGLE_NAME, index_shards, safetensors_files
from .errors import QuantizeError

__all__ = ["first_line", "read_config", "weight_files", "check_weight_dtypes", "from_pretrained_checked"]

BIN_NAME, BIN_INDEX_NAME = "pytorch_model.bin", "pytorch_model.bin.index.json"
NON_FLOAT = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def read_config(ckpt: Path, quantized_fix: str):
    """``AutoConfig`` of checkpoint dir ``ckpt``. ValueError if config.json is missing or unreadable, names no
    architecture list, or describes a quantized model (``quantized_fix``: what the tool takes instead)."""
    from transformers import AutoConfig

    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no config.json; pass a Hugging Face checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(ckpt)
        archs = config.architectures
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise ValueError(f"architectures must be a list of class names, not {archs!r}")
    except Exception as e:   # transformers' many ways to reject a config (strict dataclass fields, types, ...)
        raise ValueError(f"{ckpt / 'config.json'}: transformers cannot read it ({type(e).__name__}: "
                         f"{first_line(e)}); restore the checkpoint's config.json") from None
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{ckpt}: a quantized checkpoint (config.json has quantization_config); {quantized_fix}")
    return config


def weight_files(ckpt: Path) -> list[Path]:
    """The weight files ``from_pretrained(ckpt)`` reads, in transformers' order: ``model.safetensors``, else the
    shards ``model.safetensors.index.json`` names (checked as :func:`pack.checkpoint.safetensors_files` checks
    them), else ``pytorch_model.bin``, else the shards of ``pytorch_model.bin.index.json``. ValueError naming the
    fix when there are none, or the index is broken or names a missing shard."""
    ckpt = Path(ckpt)
    try:
        if (ckpt / SINGLE_NAME).is_file() or (ckpt / INDEX_NAME).is_file():
            return safetensors_files(ckpt)[0]
        if (ckpt / BIN_NAME).is_file():
            return [ckpt / BIN_NAME]
        if (ckpt / BIN_INDEX_NAME).is_file():
            return index_shards(ckpt / BIN_INDEX_NAME, "PyTorch")[0]
    except QuantizeError as e:
        raise ValueError(str(e)) from None
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    hint = (f"it has safetensors files ({shards[0]}) but neither {SINGLE_NAME} nor an index naming them: copy the "
            f"index too, or re-save the checkpoint with save_pretrained") if shards else \
        "pass a Hugging Face checkpoint directory"
    raise ValueError(f"{ckpt}: no weights ({SINGLE_NAME}, {INDEX_NAME}, {BIN_NAME} or its index); {hint}")


def check_weight_dtypes(ckpt: Path, weights: list[Path], tool: str, takes: str) -> None:
    """Refuse weights stored as integers or fp8 (a quantized or otherwise encoded model, which loading would cast
    to bf16 as if they were values; ``takes``: what ``tool`` takes instead); note floating weights of another
    width, which are rounded to bf16. Reads only the safetensors headers (a ``.bin`` is left to loading)."""
    from .stio import raw_header

    other: dict[str, int] = {}
    for f in weights:
        if f.suffix != ".safetensors":
            continue
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                header, _ = raw_header(fd)
            finally:
                os.close(fd)
        except (OSError, struct.error, ValueError):
            continue   # loading reports an unreadable file, naming it
        for name, t in header.items():
            if name == "__metadata__" or not isinstance(t, dict):
                continue
            dtype = t.get("dtype")
            if dtype in NON_FLOAT:
                raise ValueError(f"{f}: tensor {name} is stored as {dtype}, not as floating-point values (a "
                                 f"quantized or encoded model?); {takes}")
            if dtype not in (None, "BF16"):
                other[dtype] = other.get(dtype, 0) + 1
    if other:
        print(f"{tool}: note: {ckpt}: {', '.join(f'{n} tensors stored as {d}' for d, n in sorted(other.items()))} "
              f"are rounded to bf16", file=sys.stderr, flush=True)


def from_pretrained_checked(cls, ckpt: Path, arch: str, **kwargs):
    """``cls.from_pretrained(ckpt, **kwargs)`` with transformers' load report silenced and its findings raised
    instead: a tensor the model has and the files lack (left randomly initialised), one the files have and the
    model does not (dropped), one of another shape; a config.json that does not match the weights; an unreadable
    safetensors file; weight files missing. ``arch``: the class named in messages."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # its load report: what is wrong is said below, in one line
    try:
        model, info = cls.from_pretrained(ckpt, output_loading_info=True, **kwargs)
    except SafetensorError as e:   # e.g. a truncated file: safetensors' own error names no file
        raise ValueError(f"{ckpt}: a safetensors file of the checkpoint is unreadable ({e}); copy or save the "
                         "checkpoint again") from None
    except (RuntimeError, ValueError) as e:
        if "size mismatch" not in str(e) and "mismatched" not in str(e):
            raise
        raise ValueError(f"{ckpt}: config.json does not match the weights' shapes ({first_line(e)}); restore the "
                         f"checkpoint's config.json") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError) or "does not appear to have" in str(e):   # weights missing
            raise ValueError(f"{ckpt}: transformers finds no weights to load ({first_line(e)}); copy the complete "
                             f"checkpoint") from None
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    # a tensor the model has but the files lack would be left randomly initialised and written out as if trained;
    # one the files have but the model does not, dropped
    bad = {what: list(info.get(key) or []) for what, key in (("missing", "missing_keys"),
                                                             ("not in the model", "unexpected_keys"),
                                                             ("of another shape", "mismatched_keys"))}
    if any(bad.values()):
        said = "; ".join(f"{len(v)} {what} (e.g. {v[0][0] if isinstance(v[0], tuple) else v[0]})"
                         for what, v in bad.items() if v)
        raise ValueError(f"{ckpt}: its weights do not match {arch} as config.json describes it: tensors {said}; "
                         f"restore the checkpoint (copy or save it again)")
    return model
