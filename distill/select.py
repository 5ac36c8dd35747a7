"""``python -m distill.select``: pick the training windows where the pruned student disagrees most with its teacher.

A data-preparation step for ``python -m distill --data SEL.jsonl``. It cuts the training data into the same
non-overlapping ``--seq-len`` windows distill would use, draws a pool of them at random (``--pool-tokens``),
scores each pooled window by the mean per-token forward ``KL(teacher || student)`` of its logits (both models
forward only, no gradients), and keeps the ``--tokens`` worth of windows with the highest score. The idea (hard
example selection for distillation): a fixed training budget is spent where pruning did the damage, not on
windows the student already gets right.

Output, written to a temp file and renamed:

* ``SEL.jsonl`` — one ``{"input_ids": [...], "window": i, "kl": s}`` per kept window, in ascending window
  order (distill shuffles them per epoch). distill reads ``input_ids`` and ignores the rest; its windows of the
  same ``--seq-len`` are exactly these rows.
* ``SEL.jsonl.meta.json`` (:func:`meta_path`) — what was scored and kept: source and its sha256, teacher and
  student weight hashes, pool / kept windows and tokens, the forward-only tokens scored, score statistics and
  the sha256 of ``SEL.jsonl``. ``python -m distill --data SEL.jsonl`` copies it into its lineage step
  (``data.selection``), so the forward-only tokens travel with the checkpoint's token count.

Token accounting: a run on ``SEL.jsonl`` trains on ``--tokens``; the pool's tokens were only forwarded through
both models (like the prune stage's calibration) — report both.

Shapes: windows int64 ``[n, seq_len]``; scores fp32 ``[n_pool]``. One process, one device (CPU runs fp32,
CUDA bf16 like distill's teacher).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pack.stopsignals import held_stop_signals, report_failure, stop_signals_interrupt

from .config import check_device
from .stop import OutputWritten

__all__ = ["SelectConfig", "meta_path", "read_meta", "check_use", "window_kl", "pick", "select", "main"]

META_SUFFIX = ".meta.json"


def meta_path(data: str | os.PathLike) -> Path:
    """The sidecar of a selection file: ``SEL.jsonl`` -> ``SEL.jsonl.meta.json``."""
    return Path(str(data) + META_SUFFIX)


def read_meta(data: str | os.PathLike, data_sha256: str) -> dict | None:
    """The selection sidecar of ``data`` if there is one and it describes this very file (its ``jsonl_sha256``
    equals ``data_sha256``); None when there is no sidecar. A sidecar of another file is an error: the lineage
    would describe data that was not trained on."""
    p = meta_path(data)
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: unreadable selection metadata ({e}); delete it or rerun python -m distill.select")
    if not isinstance(meta, dict) or meta.get("jsonl_sha256") != data_sha256:
        raise ValueError(f"{p}: describes another file than {data} (sha256 differs); delete it or rerun "
                         "python -m distill.select")
    return meta


def check_use(meta: dict, data: str | os.PathLike, seq_len: int, max_tokens: int | None) -> None:
    """Refuse a distill run that would not train on the selected windows themselves: another ``--seq-len`` would
    splice pieces of them into new windows, a ``--max-tokens`` below the selection would drop some."""
    sel_len, kept = int(meta["config"]["seq_len"]), int(meta["kept_tokens"])
    if seq_len != sel_len:
        raise ValueError(f"{data}: distill.select cut it into windows of {sel_len} tokens; --seq-len {seq_len} "
                         f"would splice pieces of them into other windows: use --seq-len {sel_len}")
    if max_tokens is not None and max_tokens < kept:
        raise ValueError(f"{data}: --max-tokens {max_tokens} drops part of the {kept:,} selected tokens; leave it "
                         "out, or select fewer with distill.select --tokens")


@dataclass
class SelectConfig:
    teacher: str = ""
    student: str = ""
    out: str = ""
    tokens: int = 0  # tokens to keep (whole windows: tokens // seq_len of them)
    pool_tokens: int | None = None  # tokens scored (None: every window of the data)
    data: str | None = None  # as distill --data (None: the bench train split)
    seq_len: int = 512
    batch_size: int = 16
    chunk: int = 2048  # tokens per chunk of the vocab-sized KL (distill's default: [2048, 262144] fp32 = 2 GiB)
    temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        if not self.teacher or not self.student or not self.out:
            raise ValueError("--teacher, --student and -o/--out are required")
        for name in ("tokens", "seq_len", "batch_size", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
        if self.tokens < self.seq_len:
            raise ValueError(f"--tokens {self.tokens}: keeps no window of --seq-len {self.seq_len}")
        if self.pool_tokens is not None and self.pool_tokens < self.tokens:
            raise ValueError(f"--pool-tokens {self.pool_tokens}: must be at least --tokens {self.tokens}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature {self.temperature}: must be a positive number")
        check_device(self.device)
        if not str(self.out).endswith(".jsonl"):
            raise ValueError(f"-o {self.out}: the selection is a .jsonl file (python -m distill --data reads it)")


@torch.no_grad()
def window_kl(teacher, student, ids: torch.Tensor, chunk: int = 2048, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token ``T^2 * KL(teacher || student)`` of each window: ``ids`` int64 [B, S] -> fp32 [B].

    Every position is scored (as distill's phase 1 does), the last one included. The logits are built in
    ``chunk``-token slices from the final hidden states (:func:`distill.losses.lm_logits`, softcapped), so a
    262k vocabulary never materialises ``[B*S, V]`` for both models at once.
    """
    from .losses import forward_kl, lm_logits
    from .models import text_config

    b, s = ids.shape
    cap_t = getattr(text_config(teacher), "final_logit_softcapping", None)
    cap_s = getattr(text_config(student), "final_logit_softcapping", None)
    h_t = teacher.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.reshape(b * s, -1)
    h_s = student.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.reshape(b * s, -1)
    w_t = teacher.get_output_embeddings().weight
    w_s = student.get_output_embeddings().weight
    kl = torch.empty(b * s, dtype=torch.float32, device=ids.device)
    for i in range(0, b * s, chunk):
        j = min(i + chunk, b * s)
        kl[i:j] = forward_kl(lm_logits(h_s[i:j], w_s, cap_s), lm_logits(h_t[i:j], w_t, cap_t), temperature)
    return kl.view(b, s).mean(1)


