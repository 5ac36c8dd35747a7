"""Training checkpoints for ``--ckpt-every N`` / ``--resume``: a killed run continues to the same weights.

Layout of ``CKPT_DIR`` (default ``OUT-ckpt``)::

    step-00000040/          torch.distributed.checkpoint (DCP) of {"model": trainable params, "optim": AdamW}
                            (+ "ema": the --ema-decay moving average, by parameter name)
                            (sharded per rank under FSDP2; fp32 master weights and moments, bit-exact;
                            under --precision bf16-master the module is the Distiller's MasterWeights: the
                            fp32 masters by the same parameter names, the bf16 weights are them rounded)
        meta.json           step, the run's result-determining config, loss history, data position
        rng-rank{r}.pt      torch CPU (and CUDA) RNG state of rank r
    latest                  name of the newest complete step dir (replaced atomically, written last)

A step dir is written under a temp name and renamed once every rank has finished, then ``latest`` is
replaced; so ``kill -9`` at any moment leaves the previous checkpoint usable. Frozen parameters (towers,
embeddings) are not saved: they are re-read from the student checkpoint. The data position is the step
itself (batches are a pure function of seed and step, see :mod:`distill.data`), as is every random draw of
phase 2 (:mod:`distill.sample`); the RNG states are saved anyway so nothing else can drift.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .parallel import DistEnv, barrier

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "clear_checkpoints"]

LATEST = "latest"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


STEP_NAME = re.compile(r"step-\d{8}")  # what save_checkpoint names a step dir: f"step-{step:08d}"


def _step_dirs(ckpt_dir) -> list[Path]:
    """The step dirs of ``ckpt_dir`` by name (a user's ``step-notes`` there is not one)."""
    return [d for d in Path(ckpt_dir).glob("step-*") if STEP_NAME.fullmatch(d.name)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete step dir of ``ckpt_dir`` (None if there is none): the one ``latest`` names, or without
    ``latest`` the newest step dir (a step dir is renamed into place only once complete, and ``latest`` written
    after it: a kill -9 in between leaves a complete step dir and no ``latest``)."""
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        steps = sorted(d for d in _step_dirs(ckpt_dir) if (d / "meta.json").is_file())
        return steps[-1] if steps else None
    d = Path(ckpt_dir) / f.read_text().strip()
    return d if (d / "meta.json").is_file() else None


def clear_checkpoints(ckpt_dir: str | os.PathLike) -> None:
    """Delete what :func:`save_checkpoint` writes into ``ckpt_dir`` (step dirs, their temp dirs, ``latest``) and
    then the directory itself only if that left it empty: anything else in it is the user's and stays."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return
    for f in [*_step_dirs(d), *(t for t in d.glob(".step-*.tmp") if STEP_NAME.fullmatch(t.name[1:-4]))]:
        shutil.rmtree(f, ignore_errors=True)
    for f in (d / LATEST, d / f".{LATEST}.tmp"):
        f.unlink(missing_ok=True)
    try:
        d.rmdir()
    except OSError:  # not empty: other files live there
        pass


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, module, optimizer, env: DistEnv, meta: dict,
                    extra: dict | None = None) -> Path:
    """Write the state after ``step`` completed steps (collective: every rank calls it). ``extra``: more named
    groups of tensors saved beside model and optimizer (``{"ema": {name: tensor}}``), local shards as they are."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_dir = Path(ckpt_dir)
    name = f"step-{step:08d}"
    tmp = ckpt_dir / f".{name}.tmp"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(env)
    msd, osd = get_state_dict(module, optimizer, options=_options())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd, **(extra or {})}, checkpoint_id=str(tmp))
    rng = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(env.device)
    torch.save(rng, tmp / f"rng-rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        from pack.checkpoint import fsync_dir, fsync_tree

        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world": env.world}, indent=1,
                                                  sort_keys=True) + "\n")
        # durable before it is named: every rank's files (one directory they all wrote, after the barrier), then
        # the rename, then `latest`, so a power loss never leaves `latest` naming data that did not reach the disk
        # after the older steps were deleted
        fsync_tree(tmp)
        final = ckpt_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        latest_tmp = ckpt_dir / f".{LATEST}.tmp"
        latest_tmp.write_text(name + "\n")
        fsync_tree(latest_tmp)
        os.replace(latest_tmp, ckpt_dir / LATEST)
        fsync_dir(ckpt_dir)
        for old in _step_dirs(ckpt_dir):  # keep only the newest
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return ckpt_dir / name


def load_checkpoint(path: str | os.PathLike, module, optimizer, env: DistEnv, extra: dict | None = None) -> dict:
    """Load a step dir written by :func:`save_checkpoint` into ``module``/``optimizer`` (and the tensors of
    ``extra``, which DCP fills in place, as passed to the save); returns its meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("world", 1) != env.world:   # ranks shard the data and hold their own RNG: another count, another run
        raise ValueError(f"{path}: checkpoint written by {meta.get('world', 1)} rank(s), this run has {env.world}; "
                         "resume with the same number of processes, or --force to start over")
    rng_f = path / f"rng-rank{env.rank}.pt"
    if not rng_f.is_file():
        raise ValueError(f"{path}: {rng_f.name} is missing (an incomplete checkpoint); resume from another one, or "
                         "--force to start over")
    msd, osd = get_state_dict(module, optimizer, options=_options())
    state = {"model": msd, "optim": osd, **(extra or {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())
    rng = torch.load(rng_f, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and env.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], env.device)
    if env.is_dist:
        dist.barrier()
    return meta
