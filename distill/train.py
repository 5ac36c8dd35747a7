"""The distill loop: teacher forward (no grad, bf16) -> student loss -> AdamW, then a bf16 checkpoint + lineage.

Per step (global batch ``B`` windows of ``S`` tokens, ``B / W`` per rank):

* phase 1: loss = ``T^2 KL(teacher || student)`` averaged over all ``B*S`` positions
  + ``sum_l w_l * normalised_mse(h_s^l, h_t^l)`` (decoder-layer outputs);
* phase 2: the window is a prompt (first ``S - C`` tokens) and a continuation (last ``C = max_new_tokens``);
  with probability ``lmbda`` the continuation is re-sampled from the student; loss = generalized JSD averaged
  over the continuation tokens of the whole global batch (tokens after a sampled EOS excluded).

Learning rate: linear warm-up over ``warmup_steps``, cosine decay to ``lr * min_lr_ratio`` at the last step.
Figures: loss parts, tokens/s (training tokens ``B*S`` per step, all ranks), and on CUDA the MFU: model FLOPs
``(6 N_student + 2 N_teacher) * tokens`` (N = matmul weights, :func:`distill.models.matmul_params`; in phase 2
the lm_head's weights only for the continuation share of the tokens; attention score FLOPs, the losses and phase-2
generation not counted, though generation's time is in the denominator) over ``peak_tflops`` per GPU (default
989.4 TFLOP/s, H100/H200 SXM dense bf16).

Precision (``--precision``; the teacher is always a bf16 model run as is):

* ``bf16-mixed`` (CUDA default): fp32 student weights; one process runs it under ``torch.autocast(bf16)`` (bf16
  matmuls, fp32 everything else: residual stream, norms, RoPE, GELU, and a cast around every matmul); under
  torchrun FSDP2 all-gathers bf16 copies of the fp32 shards and reduce-scatters fp32 gradients.
* ``bf16-master`` (one process only): the student's weights are bf16 and it runs entirely in bf16 like the
  teacher (no autocast); AdamW steps fp32 master copies of the trainable weights
  (:class:`distill.models.MasterWeights`): after backward ``master.grad = grad.float()``, the grad-norm clip on
  the fp32 master grads, ``AdamW.step()`` on the masters, then ``param.copy_(master)`` (round to nearest). Memory
  per trainable weight: 2 (bf16) + 2 (grad) + 4 (master) + 8 (Adam) = 16 bytes, as bf16-mixed's 4 + 4 + 8.
  Checkpoints hold the masters and their AdamW state (:mod:`distill.state`). Under torchrun it is refused:
  FSDP2's bf16-mixed is already bf16 compute over fp32 sharded masters with an fp32 gradient reduce.
* ``fp32`` (CPU default): everything fp32.

The logit losses are fp32 per chunk in every mode (:func:`distill.losses.chunked_logit_loss`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from pack.hfcompat import checkpointing_enable

from . import parallel
from .config import DistillConfig
from .data import load_blocks, pair_tokenizer
from .select import check_use as check_selection_use
from .select import read_meta as read_selection_meta
from .models import (DistillModule, MasterWeights, capture_layer_outputs, check_checkpoint, check_pair,
                     compile_decoder_layers, config_vocab_size, decoder_layers, limit_checkpointing, load_model,
                     matmul_params, set_trainable, text_config, to_bf16_layout)
from .sample import continuation_mask, on_policy_step, row_seed, sample_continuations
from .state import clear_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from .stop import OutputWritten, TrainingStopped, stop_after_step, stop_agreed

__all__ = ["run", "Distiller", "lr_at", "CheckpointHash", "checkpoint_sha256", "student_dtype", "loss_parts"]

# the bookkeeping keys of a Distiller.step record; every other key but "loss" is a loss term
_STEP_KEYS = ("step", "lr", "grad_norm", "on_policy")


def loss_parts(rec: dict, per_layer: bool = True) -> dict:
    """The loss terms of a :meth:`Distiller.step` record, in its order (``hidden_mse`` with its weight in,
    ``data_ce`` the plain mean cross-entropy, ...); ``per_layer=False`` leaves out the hidden term's per-layer
    split (``hidden_mse/<i>``)."""
    return {k: v for k, v in rec.items()
            if k not in _STEP_KEYS and k != "loss" and (per_layer or "/" not in k)}

BF16_MASTER_DIST_ERROR = ("--precision bf16-master runs in one process only; under torchrun use bf16-mixed (FSDP2 "
                          "already computes in bf16 over fp32 sharded master weights, with an fp32 gradient reduce)")


def student_dtype(precision: str | None) -> torch.dtype:
    """dtype the student's weights are loaded in: bf16 for ``bf16-master``, else fp32 (the master weights)."""
    return torch.bfloat16 if precision == "bf16-master" else torch.float32


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up to ``lr`` at step ``warmup_steps - 1``, then cosine to
    ``lr * min_lr_ratio`` at the last step (``steps - 1``). A one-step run trains at ``lr``; with
    ``warmup_steps = steps - 1`` the last step is the cosine's end (the floor), not a second step at the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = cfg.steps - 1 - cfg.warmup_steps
    if span <= 0:  # the step after the warm-up is the last: the decay's end, unless the run is that one step
        frac = 0.0 if cfg.steps <= 1 else 1.0
    else:
        frac = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


