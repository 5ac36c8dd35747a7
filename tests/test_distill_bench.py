"""``bench/gpu/distill_bench.py --ce-weight/--hidden-weight``: the switches reach the Distiller the bench steps.

The bench's first step (``--warmup 0 --steps 1``) reports the loss of the untouched random student, so the loss
with ``--ce-weight w`` minus the loss without it must be ``w`` times the student's data cross-entropy on the
bench's ids, computed here independently by a plain forward pass and ``F.cross_entropy``."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.factory import build_model

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("distill_bench", REPO / "bench/gpu/distill_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ce_weight_switch_adds_the_data_cross_entropy(tmp_path):
    db = _bench()
    batch, seq, w = 2, 64, 0.5
    loss = {}
    for ce in (0.0, w):
        name = f"ce{ce}.json"
        assert db.main(["--device", "cpu", "--pairs", "micro", "--steps", "1", "--warmup", "0",
                        "--configs", f"1,{batch},{seq},0,64", "--out", str(tmp_path), "--json-name", name,
                        "--ce-weight", str(ce), "--hidden-weight", "3"]) == 0
        rep = json.loads((tmp_path / name).read_text())
        assert rep["switches"] == {"ce_weight": ce, "hidden_weight": 3.0}
        loss[ce] = rep["rows"][0]["loss"]
    # the bench's student (micro, MLP 512, seed 1) and ids (seed 0), rebuilt here
    student = build_model("micro", seed=1, dtype=torch.float32, device="cpu", intermediate_size=512)
    ids = torch.randint(4, student.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = student(input_ids=ids).logits.float()
    ce_ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert (loss[w] - loss[0.0]) / w == pytest.approx(ce_ref, rel=1e-4)