def pick(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (into ``scores``) of the ``keep`` highest scores, ties to the lower index, in ascending order."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} windows")
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return torch.device(name)


def select(cfg: SelectConfig, progress: bool = True) -> dict:
    """Score the pool, write ``cfg.out`` and its sidecar; returns the sidecar's dict."""
    from tqdm import tqdm

    from .data import load_blocks, pair_tokenizer
    from .models import check_pair, load_model, text_config
    from .train import checkpoint_sha256

    out = Path(cfg.out)
    _check_free(out, cfg.force)
    dev = _device(cfg.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    teacher = load_model(cfg.teacher, dtype, dev)
    student = load_model(cfg.student, dtype, dev)
    check_pair(teacher, student, cfg.teacher, cfg.student)
    tokenizer = pair_tokenizer(cfg.student, cfg.teacher)
    data = load_blocks(cfg.data, tokenizer, cfg.seq_len, None, text_config(student).vocab_size)
    n = data.blocks.shape[0]
    keep = cfg.tokens // cfg.seq_len
    n_pool = n if cfg.pool_tokens is None else min(n, cfg.pool_tokens // cfg.seq_len)
    if keep > n_pool:
        raise ValueError(f"{data.source}: --tokens {cfg.tokens} asks for {keep} windows of {cfg.seq_len}, the pool "
                         f"has {n_pool} (the data has {n}); lower --tokens or raise --pool-tokens")
    # the pool: a seeded random subset of the windows, scored in ascending window order
    pool = torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:n_pool]).values
    scores = torch.empty(n_pool, dtype=torch.float32)
    t1 = time.perf_counter()
    for i in tqdm(range(0, n_pool, cfg.batch_size), desc="select: scoring", unit="batch", disable=not progress):
        rows = pool[i:i + cfg.batch_size]
        scores[i:i + len(rows)] = window_kl(teacher, student, data.blocks[rows].to(dev), cfg.chunk,
                                            cfg.temperature).cpu()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    score_s = time.perf_counter() - t1
    if not torch.isfinite(scores).all():
        bad = int(pool[~torch.isfinite(scores)][0])
        raise ValueError(f"{data.source}: window {bad} scores a non-finite KL; check the checkpoints for NaN/Inf")
    kept_local = pick(scores, keep)
    kept = pool[kept_local]

    lines = [json.dumps({"input_ids": data.blocks[w].tolist(), "window": int(w), "kl": float(scores[k])},
                        separators=(",", ":")) + "\n" for w, k in zip(kept.tolist(), kept_local.tolist())]
    body = "".join(lines).encode()
    ks, ps = scores[kept_local], scores
    meta = {
        "tool": "distill.select", "criterion": "mean per-token forward KL(teacher || student) of a window",
        # (the models and the data by absolute path: as typed, they would change with the working directory)
        "config": {k: (str(Path(v).resolve()) if k in ("teacher", "student", "data") and v is not None else v)
                   for k, v in asdict(cfg).items() if k not in ("out", "force", "device")},
        "teacher_sha256": checkpoint_sha256(cfg.teacher), "student_sha256": checkpoint_sha256(cfg.student),
        "source": data.source, "source_sha256": data.sha256, "tokenizer_sha256": data.tokenizer_sha256,
        "windows_available": n, "pool_windows": n_pool, "kept_windows": keep,
        "scored_tokens": n_pool * cfg.seq_len, "kept_tokens": keep * cfg.seq_len,
        "device": dev.type, "dtype": str(dtype).removeprefix("torch."),
        "kl_pool": {"mean": float(ps.mean()), "median": float(ps.median()), "min": float(ps.min()),
                    "max": float(ps.max())},
        "kl_kept": {"mean": float(ks.mean()), "min": float(ks.min()), "max": float(ks.max())},
        "jsonl_sha256": hashlib.sha256(body).hexdigest(),
    }
    _write_atomic(out, body, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode(), cfg.force)
    tok_s = n_pool * cfg.seq_len / max(score_s, 1e-9)
    print(f"select: kept {keep:,} of {n_pool:,} pooled windows ({keep * cfg.seq_len:,} of {n_pool * cfg.seq_len:,} "
          f"tokens; data {n * cfg.seq_len:,}); mean KL kept {meta['kl_kept']['mean']:.5f} vs pool "
          f"{meta['kl_pool']['mean']:.5f}; scored {tok_s:,.0f} tok/s (both models), {time.perf_counter() - t0:.1f} s "
          f"in all -> {out}")
    return meta