class CheckpointHash:
    """sha256 over a checkpoint's weights: ``name sha256`` of each weight file ``from_pretrained`` reads
    (:func:`pack.hfload.weight_files`: not a stray ``*.safetensors`` beside them), sorted by name (the files' own
    sha256 from pack's input-hash cache when unchanged since hashed: :mod:`pack.hashcache`); :meth:`files_sha256`:
    each file's, as the other stages' lineage steps record their inputs.

    Started on creation, in ``workers`` child processes (default: one per file, up to this rank's share of the
    cores), so that the hash runs while the caller loads the models; :meth:`result` waits. The files are opened
    on creation, and the hash is of them as they were then (the version the models are loaded from, unless one
    is replaced in the moment between). :meth:`close` stops the children and closes the files."""

    def __init__(self, ckpt: str | Path, workers: int | None = None):
        from pack.checkpoint import FileHasher, parallel_hash_workers
        from pack.hfload import weight_files

        self.ckpt = ckpt
        self.files = sorted(weight_files(Path(ckpt)))
        self._hasher = FileHasher(self.files, workers=workers or parallel_hash_workers(len(self.files)))
        self._hex: str | None = None

    def files_sha256(self) -> dict[str, str]:
        """``{file name: sha256}`` of the weight files (waits)."""
        by_name = self._hasher.result()
        return {f.name: by_name[f.name] for f in self.files}

    def result(self) -> str:
        if self._hex is None:
            h = hashlib.sha256()
            for name, sha in self.files_sha256().items():
                h.update(f"{name} {sha}\n".encode())
            self._hex = h.hexdigest()
        return self._hex

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.close()


def checkpoint_sha256(ckpt: str | Path, workers: int | None = None) -> str:
    """:class:`CheckpointHash` of ``ckpt``, waited for."""
    h = CheckpointHash(ckpt, workers)
    try:
        return h.result()
    finally:
        h.close()


