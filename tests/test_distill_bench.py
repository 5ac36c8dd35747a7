"""``bench/gpu/distill_bench.py --ce-weight/--hidden-weight``: the switches reach the Distiller the bench steps.

The bench's first step (``--warmup 0 --steps 1``) reports the loss of the untouched random student, so the loss
with ``--ce-weight w`` minus the loss without it must be ``w`` times the student's data cross-entropy on the
bench's ids, computed here independently by a plain forward pass and ``F.cross_entropy``; and ``--hidden-weight
3`` must triple the hidden-state term against the default weight 1, in the reported part and in the loss. A
phase-2 configuration with ``--ce-weight`` is refused before any model is built."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bench.factory import build_model
from bench.gpu import distill_bench as db


def _row(out, name, configs, *switches):
    assert db.main(["--device", "cpu", "--pairs", "micro", "--steps", "1", "--warmup", "0", "--configs", configs,
                    "--out", str(out), "--json-name", name, *switches]) == 0
    rep = json.loads((out / name).read_text())
    (row,) = rep["rows"]
    return rep, row


def test_ce_and_hidden_weight_switches_reach_the_loss(tmp_path):
    batch, seq, w = 2, 64, 0.5
    configs = f"1,{batch},{seq},0,64"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rep0, r0 = _row(tmp_path, "h3.json", configs, "--ce-weight", "0", "--hidden-weight", "3")
    rep1, r1 = _row(tmp_path, "h3-ce.json", configs, "--ce-weight", str(w), "--hidden-weight", "3")
    _, rh1 = _row(tmp_path, "h1.json", configs, "--hidden-weight", "1")
    assert rep0["switches"] == {"ce_weight": 0.0, "hidden_weight": 3.0}
    assert rep1["switches"] == {"ce_weight": w, "hidden_weight": 3.0}
    # the process-wide TF32 flags are only touched on cuda
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    # the bench's student (micro, MLP 512, seed 1) and ids (seed 0), rebuilt here
    student = build_model("micro", seed=1, dtype=torch.float32, device="cpu", intermediate_size=512)
    ids = torch.randint(4, student.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = student(input_ids=ids).logits.float()
    ce_ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert "data_ce" not in r0["loss_parts"] and r1["loss_parts"]["data_ce"] == pytest.approx(ce_ref, rel=1e-4)
    assert (r1["loss"] - r0["loss"]) / w == pytest.approx(ce_ref, rel=1e-4)
    hidden = rh1["loss_parts"]["hidden_mse"]  # weight 1: the plain term
    assert hidden > 0 and r0["loss_parts"]["hidden_mse"] == pytest.approx(3 * hidden, rel=1e-4)
    assert r0["loss"] - rh1["loss"] == pytest.approx(2 * hidden, rel=1e-4)


def test_ce_weight_with_a_phase2_configuration_is_refused_first(tmp_path, capsys):
    rc = db.main(["--device", "cpu", "--pairs", "micro", "--steps", "1", "--warmup", "0",
                  "--configs", "1,2,64,0,64;2,2,160,0,64", "--out", str(tmp_path), "--ce-weight", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "2,2,160,0,64" in err and "--ce-weight is a phase-1 term" in err and "phase-1 --configs" in err
    assert not (tmp_path / "distill_bench.json").exists()