def _check_free(out: Path, force: bool) -> None:
    """Neither the selection file nor its sidecar may exist unless ``force``; the error names the one that does."""
    for p in (out, meta_path(out)):
        if p.exists() and not force:
            raise FileExistsError(f"{p} exists; pass --force to overwrite it")


def _write_atomic(out: Path, body: bytes, meta: bytes, force: bool) -> None:
    """Both files via temp files in ``out``'s directory and renames: the sidecar first, so a selection file
    never stands without the sidecar that describes it (a stale sidecar alone is caught by its sha256). Both
    destinations are checked again before the first rename (scoring takes a while)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmps = []
    try:
        staged = []
        for dst, blob in ((meta_path(out), meta), (out, body)):
            fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=out.parent)
            tmps.append(tmp)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            staged.append((tmp, dst))
        _check_free(out, force)
        try:   # both renames or neither: a stop signal is held until both are done, then said to come after them
            with held_stop_signals():
                for tmp, dst in staged:
                    os.replace(tmp, dst)
        except KeyboardInterrupt:
            raise OutputWritten(f"{out} and its sidecar {meta_path(out).name} were written; interrupted as they "
                                f"were put in place") from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"distill.select: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    d = SelectConfig.__dataclass_fields__
    ap = _Parser(prog="python -m distill.select",
                 description="keep the training windows with the highest teacher-student KL (data for distill)")
    ap.add_argument("--teacher", required=True, metavar="T", help="teacher checkpoint dir (as for distill)")
    ap.add_argument("--student", required=True, metavar="S", help="student checkpoint dir (as for distill)")
    ap.add_argument("-o", "--out", required=True, metavar="SEL.jsonl", help="selection file (+ SEL.jsonl.meta.json)")
    ap.add_argument("--tokens", type=int, required=True,
                    help="tokens to keep, in whole --seq-len windows (e.g. phase 1's steps x batch x seq-len)")
    ap.add_argument("--pool-tokens", type=int, default=None,
                    help="tokens to score, a seeded random subset of the windows (default: all of the data)")
    ap.add_argument("--data", default=None, metavar="FILE", help="as distill --data (default: the bench train split)")
    ap.add_argument("--seq-len", type=int, default=d["seq_len"].default,
                    help="window length; use the distill run's (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                    help="windows per forward (default %(default)s)")
    ap.add_argument("--chunk", type=int, default=d["chunk"].default,
                    help="tokens per chunk of the vocab-sized KL (default %(default)s)")
    ap.add_argument("--temperature", type=float, default=d["temperature"].default,
                    help="KL temperature (default %(default)s)")
    ap.add_argument("--seed", type=int, default=d["seed"].default, help="pool draw seed (default %(default)s)")
    ap.add_argument("--device", default=d["device"].default, help="auto, cpu, cuda, cuda:N (default auto)")
    ap.add_argument("--force", action="store_true", help="overwrite SEL.jsonl and its sidecar")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    kw = {k: v for k, v in vars(args).items() if k != "no_progress"}
    # SIGTERM (a timeout, Slurm, docker stop) cleans up like Ctrl-C: no temp file left, one line, exit 130
    with stop_signals_interrupt() as interrupted:
        try:
            select(SelectConfig(**kw), progress=progress)
        except BaseException as e:   # one line and the exit status (pack.stopsignals.report_failure), or a bug's
            rc = report_failure("distill.select", e, interrupted, (ValueError, OSError))   # traceback
            if rc is None:
                raise
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
