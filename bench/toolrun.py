"""Run ``python -m TOOL ARGS`` in a child forked from one warm interpreter instead of a fresh one.

Why: every pdqkit tool begins by importing torch, transformers and Gemma-4's modelling code. On CI's two cores that
is 4-8 s of CPU per tool, more than a `micro` tool's whole work, and a pipeline call runs dozens of tools. A
``multiprocessing`` *forkserver* imports those modules once (``PRELOAD``); each tool is then a ``fork()`` of it that
runs the tool's ``__main__`` with ``runpy`` exactly as ``python -m`` would (``__name__ == "__main__"``, ``sys.argv``),
its stdout and stderr going to one file, as ``stderr=STDOUT`` would.

Why a forkserver and not a plain ``fork()`` of the caller: the caller may run threads (``--parallel``) and may
hold a CUDA context (it evaluates checkpoints in-process); forking such a process is unsafe. The forkserver is a
fresh single-threaded interpreter that never touches the GPU: torch only probes for CUDA through NVML there
(``PYTORCH_NVML_BASED_CUDA_CHECK=1`` in its environment only), so each child initialises CUDA itself, as a new
process does.

The child is a real process: its own pid, memory and CUDA context; ``kill``/timeouts work as with ``subprocess``, and
at its end it joins its non-daemon threads and runs its atexit handlers as an interpreter would. Its ``os.environ`` is
the caller's at the time of ``run``. What differs from a fresh interpreter:

* what the preload already imported (same modules, same versions); a variable that those modules read once at import
  time takes its value from the environment the forkserver started with;
* stdin is /dev/null, ``multiprocessing.current_process().name`` is ``ForkServerProcess-N``, every child shares the
  forkserver's hash seed, and ``sys.path`` holds the caller's entries after the working directory;
* the caller's main script is imported in each child as ``__mp_main__`` (multiprocessing's rule), so it must keep
  its entry point under ``if __name__ == "__main__"``.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import subprocess
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
    returncode: int | None  # the exit status; -N for a signal, as subprocess reports it (run_exec: None on timeout)
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
    code, interrupted = 0, False
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
    except KeyboardInterrupt:  # the interpreter reports it, then ends by SIGINT (exit status -2)
        traceback.print_exc()
        interrupted = True
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # what the interpreter does at shutdown, which multiprocessing's os._exit would skip: join the non-daemon
        # threads (and run threading's own exit callbacks, e.g. ThreadPoolExecutor's), then the atexit handlers
        try:
            threading._shutdown()
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


# multiprocessing reads a forkserver child's exit status from a socket, and Process.start() polls every other live
# child first: two threads polling one child at once can leave one of them an EOF, reported as exit status 255.
# Every start and poll therefore holds this lock; waiting does not (it only watches the child's sentinel).
_POLL_LOCK = threading.Lock()


class ToolRunner:
    """Runs ``python -m`` tools as forks of one preloaded forkserver (see the module docstring).

    Thread-safe: several threads may ``run`` at once; each run is its own child process. The forkserver is one per
    process (multiprocessing's): the first ``start`` decides its preload.
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
            self._ctx.set_forkserver_preload(self._preload)
            from multiprocessing import forkserver

            # only the forkserver's environment: there torch.cuda.is_available() asks NVML instead of calling
            # cuInit; the caller and the children keep theirs
            before = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
            try:
                forkserver.ensure_running()
            finally:
                if before is None:
                    del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
                else:
                    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = before
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
            with _POLL_LOCK:
                p.start()
            try:
                multiprocessing.connection.wait([p.sentinel], timeout)
            except BaseException:  # the caller interrupted: do not leave the tool running (subprocess.run's rule)
                with _POLL_LOCK:
                    p.kill()
                    p.join()
                raise
            with _POLL_LOCK:
                timed_out = p.is_alive()
                if timed_out:
                    p.kill()
                p.join()
                code = p.exitcode
            return ToolResult(code, Path(out_path).read_text(errors="replace"), timed_out)
        finally:
            os.unlink(out_path)


def run_exec(cmd: list[str], cwd: str | Path, timeout: float | None = None) -> ToolResult:
    """The reference launch: ``cmd`` in a fresh interpreter (``subprocess.run``), its result as :class:`ToolResult`;
    on timeout the child is killed (SIGKILL) and ``returncode`` is None."""
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return ToolResult(p.returncode, p.stdout, False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        return ToolResult(None, out, True)
