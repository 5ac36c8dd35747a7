"""Loss parity of ``python -m distill`` on one GPU and on N GPUs (FSDP2 over NCCL): the same run twice.

    python bench/gpu/loss_parity.py --teacher WORK/base --student WORK/pruned-activation --nproc 2 --steps 60
    python bench/gpu/loss_parity.py --teacher T --student S --device cpu --nproc 2 --steps 3   # gloo smoke run

Runs phase 1 (or ``--phase 2``) once as one process and once under ``torchrun --standalone --nproc-per-node N``
with identical arguments: the same global batch, data order and seed (``python -m distill`` splits each global
batch over the ranks, so the N ranks see exactly the one process's batch). What differs is rounding: the gradient
reduction order (FSDP2's reduce-scatter), and on a GPU also the forward itself. One process keeps fp32 weights
under ``torch.autocast`` (bf16 matmuls, fp32 residual stream), while FSDP2 all-gathers bf16 parameters
(``MixedPrecisionPolicy``), so the student's residual stream and norm outputs are bf16 too; and each rank
multiplies 1/N of the batch (other GEMM tile shapes). Step 1, before any update, already differed by 1.3e-3
relative on two H200s (presumably from these). Reports, per step, ``|loss_N - loss_1|`` (and the step-1 relative
difference); the yardstick is the one-GPU curve's step-to-step noise (``std(diff(loss)) / sqrt 2``). That noise
includes batch-to-batch variation, which a paired run on identical batches does not have, so "within the noise"
is a loose bound. Also tokens/s, MFU and peak memory per rank of both runs from their JSON logs (the last
step's). Writes ``loss_parity.json`` to ``--out`` (default ``$OUT``), and
``loss_parity.png`` (both curves and their difference against the noise) where matplotlib is installed;
``--replot loss_parity.json`` redraws the figure from a report anywhere (no GPU).

NVLink multicast stays off in the child processes (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1: the device docs require it on the multi-GPU machines).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _steps(log: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in log.read_text().splitlines() if x.strip()) if r.get("event") == "step"]


def _run(cmd: list[str], env: dict, tag: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{tag} run failed (rc {r.returncode}): {shlex.join(cmd)}\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _throughput(steps: list[dict]) -> dict:
    last = steps[-1]
    return {k: last.get(k) for k in ("tokens_per_s", "mfu", "peak_mem_gb")}


def compare(one: list[dict], many: list[dict]) -> dict:
    """Per-step loss differences of two step logs (same steps) against the one-process curve's noise."""
    if [r["step"] for r in one] != [r["step"] for r in many]:
        raise ValueError("the two runs logged different steps")
    l1 = [r["loss"] for r in one]
    ln = [r["loss"] for r in many]
    d = [abs(a - b) for a, b in zip(l1, ln)]
    diffs = [b - a for a, b in zip(l1, l1[1:])]
    noise = statistics.stdev(diffs) / math.sqrt(2) if len(diffs) >= 2 else float("nan")
    tail = d[-min(10, len(d)):]
    return {"steps": len(d), "max_abs_diff": max(d), "mean_abs_diff": sum(d) / len(d),
            "last10_mean_abs_diff": sum(tail) / len(tail), "max_rel_diff": max(x / abs(a) for x, a in zip(d, l1)),
            "step1_rel_diff": d[0] / abs(l1[0]), "one_gpu_step_noise": noise,
            "max_diff_over_noise": max(d) / noise if noise > 0 else None,
            "final_loss_one": l1[-1], "final_loss_many": ln[-1], "loss_one": l1, "loss_many": ln}


