"""SIGINT (Ctrl-C) and SIGTERM (timeout, Slurm, ``docker stop``) as a KeyboardInterrupt, for the command-line tools.

By default SIGTERM kills a Python process on the spot: a run writing its output would leave its hidden temp dir
(a whole checkpoint, ~15 GB at E4B's size) behind. Raised as a KeyboardInterrupt instead, it unwinds through
:func:`pack.checkpoint.atomic_output_dir`, which removes what the run wrote (or puts back what it moved aside), and
the tool prints one line and exits 130.

A KeyboardInterrupt raised inside the standard library's thread machinery (threading, queue,
concurrent.futures) can leave it broken: seen in CI, a SIGTERM during ``Thread.start`` surfaced as
``RuntimeError: release unlocked lock``; seen in a mutation audit, one inside ``Queue.put`` left the queue's lock
held (raised after the lock's acquire, before the ``with`` that releases it), and the cleanup that put to that
queue hung. So a signal that arrives while the main thread runs that code is owed, not raised: the handler traces
the main thread (as pdb's ``set_trace`` does: ``f_trace`` on the frames, ``sys.settrace``) and raises the
KeyboardInterrupt at the first line the main thread runs outside it, at a statement boundary of the caller's code.
A wait in the machinery (a lock, ``Future.result``) ends first; the tools' waits there are short (a row block's
quantization, a queue slot). The arrival is recorded at once, without a lock (the :class:`Arrival` that
:func:`stop_signals_interrupt` yields), and a tool reports whatever exception follows it as the interruption.
Standard library only.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import queue
import signal
import sys
import threading
from typing import Iterator

__all__ = ["STOP_SIGNALS", "Arrival", "stop_signal_handlers", "stop_signals_interrupt", "held_stop_signals",
           "report_failure", "interrupted_message"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# the code a KeyboardInterrupt must not be raised in: threading's and queue's modules, concurrent.futures' package
_MACHINERY_FILES = frozenset(os.path.realpath(m.__file__) for m in (threading, queue))
_MACHINERY_DIR = os.path.dirname(os.path.realpath(concurrent.futures.__file__)) + os.sep


@functools.lru_cache(maxsize=None)
def _is_machinery(filename: str) -> bool:
    path = os.path.realpath(filename)
    return path in _MACHINERY_FILES or path.startswith(_MACHINERY_DIR)


def _in_thread_machinery(frame) -> bool:
    """True if ``frame`` (the main thread's innermost Python frame when a handler runs) is thread machinery."""
    return frame is not None and _is_machinery(frame.f_code.co_filename)


class Arrival:
    """Whether a stop signal arrived in the block: :meth:`is_set`. A plain flag, not a threading.Event: the handler
    may run inside the Event's own lock (a second signal while the first handler sets it)."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class _Owed:
    """A KeyboardInterrupt owed to the main thread since a signal came while it ran thread machinery: raised by a
    trace function at the first event of a frame outside that machinery (and outside this module)."""

    def __init__(self):
        self.frames: list = []  # (frame, its f_trace before): put back when the interrupt is raised
        self.previous = None  # the thread's trace function before (a debugger's, coverage's)
        self.tracing = False  # sys.settrace is ours

    def arm(self, frame) -> None:
        if not self.tracing:  # (armed again after an interrupt was raised: the one before is still the first's)
            self.previous, self.tracing = sys.gettrace(), True
        while frame is not None:
            self.frames.append((frame, frame.f_trace))
            frame.f_trace = self.trace
            frame = frame.f_back
        sys.settrace(self.trace)  # frames called from now on

    @property
    def armed(self) -> bool:
        return bool(self.frames)

    def _put_back_frames(self) -> None:
        for f, t in self.frames:
            f.f_trace = t
        self.frames.clear()

    def disarm(self) -> None:
        """Put back the frames' and the thread's trace functions (at the block's exit)."""
        self._put_back_frames()
        if self.tracing:
            sys.settrace(self.previous)
            self.tracing = False

    def trace(self, frame, event, arg):
        name = frame.f_code.co_filename
        if name == __file__:
            return None  # the handler's own frames, the block's exit
        if _is_machinery(name):
            return self.trace  # its lines: still inside
        # Python unsets the thread's trace function when one raises: disarm() puts back the one before at the
        # block's exit
        self._put_back_frames()
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signal_handlers(handler) -> Iterator[dict]:
    """Within the block, ``handler(signum, frame)`` handles SIGINT and SIGTERM; yields the handlers it replaced, by
    signal. A signal the process was started with ignored (``nohup``, ``cmd &``) stays ignored; off the main thread
    (where handlers cannot be installed) nothing changes. The previous handlers are put back on exit."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:
                old[s] = signal.signal(s, handler)
    try:
        yield old
    finally:
        # blocked while the handlers are put back: one arriving now would raise out of a finished block (after
        # a committed output) or leave this handler installed; it is delivered to the restored handler instead
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if old and hasattr(signal,
                                                                                         "pthread_sigmask") else None
        try:
            for s, h in old.items():
                if h is not None:  # None: a handler not installed from Python, which cannot be put back
                    signal.signal(s, h)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[Arrival]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, outside the thread
    machinery (see the module's text); yields an :class:`Arrival`, set as soon as one arrived. Installed by
    :func:`stop_signal_handlers` (its rules: ignored signals, the main thread, the handlers put back)."""
    arrived, owed = Arrival(), _Owed()

    def handler(signum, frame):
        arrived.set()
        if owed.armed:
            return  # one KeyboardInterrupt is owed already
        if _in_thread_machinery(frame):
            owed.arm(frame)
            return
        raise KeyboardInterrupt

    with stop_signal_handlers(handler):
        try:
            yield arrived
        finally:
            # owed and not raised: the block's work ended inside the machinery (its last call), nothing is left
            # to stop
            owed.disarm()


@contextlib.contextmanager
def held_stop_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are held: steps that must happen together, like two renames, are not
    cut between them. The first one that arrived meanwhile is sent again as the block ends, to the handlers in
    force before it (so its KeyboardInterrupt, or its default action, comes from the block's exit, after them).
    Held by a recording handler, not by ``pthread_sigmask``: a signal sent to the process goes to any thread that
    does not block it (torch's own threads), and Python then runs the main thread's handler all the same."""
    held: list[int] = []

    def record(signum, frame):
        if not held:
            held.append(signum)

    try:
        with stop_signal_handlers(record):
            yield
    finally:
        if held:
            os.kill(os.getpid(), held[0])


def report_failure(tool: str, e: BaseException, interrupted: Arrival, errors: tuple, *, say: bool = True,
                   then=lambda: "") -> int | None:
    """What ``python -m prune``, ``distill`` and ``distill.select`` do with an exception that ended their work in
    :func:`stop_signals_interrupt`: print one line (``tool: error: ...``; only if ``say``) and return the exit
    status, or None for one that is not theirs to report (a bug: re-raise it, traceback and all).

    An interruption once the output was in place (:class:`pack.checkpoint.InterruptedAfterCommit`) says what was
    written, 130; any other one (a KeyboardInterrupt, or whatever exception the signal turned into) says nothing
    was written, plus ``then()``, 130; an instance of ``errors`` is its message, with :func:`pack.errors.cli_status`
    (2 for the input or the invocation, 1 for the machine)."""
    from .checkpoint import InterruptedAfterCommit
    from .errors import cli_status

    if isinstance(e, InterruptedAfterCommit):
        msg, rc = f"interrupted: {e}", 130
    elif isinstance(e, KeyboardInterrupt) or interrupted.is_set():
        msg, rc = interrupted_message(e) + then(), 130
    elif isinstance(e, errors):
        msg, rc = str(e), cli_status(e)
    else:
        return None
    if say:
        print(f"{tool}: error: {msg}", file=sys.stderr)
    return rc


def interrupted_message(e: BaseException) -> str:
    """The one line a tool prints for an interruption that turned into ``e``: ``interrupted; nothing was written``,
    with the KeyboardInterrupt's own text if it has one (what :func:`pack.checkpoint.atomic_output_dir` found while
    cleaning up), or naming the other exception the signal turned into."""
    first = (str(e).splitlines() or [""])[0]
    if isinstance(e, KeyboardInterrupt):
        then = f"; {first}" if first else ""
    else:
        then = f" (then {type(e).__name__}: {first})"
    return f"interrupted{then}; nothing was written"
