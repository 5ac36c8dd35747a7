"""SIGINT (Ctrl-C) and SIGTERM (timeout, Slurm, ``docker stop``) as a KeyboardInterrupt, for the command-line tools.

By default SIGTERM kills a Python process on the spot: a run writing its output would leave its hidden temp dir
(a whole checkpoint, ~15 GB at E4B's size) behind. Raised as a KeyboardInterrupt instead, it unwinds through
:func:`pack.checkpoint.atomic_output_dir`, which removes what the run wrote (or puts back what it moved aside), and
the tool prints one line and exits 130.

The KeyboardInterrupt lands wherever the main thread is, possibly inside threading's own locking (seen in CI: a
SIGTERM during ``Thread.start`` surfaced as ``RuntimeError: release unlocked lock``). So the arrival is recorded
first (the event :func:`stop_signals_interrupt` yields), and a tool reports whatever exception follows it as the
interruption. Standard library only.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["STOP_SIGNALS", "stop_signals_interrupt", "interrupted_message"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[threading.Event]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread; yields an Event set when
    one arrived. A signal the process was started with ignored (``nohup``, ``cmd &``) stays ignored; off the main
    thread (where handlers cannot be installed) nothing changes. The previous handlers are put back on exit."""
    arrived = threading.Event()

    def handler(signum, frame):
        arrived.set()
        raise KeyboardInterrupt

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:
                old[s] = signal.signal(s, handler)
    try:
        yield arrived
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