def plot(rep: dict, path: Path) -> bool:
    """Draw ``rep``'s two loss curves (top) and ``|loss_N - loss_1|`` against the one-process step noise (bottom)
    into ``path``. Returns False (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, rep["steps"] + 1)
    fig, (top, bot) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": (2, 1)})
    top.plot(steps, rep["loss_one"], label="1 process", lw=1.5)
    top.plot(steps, rep["loss_many"], label=f"{rep['nproc']} processes (FSDP2)", lw=1, ls="--")
    top.set_ylabel(f"phase-{rep['phase']} loss")
    top.legend()
    top.set_title(f"python -m distill, 1 vs {rep['nproc']} processes ({rep['device']})")
    bot.plot(steps, [abs(a - b) for a, b in zip(rep["loss_one"], rep["loss_many"])], lw=1, label="|difference|")
    bot.axhline(rep["one_gpu_step_noise"], color="k", ls=":", label="1-process step-to-step noise")
    bot.set_xlabel("step")
    bot.set_ylabel("|Δ loss|")
    bot.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replot", type=Path, metavar="JSON", help="only redraw loss_parity.png beside this report")
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the second run")
    ap.add_argument("--phase", type=int, default=1, choices=(1, 2))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo smoke run)")
    ap.add_argument("--distill-args", default="", help="extra arguments for both runs (one shell-quoted string)")
    ap.add_argument("--work", default="/tmp/pdq-parity", help="where the two output checkpoints and logs go")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    if a.replot:
        png = a.replot.with_suffix(".png")
        if not plot(json.loads(a.replot.read_text()), png):
            print("error: matplotlib is not installed: pip install matplotlib", file=sys.stderr)
            return 2
        print(f"wrote {png}")
        return 0
    if not (a.teacher and a.student):
        ap.error("--teacher and --student are required (or --replot JSON)")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NO_MULTICAST, "TQDM_DISABLE": "1"}

    def args(tag):
        return ["--teacher", a.teacher, "--student", a.student, "-o", str(work / tag), "--phase", str(a.phase),
                "--steps", str(a.steps), "--device", a.device, "--log-every", "1", "--log-json",
                str(work / f"{tag}.jsonl"), "--force", *shlex.split(a.distill_args)]

    for tag in ("one", "many"):
        (work / f"{tag}.jsonl").unlink(missing_ok=True)
    t_one = _run([sys.executable, "-m", "distill", *args("one")], env, "one-process")
    t_many = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(a.nproc), "-m", "distill", *args("many")], env, f"{a.nproc}-process")
    one, many = _steps(work / "one.jsonl"), _steps(work / "many.jsonl")
    rep = {"nproc": a.nproc, "device": a.device, "phase": a.phase, "distill_args": a.distill_args,
           "teacher": a.teacher, "student": a.student, "seconds": {"one": t_one, "many": t_many},
           "one": _throughput(one), "many": _throughput(many), **compare(one, many)}
    (out / "loss_parity.json").write_text(json.dumps(rep, indent=1) + "\n")
    try:  # the figure is a convenience: a plotting failure must not fail a finished run
        plot(rep, out / "loss_parity.png")
    except Exception as e:  # noqa: BLE001
        print(f"warning: loss_parity.png not drawn: {e}", file=sys.stderr)
    print(f"{rep['steps']} steps, phase {a.phase}: final loss 1 process {rep['final_loss_one']:.5f}, "
          f"{a.nproc} processes {rep['final_loss_many']:.5f}; max |diff| {rep['max_abs_diff']:.2e} "
          f"(rel {rep['max_rel_diff']:.2e}), last-10 mean {rep['last10_mean_abs_diff']:.2e}; "
          f"one-process step-to-step noise {rep['one_gpu_step_noise']:.2e}")
    for tag in ("one", "many"):
        t = rep[tag]
        if t["tokens_per_s"] is not None:
            mfu = f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] is not None else ""
            mem = f", peak GB per rank {t['peak_mem_gb']}" if t["peak_mem_gb"] is not None else ""
            print(f"  {tag}: {t['tokens_per_s']:,.0f} tok/s{mfu}{mem}")
    print(f"wrote {out / 'loss_parity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
