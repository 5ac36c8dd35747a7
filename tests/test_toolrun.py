"""bench/toolrun.py runs ``python -m TOOL`` as a fork of a preloaded forkserver; the reference is a real
``python -m TOOL`` started by subprocess with the same arguments, working directory and environment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.toolrun import ToolRunner

REPO = Path(__file__).resolve().parents[1]

TOOL = '''
import atexit, os, sys
atexit.register(lambda: print("atexit ran", flush=True))
print("name", __name__, "argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("PDQ_TOOLRUN_T"))
print("path0", sys.path[0] == os.getcwd())
print("to stderr", file=sys.stderr, flush=True)
print("preloaded", "json.decoder" in sys.modules)
mode = sys.argv[1]
if mode == "thread":  # a non-daemon thread and a pool job still running when the module ends
    import threading, time
    from concurrent.futures import ThreadPoolExecutor
    done = threading.Event()  # the pool job prints after the thread: a fixed order to compare, not a race
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True), done.set())).start()
    ThreadPoolExecutor(1).submit(lambda: (done.wait(), print("pool job done", flush=True)))
if mode == "none":
    sys.exit(None)
if mode == "interrupt":
    raise KeyboardInterrupt
if mode == "exit3":
    sys.exit(3)
if mode == "msg":
    sys.exit("bye")
if mode == "raise":
    raise ValueError("boom")
if mode == "sleep":
    import time
    time.sleep(120)
'''


@pytest.fixture(scope="module")
def runner():
    # json.decoder stands for the heavy modules: the tests must not import torch twice per case
    r = ToolRunner(preload=("json.decoder",))
    r.start()
    return r


def _reference(tmp_path, *args):
    r = subprocess.run([sys.executable, "-m", "pdq_toolrun_t", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    return r.returncode, r.stdout


@pytest.mark.parametrize("mode", ["ok", "none", "exit3", "msg", "raise", "interrupt", "thread"])
def test_same_exit_code_and_output_as_python_m(tmp_path, monkeypatch, runner, mode):
    (tmp_path / "pdq_toolrun_t.py").write_text(TOOL)
    monkeypatch.setenv("PDQ_TOOLRUN_T", f"set after the server started: {mode}")  # the caller's env at run time
    ref_code, ref_out = _reference(tmp_path, mode, "--x", "a b")
    got = runner.run([sys.executable, "-m", "pdq_toolrun_t", mode, "--x", "a b"], cwd=tmp_path, timeout=60)
    codes = {"ok": 0, "none": 0, "exit3": 3, "msg": 1, "raise": 1, "interrupt": -2, "thread": 0}
    assert not got.timed_out and got.returncode == ref_code == codes[mode]
    got_out = got.output
    if mode in ("raise", "interrupt"):  # the traceback's frames differ (runpy's vs toolrun's), not its first and last
        last = {"raise": "ValueError: boom", "interrupt": "KeyboardInterrupt"}[mode]
        assert "Traceback (most recent call last):\n" in ref_out and f"\n{last}\n" in ref_out
        got_out, ref_out = ("".join(x for x in o.splitlines(True) if not x.startswith("  ")) for o in (got_out, ref_out))
    # the one intended difference: what the forkserver imported ahead
    assert "preloaded True" in got_out and "preloaded False" in ref_out
    assert got_out.replace("preloaded True", "preloaded False") == ref_out
    assert f"name __main__ argv ['{mode}', '--x', 'a b'] cwd {tmp_path}" in ref_out and "atexit ran" in ref_out
    assert ("thread done" in ref_out and "pool job done" in ref_out) == (mode == "thread")


def test_timeout_kills_the_child(tmp_path, runner):
    (tmp_path / "pdq_toolrun_t.py").write_text(TOOL)
    got = runner.run([sys.executable, "-m", "pdq_toolrun_t", "sleep"], cwd=tmp_path, timeout=3)
    assert got.timed_out and got.returncode == -9 and "to stderr" in got.output


def test_parallel_runs_keep_their_exit_codes(tmp_path, runner, monkeypatch):
    """Runs from several threads at once: each gets its own child's exit status. multiprocessing reads a forkserver
    child's status from a socket and polls other live children whenever one starts; the read is slowed down here
    so that an unserialised second reader of the same child would see EOF (reported as status 255)."""
    import random
    import threading
    import time
    from multiprocessing import forkserver

    read = forkserver.read_signed

    def slow_read(fd):
        time.sleep(random.random() * 0.05)
        return read(fd)

    monkeypatch.setattr(forkserver, "read_signed", slow_read)
    (tmp_path / "pdq_code_t.py").write_text("import sys; sys.exit(int(sys.argv[1]))")
    got, threads = {}, []
    for t in range(4):
        def work(t=t):
            for i in range(6):
                got[(t, i)] = runner.run([sys.executable, "-m", "pdq_code_t", str(10 * t + i)], cwd=tmp_path).returncode
        threads.append(threading.Thread(target=work))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == {(t, i): 10 * t + i for t in range(4) for i in range(6)}


def test_refuses_anything_but_python_m(tmp_path, runner):
    for cmd in (["python3", "-m", "x"], [sys.executable, "x.py"], [sys.executable, "-m"]):
        with pytest.raises(ValueError, match="-m MODULE"):
            runner.run(cmd, cwd=tmp_path)


def test_children_are_separate_processes(tmp_path, runner):
    (tmp_path / "pdq_pid.py").write_text("import os; print(os.getpid(), os.getppid())")
    outs = [runner.run([sys.executable, "-m", "pdq_pid"], cwd=tmp_path).output.split() for _ in range(2)]
    (a, server), (b, server2) = outs
    assert a != b and server == server2 and int(server) != os.getpid() and int(a) != os.getpid()


CUDA_TOOL = '''
import os, torch
print("server", os.getppid(), "cuda initialised at start", torch.cuda.is_initialized())
x = torch.arange(4.0, device="cuda")
print("sum", float(x.sum()), torch.cuda.get_device_name())
'''

CUDA_CALLER = '''
import sys
from bench.toolrun import ToolRunner
if __name__ == "__main__":  # multiprocessing imports the caller's main script in every child: guard it
    r = ToolRunner()  # the default preload: torch, transformers' Gemma-4 modelling, ...
    r.start()
    for _ in range(2):
        o = r.run([sys.executable, "-m", "pdq_cuda_t"], cwd=sys.argv[1], timeout=120)
        assert o.returncode == 0, o.output
        print(o.output, end="")
'''

# What the forkserver does before it forks: the preload imports, with the environment ToolRunner.start() gives it.
# Then the CUDA driver itself is asked whether anyone called cuInit: cuDeviceGetCount answers
# CUDA_ERROR_NOT_INITIALIZED (3) until then.
PRELOAD_PROBE = '''
import ctypes, os
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
from bench.toolrun import PRELOAD
for m in PRELOAD:
    try:
        __import__(m)
    except ImportError:
        pass
n = ctypes.c_int(-1)
print("cuDeviceGetCount", ctypes.CDLL("libcuda.so.1").cuDeviceGetCount(ctypes.byref(n)))
import torch
torch.ones(1, device="cuda")  # the control: after a CUDA op the driver is initialised
print("after a CUDA op", ctypes.CDLL("libcuda.so.1").cuDeviceGetCount(ctypes.byref(n)), n.value > 0)
'''


@pytest.mark.gpu
def test_children_use_cuda_and_the_preload_never_initialises_it(tmp_path):
    """Each child initialises CUDA itself; the forkserver's preload (torch, transformers, ...) must never call
    cuInit: a fork after cuInit is undefined behaviour."""
    (tmp_path / "pdq_cuda_t.py").write_text(CUDA_TOOL)
    (tmp_path / "caller.py").write_text(CUDA_CALLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, str(tmp_path / "caller.py"), str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("cuda initialised at start False") == 2 and r.stdout.count("sum 6.0") == 2
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    r = subprocess.run([sys.executable, "-c", PRELOAD_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cuDeviceGetCount 3\n" in r.stdout and "after a CUDA op 0 True" in r.stdout, r.stdout
