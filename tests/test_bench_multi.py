"""The multi-GPU bench tools (issue #8) on CPU with gloo and 2 processes: the plumbing a 2xH200 session relies on.

``bench/gpu/loss_parity.py`` runs ``python -m distill`` once as one process and once under torchrun and compares
the logged loss curves; ``bench/gpu/distill_bench.py`` under torchrun shards the student with FSDP2 and reports
per-GPU throughput and per-rank peak memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.toy import save_pair
from tests.test_distill_run import _write_ids

REPO = Path(__file__).resolve().parents[1]


def test_loss_parity_one_vs_two_processes(tmp_path):
    teacher, student = save_pair(tmp_path, "micro", width=512)
    data = _write_ids(tmp_path / "d.jsonl", 4, 80)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench/gpu/loss_parity.py"), "--teacher", str(teacher), "--student",
           str(student), "--device", "cpu", "--nproc", "2", "--steps", "4", "--work", str(tmp_path / "w"),
           "--out", str(out), "--distill-args", f"--data {data} --batch 2 --seq-len 32"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "loss_parity.json").read_text())
    assert rep["steps"] == 4 and len(rep["loss_one"]) == len(rep["loss_many"]) == 4
    # the same global batch: the runs differ in the gradient reduction order and in the bf16 teacher's rounding
    # (each rank runs half the rows, and a CPU's bf16 matmul may round differently at another row count: 8e-6
    # relative on step 1 on an AMX Xeon); the differences grow through AdamW (tests/test_distill_fsdp.py's
    # docstring: up to 2.6e-3 by step 4 there)
    (a0, *_), (b0, *_) = rep["loss_one"], rep["loss_many"]
    assert abs(a0 - b0) <= 2e-4 * abs(a0) and rep["max_rel_diff"] < 1e-2, rep
    assert rep["max_abs_diff"] == max(abs(a - b) for a, b in zip(rep["loss_one"], rep["loss_many"]))
    # the figure (matplotlib is in the [test] extra, so CI draws it): a real image of the figure's size
    # (7 x 6 in at 110 dpi), not blank
    from matplotlib.image import imread

    png = out / "loss_parity.png"
    first = png.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.shape[:2] == (660, 770) and img[..., :3].std() > 0.05, (img.shape, img[..., :3].std())
    png.unlink()  # --replot redraws it from the report alone: the same figure, the same bytes (Agg, no timestamp)
    replot = [sys.executable, str(REPO / "bench/gpu/loss_parity.py"), "--replot", str(out / "loss_parity.json")]
    r = subprocess.run(replot, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"wrote {png}" in r.stdout, r.stderr[-2000:]
    assert png.read_bytes() == first
    # without matplotlib (a pdqkit install without the [test] extra): --replot says why and draws nothing. A
    # module that fails to import stands in for the missing package (PYTHONPATH comes before site-packages).
    png.unlink()
    (tmp_path / "no_mpl").mkdir()
    (tmp_path / "no_mpl" / "matplotlib.py").write_text("raise ImportError('no matplotlib in this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "no_mpl"), str(REPO)]))
    r = subprocess.run(replot, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "matplotlib is not installed" in r.stderr and not png.exists(), r.stderr[-2000:]


def test_distill_bench_under_torchrun(tmp_path):
    nproc = 2
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "bench/gpu/distill_bench.py"), "--device", "cpu", "--pairs", "micro", "--steps", "1",
           "--warmup", "1", "--configs", "1,4,64,1,64", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "distill_bench.json").read_text())
    (row,) = rep["rows"]
    assert rep["world"] == nproc and row["world"] == nproc and len(row["peak_mem_gb_per_rank"]) == nproc
    assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / nproc)
    assert (row["batch"], row["seq_len"], row["grad_ckpt"]) == (4, 64, True) and row["loss"] > 0
