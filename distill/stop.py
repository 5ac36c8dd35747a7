"""Ctrl-C and SIGTERM during training: stop after the step, with a training checkpoint to resume from.

A distillation run takes hours at E4B's size, and the signals that end it are often announced: Ctrl-C, a
scheduler's SIGTERM before it preempts or times out a job (Slurm's grace period), ``docker stop``. Killing the run
on the spot would throw away every step since the last ``--ckpt-every`` checkpoint, or all of them without one.
So within :func:`stop_after_step` the first SIGINT or SIGTERM only asks the loop to stop: the step that runs ends,
the ranks agree on it (:func:`stop_agreed`), a training checkpoint is written (:mod:`distill.state`, the same one
``--ckpt-every`` writes, so ``--resume`` continues to the weights of an uninterrupted run), and the run ends with
:class:`TrainingStopped`, which the CLI reports in one line with exit status 130.

A second signal stops at once: it goes to the handler that was in force before the block (the CLI's
:func:`pack.stopsignals.stop_signals_interrupt`: a KeyboardInterrupt that leaves nothing half-written), unless it
comes within :data:`REPEAT_S` of the first: one signal delivered twice, as by a launcher that forwards the terminal's
Ctrl-C to workers left in the terminal's process group. (torchrun starts its workers in sessions of their own and
forwards SIGINT / SIGTERM to them, then SIGKILLs them after its shutdown timeout, 30 s by default: the step and the
checkpoint must end within it; ``torchrun --shutdown-timeout N`` gives them longer.)
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import torch

from pack.checkpoint import InterruptedAfterCommit
from pack.stopsignals import stop_signal_handlers

from .parallel import DistEnv, all_reduce_sum

__all__ = ["REPEAT_S", "StopRequest", "TrainingStopped", "OutputWritten", "stop_after_step", "stop_agreed"]

REPEAT_S = 1.0  # a second signal sooner than this after the first is the same request, delivered twice


class StopRequest:
    """The first stop signal that reached this process in :func:`stop_after_step` (``signum``, None if none)."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0  # time.monotonic() of its arrival

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.requested else "no signal"


class TrainingStopped(Exception):
    """The loop stopped on a signal after ``step`` of ``steps`` completed steps; ``checkpoint``: the training
    checkpoint written for it (None if writing it failed: ``error``)."""

    def __init__(self, signame: str, step: int, steps: int, checkpoint: Path | None, error: BaseException | None):
        self.signame, self.step, self.steps, self.checkpoint, self.error = signame, step, steps, checkpoint, error
        if checkpoint is not None:
            msg = (f"interrupted ({signame}) after step {step}/{steps}: training checkpoint written to {checkpoint}; "
                   f"run the same command with --resume to continue")
        else:
            first = (str(error).splitlines() or [""])[0]
            msg = (f"interrupted ({signame}) after step {step}/{steps}, and its training checkpoint could not be "
                   f"written ({type(error).__name__}: {first}); nothing was written")
        super().__init__(msg)


class OutputWritten(InterruptedAfterCommit):
    """An interruption that came once the output was in place (while the run cleaned up after it, or between two
    renames that commit together): the CLI says the output was written, not "nothing was written" (after which
    distill's ``--resume`` would be refused: OUT exists). ``msg``: what was written, and what was interrupted."""

    def __init__(self, msg: str):
        KeyboardInterrupt.__init__(self, msg)


@contextlib.contextmanager
def stop_after_step(announce: bool = True, torchrun: bool = False) -> Iterator[StopRequest]:
    """Within the block, the first SIGINT / SIGTERM sets the yielded :class:`StopRequest` (and, if ``announce``,
    says on stderr what happens next); a later one, :data:`REPEAT_S` or more after it, is passed to the handler in
    force before the block (SIG_DFL or none: a KeyboardInterrupt). Main thread only, like any signal handler.

    ``torchrun``: the announcement adds that torchrun's agent, once it has the signal too (the terminal's Ctrl-C,
    a ``kill`` of the agent), SIGKILLs the workers after its shutdown timeout, 30 s unless ``--shutdown-timeout``
    / ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` says otherwise: the step and the checkpoint must end before it, or no
    checkpoint is written (the one before stays)."""
    req = StopRequest()
    tail = ("; torchrun SIGKILLs the workers after its --shutdown-timeout (30 s by default): give it the step's and "
            "a checkpoint's time" if torchrun else "")

    def handler(signum, frame):
        now = time.monotonic()
        if not req.requested:
            req.signum, req.at = signum, now
            if announce:   # (os.write: no buffered stream is entered from inside a handler)
                os.write(2, f"distill: {req.name}: stopping after this step to write a training checkpoint "
                            f"(again to stop at once, without one){tail}\n".encode())
            return
        if now - req.at < REPEAT_S:
            return
        before = old.get(signum)
        if callable(before):
            return before(signum, frame)
        raise KeyboardInterrupt

    with stop_signal_handlers(handler) as old:
        yield req


def stop_agreed(req: StopRequest, env: DistEnv) -> bool:
    """Whether the loop stops after this step: this process got a stop signal or, under torchrun, any rank did. One
    all-reduce per step keeps the ranks in step: a signal may reach them during different steps (the terminal's
    Ctrl-C), or only one of them (``kill`` of one worker), and every rank must take part in the checkpoint."""
    if not env.is_dist:
        return req.requested
    flag = torch.tensor([1.0 if req.requested else 0.0], device=env.device)
    return bool(all_reduce_sum(flag, env).item() > 0)
