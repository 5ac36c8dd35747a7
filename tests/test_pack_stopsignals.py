"""pack.stopsignals: SIGTERM and SIGINT become a KeyboardInterrupt in the main thread, but never inside the
standard library's thread machinery, whose locks an exception raised at the wrong bytecode leaves held."""
from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import traceback

import pytest

from pack.stopsignals import stop_signals_interrupt


def _send_later(sig, delay: float, seen: list | None = None, arrived=None):
    def run():
        time.sleep(delay)
        os.kill(os.getpid(), sig)
        if seen is not None:
            time.sleep(0.05)
            seen.append(arrived.is_set())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_wait_in_threading_is_raised_once_back_in_the_callers_code(sig):
    """Main thread in ``Event.wait`` (threading's code) when the signal comes: the arrival is recorded at once, the
    wait runs to its end, and the KeyboardInterrupt comes out in the caller's frame, not in threading.py."""
    seen: list = []
    with stop_signals_interrupt() as arrived:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt) as e:
            _send_later(sig, 0.05, seen, arrived)
            threading.Event().wait(0.5)
            for _ in range(1000):  # Python's next check of pending signals comes within these bytecodes
                pass
            pytest.fail("the signal never arrived")
        waited = time.monotonic() - t0
    assert seen == [True]  # recorded while the wait went on
    assert waited >= 0.5
    frames = [f.filename for f in traceback.extract_tb(e.value.__traceback__)]
    assert frames[0] == __file__ and not {"threading.py", "queue.py"} & {os.path.basename(f) for f in frames}, frames


def test_a_signal_in_the_callers_code_is_raised_at_once():
    with stop_signals_interrupt() as arrived:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            _send_later(signal.SIGTERM, 0.05)
            time.sleep(10)
        assert time.monotonic() - t0 < 5 and arrived.is_set()


def test_a_queue_is_never_left_locked():
    """The main thread busy in ``Queue.put``/``get`` (most of its time inside queue.py and threading.py) when the
    signal comes, many times over: the queue's lock is free afterwards every time (before, an interrupt between
    the lock's acquire and the ``with`` that releases it left it held, and the writer's cleanup hung on it)."""
    q: queue.Queue = queue.Queue(maxsize=2)
    for i in range(200):
        with stop_signals_interrupt():
            try:
                _send_later(signal.SIGTERM, 0.0005 * (i % 7))
                while True:
                    q.put(i)
                    q.get()
            except KeyboardInterrupt:
                pass
        assert q.mutex.acquire(blocking=False), f"trial {i}: the queue's lock was left held"
        q.mutex.release()
        assert q.empty() or q.get_nowait() == i


def test_handlers_are_put_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals_interrupt():
        assert all(signal.getsignal(s) is not h for s, h in before.items())
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_trace_function_already_in_place_is_put_back():
    """The owed interrupt is raised by a trace function (pdb's mechanism): a debugger's or coverage's own trace
    function, in place before, is in place again afterwards."""
    def mine(frame, event, arg):
        return None

    sys.settrace(mine)
    try:
        with stop_signals_interrupt():
            with pytest.raises(KeyboardInterrupt):
                _send_later(signal.SIGTERM, 0.05)
                threading.Event().wait(0.3)
                for _ in range(1000):
                    pass
        assert sys.gettrace() is mine
    finally:
        sys.settrace(None)
