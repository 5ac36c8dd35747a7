"""Run ``python -m TOOL ARGS`` in a child forked from one warm interpreter instead of a fresh one.

Why: every pdqkit tool begins by importing torch, transformers and Gemma-4's modelling code. On CI's two cores that
is 4-8 s of CPU per tool, more than a `micro` tool's whole work, and a pipeline call runs dozens of tools. A
``multiprocessing`` *forkserver* imports those modules once (``PRELOAD``); each tool is then a ``fork()`` of it that
runs the tool's ``__main__`` with ``runpy`` exactly as ``python -m`` would (``__name__ == "__main__"``, ``sys.argv``),
its stdout and stderr going to one file, as ``stderr=STDOUT`` would.

Why a forkserver and not a plain ``fork()`` of the caller: the caller may run threads (``--parallel``) and may
hold a CUDA context (it evaluates checkpoints in-process); forking such a process is unsafe. The forkserver is a
fresh single-threaded interpreter that never touches the GPU: torch only probes for CUDA through NVML there
(``PYTORCH_NVML_BASED_CUDA_CHECK=1``), so each child initialises CUDA itself, as a new process does.

The child is a real process: its own pid, memory and CUDA context; ``kill``/timeouts work as with ``subprocess``.
Its ``os.environ`` is the caller's at the time of ``run``. What differs from a fresh interpreter is only what the
preload already imported (same modules, same versions): a variable that those modules read once at import time takes
its value from the environment the forkserver started with.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

# Imported once by the forkserver: what every tool imports first (torch, transformers' Gemma-4 modelling code,
# safetensors), plus what the pack tools need when it is installed. A module that fails to import is skipped
# (multiprocessing's own rule), so a missing optional dependency fails in the tool, with the tool's message.
PRELOAD = ("torch", "numpy", "safetensors.torch", "tqdm", "transformers",
           "transformers.models.gemma4.modeling_gemma4", "compressed_tensors")


@dataclass(frozen=True)
class ToolResult:
    returncode: int  # the exit status; -N for a signal, as subprocess reports it
    output: str  # stdout and stderr together
    timed_out: bool


def _child(module: str, argv: list[str], cwd: str, env: dict[str, str], out_path: str) -> None:
    """In the forked child: ``python -m module *argv`` in ``cwd`` with environment ``env``, stdout + stderr into
    ``out_path``; exits with the tool's exit code."""
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, cwd)  # `python -m` puts the working directory first
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # the interpreter's own rules for sys.exit(x)
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()  # multiprocessing ends children with os._exit, which skips atexit
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


class ToolRunner:
    """Runs ``python -m`` tools as forks of one preloaded forkserver (see the module docstring).

    Thread-safe: several threads may ``run`` at once; each run is its own child process.
    """

    def __init__(self, preload: tuple[str, ...] = PRELOAD):
        self._ctx = multiprocessing.get_context("forkserver")
        self._preload = list(preload)
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the forkserver now (it imports ``preload`` in the background, on its own core if there is one)."""
        with self._lock:
            if self._started:
                return
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
            self._ctx.set_forkserver_preload(self._preload)
            from multiprocessing import forkserver

            forkserver.ensure_running()
            self._started = True

    def run(self, cmd: list[str], cwd: str | Path, timeout: float | None = None) -> ToolResult:
        """``cmd`` must be ``[sys.executable, "-m", MODULE, *args]``; runs it like ``subprocess.run(cmd, cwd=cwd,
        stdout=PIPE, stderr=STDOUT, timeout=timeout)`` would. On timeout the child is killed (SIGKILL)."""
        if len(cmd) < 3 or cmd[0] != sys.executable or cmd[1] != "-m":
            raise ValueError(f"ToolRunner runs `{sys.executable} -m MODULE ...` only, not {cmd[:3]}")
        self.start()
        with tempfile.NamedTemporaryFile(prefix="pdqkit-tool-", suffix=".log", delete=False) as f:
            out_path = f.name
        try:
            p = self._ctx.Process(target=_child, args=(cmd[2], list(cmd[3:]), str(cwd), dict(os.environ), out_path))
            p.start()
            p.join(timeout)
            timed_out = p.is_alive()
            if timed_out:
                p.kill()
                p.join()
            output = Path(out_path).read_text(errors="replace")
            return ToolResult(p.exitcode, output, timed_out)
        finally:
            os.unlink(out_path)