class _Log:
    """Rank-0 console lines and the optional JSON-lines log."""

    def __init__(self, env, path: str | None, append: bool):
        self.env = env
        self.fh = None
        if env.is_main and path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a" if append else "w", encoding="utf-8")

    def rewind(self, step: int) -> None:
        """On ``--resume`` from ``step``: drop the records a killed run wrote after that step (they are about to be
        written again), its summary and a stopped run's ``stopped`` record, so the log reads like one uninterrupted
        run's."""
        if self.fh is None:
            return
        self.fh.close()
        path = Path(self.fh.name)
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by kill -9
                continue
            event = rec.get("event")
            if event in ("summary", "stopped") or (event == "step" and rec.get("step", 0) > step) or \
                    (event == "config" and not step):
                continue
            keep.append(line + "\n")
        path.write_text("".join(keep), encoding="utf-8")
        self.fh = open(path, "a", encoding="utf-8")

    def print(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    def record(self, rec: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(rec, sort_keys=True) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(text_config(model), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def _refuse_at_or_inside(option: str, path, inputs: dict) -> None:
    """ValueError if ``path`` (given as ``option``) is one of ``inputs`` (``{what: path}``) or lies inside it,
    compared resolved."""
    path_r = Path(path).resolve()
    for name, p in inputs.items():
        p_r = Path(p).resolve()
        if path_r == p_r or p_r in path_r.parents:
            raise ValueError(f"{option} {path}: must not be the {name} {p} or lie inside it; pass another {option}")


def _prepare_output(cfg: DistillConfig, env) -> None:
    from pack.checkpoint import check_output_dir, check_replaceable, check_writable_parent

    out, ckpt = Path(cfg.out), Path(cfg.ckpt_dir)
    inputs = {"teacher": cfg.teacher, "student": cfg.student}
    if cfg.data is not None:
        inputs["data"] = cfg.data   # (an output there would replace it, or delete it with the output's old copy)
    check_output_dir(out, inputs)
    out_r, ckpt_r = out.resolve(), ckpt.resolve()
    _refuse_at_or_inside("--ckpt-dir", ckpt, inputs)   # (its step folders would be written into an input)
    if ckpt_r == out_r or out_r in ckpt_r.parents:
        raise ValueError(f"--ckpt-dir {ckpt}: must not be the output dir {out} or inside it (the output is replaced "
                         f"when the run ends); pass another --ckpt-dir")
    if cfg.log_json:
        log_r = Path(cfg.log_json).resolve()
        if log_r == out_r or out_r in log_r.parents:
            # the log's folder would create OUT before the run ends (then the final write refuses it), or with
            # --force the output's atomic swap would delete the log
            raise ValueError(f"--log-json {cfg.log_json}: must not be the output dir {out} or inside it (the output "
                             f"is written at the end, as a whole); pass a path outside it")
        _refuse_at_or_inside("--log-json", cfg.log_json, inputs)   # it would overwrite what the run reads
        if log_r.is_dir() or log_r == ckpt_r:
            raise ValueError(f"--log-json {cfg.log_json}: is a directory; pass a file path")
    check_writable_parent(out, "-o")
    if cfg.ckpt_every:
        check_writable_parent(ckpt, "--ckpt-dir")
    if ckpt.exists() and not ckpt.is_dir():
        raise ValueError(f"--ckpt-dir {ckpt}: is a file, not a folder; pass another --ckpt-dir")
    if os.path.lexists(out) and not cfg.force:   # a dangling symlink is in the way too
        raise FileExistsError(f"{out}: output directory exists; pass --force to overwrite it")
    if cfg.force:
        check_replaceable(out)   # before the training (and before --force deletes an earlier run's checkpoints)
    if ckpt.exists() and not (cfg.resume or cfg.force) and latest_checkpoint(ckpt) is not None:
        raise FileExistsError(f"{ckpt}: training checkpoints of an earlier run exist; pass --resume to continue "
                              "that run, or --force to start over (deletes them)")


def _no_usable_checkpoint(ckpt_dir: Path) -> None:
    """``--resume`` found no complete checkpoint in ``ckpt_dir``: fine if there is none at all (a first run started
    with --resume), a ValueError if checkpoints are there but ``latest`` is missing or names none of them (a copy
    cut short): starting over would delete them."""
    steps = sorted(p.name for p in ckpt_dir.glob("step-*") if p.is_dir()) if ckpt_dir.is_dir() else []
    latest = ckpt_dir / "latest"
    if steps or latest.exists():
        named = latest.read_text(errors="replace").strip() if latest.is_file() else None
        raise ValueError(f"{ckpt_dir}: has training checkpoints ({', '.join(steps) or 'none'}) but none that "
                         f"'latest' ({named or 'missing'}) names completely; restore it, or run without --resume "
                         f"(with --force) to start over (deletes them)")


def _load_state(dz, ck: Path) -> dict:
    """:meth:`Distiller.load_state`, a damaged checkpoint's errors (a file missing or cut short) as one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dz.load_state(ck)
    except (CheckpointException, OSError, EOFError, KeyError, AssertionError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError):   # the machine, not the checkpoint
            raise
        cause = e
        if isinstance(e, CheckpointException) and getattr(e, "failures", None):   # the rank's own error, not
            cause = next(iter(e.failures.values()))                                # "CheckpointException ranks"
            cause = cause[0] if isinstance(cause, tuple) else cause                # ((exception, trace))
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{ck}: cannot load this training checkpoint ({type(cause).__name__}: {first}): damaged, "
                         f"or made with another --student, --teacher or pdqkit version (before the forty-fourth "
                         f"session's, --train-embeddings left an untied lm_head frozen); resume with what it was "
                         f"made with, or from another checkpoint, or run without --resume (with --force) to start "
                         f"over (deletes it)") from None


def _start_fresh(cfg: DistillConfig, env) -> None:
    """``--force`` without ``--resume``: delete an earlier run's training checkpoints, once the models and the data
    have loaded and every setting checked out (a run refused for bad input leaves them, and its log, alone)."""
    parallel.barrier(env)
    if env.is_main and cfg.force and not cfg.resume:
        clear_checkpoints(Path(cfg.ckpt_dir))
    parallel.barrier(env)


CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")   # the CUBLAS_WORKSPACE_CONFIG values torch accepts as deterministic


@contextlib.contextmanager
def deterministic_kernels(on: bool = True):
    """Make CUDA training reproducible to the bit within the block (``--deterministic``); enter before any CUDA
    work. ``on=False``: a no-op.

    Without it a CUDA run's rounding varies from run to run: the memory-efficient and flash SDPA backward kernels
    accumulate the query gradient with atomics, some cuBLAS paths split K across a workspace whose reduction order
    depends on the stream's history, and Inductor may autotune to another kernel in another process. So:
    ``torch.use_deterministic_algorithms`` (SDPA and scatter/index kernels take their deterministic paths; an op
    with none raises, naming itself) and Inductor's ``deterministic`` mode (no benchmark-driven kernel choice)
    where this torch has it, both put back on exit; and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless the environment
    sets another deterministic value. cuBLAS and torch read that variable once per process, at the first CUDA
    matmul, so it stays set, and a process that initialised CUDA before without it is refused (ValueError), as is
    a value cuBLAS does not make deterministic."""
    if not on:
        yield
        return
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is not None and workspace not in CUBLAS_DETERMINISTIC:
        raise ValueError(f"--deterministic: CUBLAS_WORKSPACE_CONFIG={workspace} does not make cuBLAS deterministic; "
                         f"unset it or set it to {' or '.join(CUBLAS_DETERMINISTIC)}")
    if workspace is None and torch.cuda.is_initialized():
        raise ValueError("--deterministic: CUDA was initialised in this process before CUBLAS_WORKSPACE_CONFIG was "
                         "set (cuBLAS reads it once); set CUBLAS_WORKSPACE_CONFIG=:4096:8 before the first CUDA "
                         "call, or run python -m distill in a process of its own")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])
    try:
        import torch._inductor.config as inductor_config
    except ImportError:   # a torch without Inductor: nothing compiled to make deterministic
        inductor_config = None
    if not hasattr(inductor_config, "deterministic"):   # (an older torch has no such switch)
        inductor_config = None
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, inductor_config and inductor_config.deterministic)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    if inductor_config is not None:
        inductor_config.deterministic = True
    try:
        yield
    finally:
        algorithms, warn_only, benchmark, inductor = before
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if inductor_config is not None:
            inductor_config.deterministic = inductor


def run(cfg: DistillConfig) -> dict:
    """Run one distillation phase as configured; returns the summary written into the lineage step."""
    with deterministic_kernels(cfg.deterministic):
        env = parallel.init(cfg.device)
        ok = False
        try:
            result = _run(cfg, env)
            ok = True
            return result
        finally:
            parallel.shutdown(env, ok)


class Distiller:
    """Teacher + student + optimizer for one phase; :meth:`step` runs one optimizer step on a token batch.

    ``teacher``: frozen model (bf16), ``student``: fp32 master weights (bf16-mixed, fp32) or, for
    ``bf16-master``, a bf16 model (an fp32 one is cast in place to the bf16 layout, :func:`to_bf16_layout`,
    and the fp32 masters are made from the bf16 values), both on ``env.device``. Used by :func:`run` (with data,
    checkpoints, logs) and by ``bench/gpu/distill_bench.py`` / ``distill_profile.py`` (synthetic tokens)."""

    def __init__(self, cfg: DistillConfig, env, teacher, student, eos_ids: list[int] | None = None):
        self.cfg, self.env = cfg, env
        if cfg.precision == "bf16-master" and env.is_dist:
            raise ValueError(BF16_MASTER_DIST_ERROR)
        self.bf16 = cfg.precision == "bf16-mixed"  # fp32 weights + autocast (or FSDP2 bf16 params)
        bf16_master = cfg.precision == "bf16-master"  # bf16 weights, fp32 masters in the optimizer
        compute_dtype = torch.bfloat16 if self.bf16 or bf16_master else torch.float32
        if bf16_master:
            to_bf16_layout(student)
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        self.trainable = set_trainable(student, cfg.train_embeddings, cfg.trainable)
        if cfg.grad_ckpt:
            checkpointing_enable(student, {"use_reentrant": False})
            limit_checkpointing(student, cfg.ckpt_layers)
        if cfg.compile_layers:
            compile_decoder_layers(teacher)
            compile_decoder_layers(student)
        student.train()
        self.layers, layer_w = cfg.layer_selection(text_config(student).num_hidden_layers)
        self.n_student, self.n_teacher = matmul_params(student), matmul_params(teacher)
        self.n_head = student.get_output_embeddings().weight.numel()   # V x d, the same in both (check_pair)
        self.dm = DistillModule(student, logit_loss="forward_kl" if cfg.phase == 1 else "gjsd",
                                temperature=cfg.temperature if cfg.phase == 1 else cfg.jsd_temperature,
                                beta=cfg.beta, logit_weight=1.0, hidden_layers=self.layers,
                                hidden_weights=layer_w, chunk=cfg.chunk, compute_dtype=compute_dtype,
                                loss_impl=cfg.loss_impl, compile_loss=cfg.compile_loss,
                                ce_weight=cfg.ce_weight)
        self.layer_w = layer_w
        if env.is_dist:
            parallel.shard_student(self.dm, decoder_layers(student), env, bf16_params=self.bf16)
        named = [(n, p) for n, p in self.dm.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # bf16-master: the optimizer (and the grad clip, and the checkpoints) see the fp32 masters
        self.masters = MasterWeights(named) if bf16_master else None
        self.opt_params = self.masters.masters if self.masters is not None else self.params
        # --ema-decay: an fp32 moving average of what the optimizer steps (the masters under bf16-master; the local
        # shards under FSDP2), by parameter name; it is training state (checkpointed) and becomes the output weights
        self.ema = ({n: p.detach().clone() for (n, _), p in zip(named, self.opt_params)} if cfg.ema_decay
                    else None)
        fused = {"fused": True} if env.device.type == "cuda" and not env.is_dist else {}
        self.opt = torch.optim.AdamW(self.opt_params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay, **fused)
        # one process: bf16 autocast on the run's device (CPU autocast too, so the mode means the same there);
        # under torchrun FSDP2's MixedPrecisionPolicy casts instead
        self.autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if self.bf16 and not env.is_dist
                         else contextlib.nullcontext())
        if cfg.batch % env.world:
            raise ValueError(f"--batch {cfg.batch} is not divisible by the {env.world} ranks")
        self.local_b = cfg.batch // env.world
        self.eos_ids = eos_ids or []
        self.make_cache = None
        self.phase_timer = None  # optional: name -> context manager around each part of a step (profilers)
        if cfg.phase == 2:
            from transformers import DynamicCache

            self.make_cache = lambda: DynamicCache(config=text_config(student))  # noqa: E731

    @property
    def state_module(self) -> torch.nn.Module:
        """The module whose trainable parameters (with ``opt``) are the training state: the masters under
        bf16-master, else the (possibly FSDP-sharded) :class:`DistillModule`."""
        return self.masters if self.masters is not None else self.dm

    def save_state(self, ckpt_dir, step: int, meta: dict) -> Path:
        """Training checkpoint after ``step`` completed steps (:func:`distill.state.save_checkpoint`)."""
        return save_checkpoint(ckpt_dir, step, self.state_module, self.opt, self.env, meta, self._extra_state())

    def load_state(self, path) -> dict:
        """Load a training checkpoint (weights / masters, AdamW state, RNG); returns its meta."""
        meta = load_checkpoint(path, self.state_module, self.opt, self.env, self._extra_state())
        if self.masters is not None:
            self.masters.copy_to_model()  # the bf16 weights are the restored masters, rounded
        return meta

    def _extra_state(self) -> dict | None:
        return {"ema": self.ema} if self.ema is not None else None

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema = d * ema + (1 - d) * w`` for every trained weight ``w`` (after the optimizer step)."""
        d = self.cfg.ema_decay
        for e, p in zip(self.ema.values(), self.opt_params):
            e.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def use_ema(self) -> None:
        """Make the moving average the model's weights (the end of a ``--ema-decay`` run; no-op without one)."""
        if self.ema is None:
            return
        for e, p in zip(self.ema.values(), self.opt_params):
            p.detach().copy_(e)
        if self.masters is not None:
            self.masters.copy_to_model()

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs per trained token: 6 N_student (forward + backward) + 2 N_teacher (forward). In phase 2 only the
        ``max_new_tokens`` continuation positions of each ``seq_len`` row reach the (tied) lm_head of either model,
        so its ``V x d`` weights count for that share of the tokens."""
        if self.cfg.phase == 1:
            return 6 * self.n_student + 2 * self.n_teacher
        share = self.cfg.max_new_tokens / self.cfg.seq_len
        return 6 * (self.n_student - self.n_head) + 2 * (self.n_teacher - self.n_head) + 8 * self.n_head * share

    def _rows(self, step: int, ids: torch.Tensor):
        """(ids, flat rows scored, their weights, on_policy) for this rank's batch ``ids`` [B/W, S]."""
        cfg, env, dev = self.cfg, self.env, self.env.device
        b, S = ids.shape
        if cfg.phase == 1:
            n = b * S
            return ids, torch.arange(n, device=dev), torch.full((n,), 1.0 / n, device=dev), False
        P, C = S - cfg.max_new_tokens, cfg.max_new_tokens
        on_policy = on_policy_step(cfg.seed, step, cfg.lmbda)
        if on_policy:
            seeds = [row_seed(cfg.seed, step, step * cfg.batch + env.rank * b + i) for i in range(b)]
            ids = torch.cat([ids[:, :P], self._sample(ids[:, :P], C, seeds)], 1)
            mask = continuation_mask(ids[:, P:], self.eos_ids)
        else:
            mask = torch.ones(b, C, dtype=torch.bool, device=dev)
        # logits at positions P-1 .. S-2 predict the continuation tokens P .. S-1
        pos = torch.arange(b, device=dev)[:, None] * S + torch.arange(P - 1, S - 1, device=dev)[None, :]
        rows = pos[mask]
        n_valid = parallel.all_reduce_sum(torch.tensor(float(rows.numel()), device=dev), env)
        # FSDP averages gradients over ranks: scale by world so the result is the global token mean
        return ids, rows, torch.full((rows.numel(),), env.world / float(n_valid), device=dev), on_policy

    def _sample(self, prompts, n_new, seeds):
        """Student continuations (eval mode, no grad; FSDP params stay gathered for the whole generation)."""
        fsdp = parallel.fsdp_modules(self.dm)
        for m in fsdp:
            m.set_reshard_after_forward(False)
        self.dm.eval()
        try:
            with self.autocast:
                return sample_continuations(lambda ids, cache: self.dm(ids, cache=cache), prompts, n_new,
                                            self.cfg.sample_temperature, seeds, self.make_cache)
        finally:
            self.dm.train()
            for m in fsdp:
                m.reshard()
                m.set_reshard_after_forward(True)

    def _phase(self, name: str):
        return self.phase_timer(name) if self.phase_timer is not None else contextlib.nullcontext()

    def step(self, step: int, ids: torch.Tensor) -> dict:
        """One optimizer step on this rank's token batch ``ids`` (int64 [B/W, S] on the device); returns the
        global (all-rank mean) loss parts, lr, grad norm and whether the continuations were on-policy."""
        lr = lr_at(step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        ids, rows, weights, on_policy = self._rows(step, ids)
        with self._phase("teacher_forward"), torch.no_grad(), \
                capture_layer_outputs(decoder_layers(self.teacher), self.layers) as t_hidden:
            t_last = self.teacher.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        with self._phase("student_forward_and_loss"), self.autocast:
            loss, parts = self.dm(ids, teacher_last=t_last, teacher_head=self.teacher.get_output_embeddings().weight,
                                  teacher_hidden=t_hidden if self.layers else None, rows=rows, row_weights=weights)
        with self._phase("backward"):
            loss.backward()
        del t_hidden, t_last
        with self._phase("optimizer"):
            clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
            if self.masters is not None:
                self.masters.grads_from_model()
            gnorm = torch.nn.utils.clip_grad_norm_(self.opt_params, clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self._update_ema()
            if self.masters is not None:
                self.masters.copy_to_model()
        names = ["loss", *parts]
        vals = torch.stack([loss.detach().float(), *[v.float() for v in parts.values()]])
        vals = parallel.all_reduce_sum(vals, self.env) / self.env.world
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        return {"step": step + 1, "lr": lr, "grad_norm": gnorm, "on_policy": on_policy,
                **{n: float(v) for n, v in zip(names, vals.tolist())}}


def _run(cfg: DistillConfig, env) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.precision is None:
        cfg.precision = "bf16-mixed" if env.device.type == "cuda" else "fp32"
    if cfg.precision == "bf16-master" and env.is_dist:
        raise ValueError(BF16_MASTER_DIST_ERROR)
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _prepare_output(cfg, env)
    torch.manual_seed(cfg.seed)

    # models: teacher frozen bf16; student fp32 master weights (bf16 under bf16-master, its fp32 masters live in
    # the Distiller), only the language stack trainable
    t_load = time.perf_counter()
    # the models' files, then the data: a bad file is reported before the models load (minutes at E4B's size)
    check_checkpoint(cfg.teacher, "--teacher")
    check_checkpoint(cfg.student, "--student")
    tokenizer = pair_tokenizer(cfg.student, cfg.teacher)
    data = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.max_tokens, config_vocab_size(cfg.student))
    # a file written by python -m distill.select carries what it was chosen from (and the tokens it scored)
    if cfg.data is not None:
        data.selection = read_selection_meta(cfg.data, data.sha256)
        if data.selection:
            check_selection_use(data.selection, cfg.data, cfg.seq_len, cfg.max_tokens)
    # the models' sha256, hashed while they load: for the lineage (written by the main rank), and what a training
    # checkpoint is checked against on --resume (beside the settings and the data)
    checked = bool(cfg.ckpt_every or cfg.resume)
    with contextlib.ExitStack() as stack:
        hashes = {}
        for name, ckpt in (("teacher", cfg.teacher), ("student", cfg.student)):
            if checked or env.is_main:
                hashes[name] = h = CheckpointHash(ckpt)
                stack.callback(h.close)
        return _train(cfg, env, tokenizer, data, hashes, t_load)


def _train(cfg: DistillConfig, env, tokenizer, data, hashes: dict, t_load: float) -> dict:
    """:func:`_run` from loading the models on; ``hashes``: the models' :class:`CheckpointHash`, started."""
    teacher = load_model(cfg.teacher, torch.bfloat16, env.device, cfg.attn)
    student = load_model(cfg.student, student_dtype(cfg.precision), env.device, cfg.attn)
    check_pair(teacher, student, cfg.teacher, cfg.student)
    dz = Distiller(cfg, env, teacher, student, _eos_ids(student, tokenizer))
    hashed: dict = {}

    def identity() -> dict:
        """The models' and the tokenizer's sha256, waited for when first needed (a --resume's check, a training
        checkpoint), so that training starts while they hash: every rank's with --ckpt-every / --resume, else only
        the main rank's, which writes the checkpoints' meta."""
        if not hashed and "student" in hashes:
            hashed.update(teacher=hashes["teacher"].result(), student=hashes["student"].result(),
                          tokenizer=data.tokenizer_sha256)
        return hashed
    load_s = time.perf_counter() - t_load
    _start_fresh(cfg, env)
    log = _Log(env, cfg.log_json, append=cfg.resume)   # (opened here: "w" empties an earlier run's log)

    # resume
    start, history = 0, []
    hardware = [_hardware(env)]   # where each run segment's arithmetic ran (another resume adds its own)
    if cfg.resume:
        ck = latest_checkpoint(cfg.ckpt_dir)
        if ck is None:
            _no_usable_checkpoint(Path(cfg.ckpt_dir))   # raises if checkpoints are there but none can be used
            log.print(f"resume: no checkpoint in {cfg.ckpt_dir}; starting from step 0")
        else:
            try:
                meta = json.loads((ck / "meta.json").read_text())
                if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
                    raise ValueError("no config in meta.json")
            except (OSError, ValueError) as e:   # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
                raise ValueError(f"{ck}: damaged training checkpoint ({type(e).__name__}: {e}); resume from "
                                 f"another one, or run without --resume (with --force) to start over") from None
            want = cfg.result_dict()
            # a setting missing from an older checkpoint did not exist yet: that run had its default's behaviour (new
            # options default to the old behaviour: --adam-eps torch's eps, --ema-decay no average, --ce-weight no
            # data term); a field whose default is resolved per phase (None here) still counts as different
            had = {**{k: getattr(DistillConfig, k, None) for k in want}, **meta["config"]}
            diff = sorted(k for k in set(want) | set(had) if want.get(k) != had.get(k))
            made = meta.get("models_sha256") or {}   # (a checkpoint from before the check has none)
            other = sorted(k for k in made if k in identity() and made[k] != identity()[k])
            if other:   # the same paths, other models: the loss would jump, the lineage name the new teacher
                raise ValueError(f"{ck}: checkpoint was made with another {' and '.join(other)} (sha256 differs: "
                                 f"replaced since?); resume with the models it was made with, or --force to start "
                                 f"over")
            if meta.get("data_sha256", data.sha256) != data.sha256:  # the same path, rewritten since
                raise ValueError(f"{ck}: checkpoint was trained on other data ({data.source} has changed since: "
                                 "its sha256 differs); resume with the data it was made with, or --force to start "
                                 "over")
            if diff:
                raise ValueError(f"{ck}: checkpoint was made with different settings ({', '.join(diff)}); "
                                 "rerun with the same ones, or --force to start over")
            trained = meta.get("trainable")   # (a checkpoint from before the record has none)
            if trained is not None and trained != dz.trainable:   # the same settings, another pdqkit's choice
                new = sorted(set(dz.trainable) ^ set(trained))
                which = f"{new[0]}, ..." if new else "another order"
                raise ValueError(f"{ck}: checkpoint trained other parameters than this run would ({which}: made by "
                                 f"another pdqkit version?); resume with that version, or --force to start over")
            meta = _load_state(dz, ck)
            start, history = int(meta["step"]), list(meta["history"])
            log.print(f"resume: continuing from {ck} (step {start}/{cfg.steps})")
            # (a checkpoint from before the record has none: its segment's hardware is unknown)
            hardware = _resumed_hardware(meta.get("hardware") or [{"device": "not recorded"}], hardware[0], ck, log)
        log.rewind(start)

    tokens_per_step = cfg.batch * cfg.seq_len
    log.print(f"distill phase {cfg.phase}: teacher {cfg.teacher} ({dz.n_teacher / 1e6:.1f}M matmul params), "
              f"student {cfg.student} ({dz.n_student / 1e6:.1f}M; {len(dz.trainable)} trainable tensors), "
              f"{env.world} rank(s) on {env.device.type}, {cfg.precision}; data {data.source} ({data.tokens:,} "
              f"tokens); {cfg.steps} steps x {cfg.batch} x {cfg.seq_len} = {cfg.steps * tokens_per_step:,} tokens; "
              f"load {load_s:.1f}s")
    if cfg.ema_decay:
        log.print(f"ema: writing the moving average (decay {cfg.ema_decay}); the student's starting weights keep a "
                  f"share of {cfg.ema_decay ** cfg.steps:.3g} of it after {cfg.steps} steps")
    if data.selection:
        sel = data.selection
        log.print(f"data: chosen by distill.select, {sel['kept_windows']:,} of {sel['pool_windows']:,} pooled windows "
                  f"by teacher-student KL ({sel['scored_tokens']:,} tokens scored forward-only)")
    if start == 0:
        log.record({"event": "config", "config": cfg.result_dict(), "world": env.world, "device": str(env.device),
                    "n_student": dz.n_student, "n_teacher": dz.n_teacher, "peak_tflops": cfg.peak_tflops})

    cuda = env.device.type == "cuda"  # synchronize before timing; MFU and peak memory

    def save(step: int) -> Path:
        """The training checkpoint after ``step`` completed steps."""
        return dz.save_state(cfg.ckpt_dir, step, {"config": cfg.result_dict(), "history": history,
                                                  "data_sha256": data.sha256, "models_sha256": identity(),
                                                  "hardware": hardware, "trainable": dz.trainable})

    t_int, step_int = time.perf_counter(), 0
    # SIGINT / SIGTERM: finish the step, write a training checkpoint, stop (distill/stop.py)
    with stop_after_step(announce=env.is_main, torchrun=env.is_dist) as stop:
        for step in range(start, cfg.steps):
            ids = data.batch(step, cfg.batch, env.rank, env.world, cfg.seed).to(env.device)
            rec = dz.step(step, ids)
            parts = loss_parts(rec)
            history.append({"step": rec["step"], "on_policy": rec["on_policy"], "loss": rec["loss"], **parts})
            step_int += 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                if cuda:
                    torch.cuda.synchronize(env.device)
                dt = time.perf_counter() - t_int
                rec["tokens_per_s"] = tokens_per_step * step_int / dt
                rec["tokens_seen"] = (step + 1) * tokens_per_step
                rec["mfu"] = None
                if cuda:
                    rec["mfu"] = dz.flops_per_token * rec["tokens_per_s"] / (cfg.peak_tflops * 1e12 * env.world)
                    # peak allocated since the start, per rank (GB)
                    rec["peak_mem_gb"] = parallel.gather_float(torch.cuda.max_memory_allocated(env.device) / 1e9,
                                                               env)
                extra = " ".join(f"{n} {rec[n]:.4f}" for n in parts if "/" not in n)
                mfu = f" | MFU {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else ""
                pol = (f" | on-policy {sum(h['on_policy'] for h in history)}/{len(history)} steps"
                       if cfg.phase == 2 else "")
                log.print(f"step {step + 1}/{cfg.steps} | loss {rec['loss']:.4f} ({extra}) | lr {rec['lr']:.2e} | "
                          f"gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s{mfu}{pol}")
                t_int, step_int = time.perf_counter(), 0
            log.record({"event": "step", **rec})
            saved = None
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
                t_ck = time.perf_counter()
                saved = save(step + 1)
                t_int += time.perf_counter() - t_ck  # checkpoint time is not training time
            if stop_agreed(stop, env):   # (also after the last step: the output is not written yet)
                try:
                    saved = saved or save(step + 1)
                except Exception as e:   # (a second signal, a KeyboardInterrupt, ends the run at once)
                    raise TrainingStopped(stop.name, step + 1, cfg.steps, None, e) from e
                log.record({"event": "stopped", "step": step + 1, "signal": stop.name, "checkpoint": str(saved)})
                raise TrainingStopped(stop.name, step + 1, cfg.steps, saved, None)

    # sampled tokens from the whole history (a resumed run restores the steps before its checkpoint)
    generated = sum(h["on_policy"] for h in history) * cfg.batch * cfg.max_new_tokens
    summary = _summary(cfg, data, history, generated, dz.layers, dz.layer_w, env)
    summary["hardware"] = hardware
    dz.use_ema()  # --ema-decay: the average is what is written (the logged losses are the raw weights')
    _save(cfg, env, dz.dm, student, dz.trainable, tokenizer, summary, hashes)
    # OUT is in place (on the main rank): a stop signal from now on interrupts only the cleanup, and must say so,
    # not "nothing was written" and "--resume continues", which an existing OUT would then refuse
    try:
        parallel.barrier(env)
        log.record({"event": "summary", **summary})
        log.close()
        if env.is_main and not cfg.keep_ckpt:
            clear_checkpoints(cfg.ckpt_dir)
    except KeyboardInterrupt:
        left = f"; the training checkpoints in {cfg.ckpt_dir} may remain (delete them)" if not cfg.keep_ckpt else ""
        raise OutputWritten(f"{cfg.out} was written; interrupted while cleaning up after it{left}") from None
    return summary



def _hardware(env) -> dict:
    """Where this process's arithmetic runs: the device type and, on CUDA, the GPU's name, on the CPU the thread
    count. Another GPU model or thread count rounds differently (the same training, other bytes), so the lineage
    and the training checkpoints record it. (Rank 0's; every rank of a run has the same device type.)"""
    if env.device.type == "cuda":
        return {"device": "cuda", "name": torch.cuda.get_device_name(env.device)}
    return {"device": env.device.type, "threads": torch.get_num_threads()}


def _resumed_hardware(before: list, now: dict, ck, log) -> list:
    """The hardware list of a resumed run: the checkpoint's segments, then this one's if it differs from the last.
    A change is allowed (moving a run to another machine is why one resumes) but printed, because the result is
    then not the bytes an uninterrupted run would have written."""
    if before[-1] == now:
        return list(before)
    show = lambda h: ", ".join(f"{k} {v}" for k, v in h.items())  # noqa: E731
    log.print(f"resume: {ck} was trained on ({show(before[-1])}), this run is on ({show(now)}): the same training, "
              f"rounded differently, so the weights will not be the bytes of an uninterrupted run")
    return [*before, now]


def _summary(cfg, data, history, gen_tokens, layers, layer_w, env) -> dict:
    last = history[-min(10, len(history)):]
    mean = lambda k: sum(h[k] for h in last) / len(last)  # noqa: E731
    if cfg.phase == 1:
        losses = {"forward_kl": {"weight": 1.0, "temperature": cfg.temperature}}
        if cfg.ce_weight:
            losses["data_ce"] = {"weight": cfg.ce_weight, "temperature": 1.0,
                                 "targets": "the data's next token; each sequence's last position has none"}
        if layers:
            losses["hidden_mse"] = {"weight": cfg.hidden_weight, "layers": layers,
                                    "layer_weights": [w / cfg.hidden_weight for w in layer_w],
                                    "normalisation": "per-token ||h_s-h_t||^2/||h_t||^2, mean over tokens"}
    else:
        losses = {"gjsd": {"beta": cfg.beta, "temperature": cfg.jsd_temperature, "convention": "trl"},
                  "on_policy": {"lmbda": cfg.lmbda, "sample_temperature": cfg.sample_temperature,
                                "max_new_tokens": cfg.max_new_tokens}}
        if layers:
            losses["hidden_mse"] = {"weight": cfg.hidden_weight, "layers": layers}
    keys = ["loss", *loss_parts(history[-1], per_layer=False)]
    return {
        "phase": cfg.phase, "losses": losses, "steps": cfg.steps, "batch": cfg.batch, "seq_len": cfg.seq_len,
        "lr": cfg.lr, "min_lr_ratio": cfg.min_lr_ratio, "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay, "adam_betas": list(cfg.adam_betas), "adam_eps": cfg.adam_eps,
        "grad_clip": cfg.grad_clip, "seed": cfg.seed,
        **({"ema": {"decay": cfg.ema_decay, "start_weight": cfg.ema_decay ** cfg.steps,
                    "losses_of": "the raw weights; the written weights are their moving average"}}
           if cfg.ema_decay else {}),
        "precision": cfg.precision, "train_embeddings": cfg.train_embeddings,
        "trainable": cfg.trainable, "world_size": env.world,
        **({"deterministic": True} if cfg.deterministic else {}),
        "tokens_seen": cfg.steps * cfg.batch * cfg.seq_len,
        **({"generated_tokens": gen_tokens} if cfg.phase == 2 else {}),
        "loss_first": {k: history[0][k] for k in keys},
        "loss_last10": {k: mean(k) for k in keys},
        "data": {"source": data.source, "sha256": data.sha256, "tokenizer_sha256": data.tokenizer_sha256,
                 "tokens_available": data.tokens, **({"selection": data.selection} if data.selection else {})},
    }


def _save(cfg, env, dm, student, trainable, tokenizer, summary, hashes: dict) -> None:
    """Gather the trained weights to rank 0 and write OUT (bf16, lineage step 'distill'); ``hashes``: the models'
    :class:`CheckpointHash` (the main rank's)."""
    from pack.checkpoint import lineage_step, save_bf16_checkpoint

    if env.is_dist:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(dm, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=True))
        sd = {k.removeprefix("student."): v for k, v in sd.items()}  # (non-main ranks get {})
    else:
        # (bf16-master: the bf16 weights, i.e. the fp32 masters rounded to nearest)
        sd = {n: p.detach().to("cpu") for n, p in student.named_parameters() if p.requires_grad}
    if env.is_main:
        model = load_model(cfg.student, torch.bfloat16, "cpu", cfg.attn)
        own = dict(model.named_parameters())
        missing = sorted(n for n in trainable if n not in sd or n not in own)
        if missing:
            raise RuntimeError(f"trained weights {missing[:3]} missing from the gathered state or {cfg.student}")
        with torch.no_grad():
            for n in trainable:
                own[n].copy_(sd[n])
        # both models by absolute path (as typed, a path differs from one working directory to the next) and by
        # the sha256 of their weight files: each file's (as the base and prune steps record theirs, so the student
        # pins the pruned checkpoint it was), and the digest of those a training checkpoint is checked against
        for role, path in (("teacher", cfg.teacher), ("student", cfg.student)):
            summary[role] = {"path": str(Path(path).resolve()), "sha256": hashes[role].result(),
                             "files_sha256": hashes[role].files_sha256()}
        step = lineage_step("distill", **summary)
        save_bf16_checkpoint(model, cfg.out, source_dir=cfg.student, step=step,
                             tokenizer=tokenizer if not any(Path(cfg.student).glob("tokenizer*")) else None,
                             force=cfg.force, fsync=True, source_files_sha256=summary["student"]["files_sha256"])
        print(f"wrote {cfg.out} (phase {cfg.phase}, {summary['tokens_seen']:,} tokens, "
              f"loss {summary['loss_first']['loss']:.4f} -> {summary['loss_last10']['loss']:.4f})", flush=True)
