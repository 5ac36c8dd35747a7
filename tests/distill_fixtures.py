"""A training-checkpoint round trip that the distill state tests share (tests/test_distill_precision.py,
tests/test_distill_ema.py)."""
from __future__ import annotations

import torch

from bench.factory import build_model
from distill.train import Distiller


def micro_pair():
    """(teacher, student): a random bf16 micro teacher and a "pruned" (MLP 256) fp32 student built as the benches
    build it (under bf16-master the Distiller casts it to the bf16 layout)."""
    return (build_model("micro", seed=0, dtype=torch.bfloat16),
            build_model("micro", seed=1, dtype=torch.float32, intermediate_size=256))


def resume_midway(cfg, env, make_pair, ids, ck_dir, at: int):
    """``(ref, a, b, ck)``: ``ref`` ran all ``cfg.steps`` steps; ``a`` ran the first ``at`` and saved the training
    checkpoint ``ck`` under ``ck_dir``; ``b`` is a fresh Distiller (new models from ``make_pair()``) loaded from
    ``ck`` and not stepped yet. Step ``s`` trains on ``ids(s)``."""
    ref = Distiller(cfg, env, *make_pair())
    for s in range(cfg.steps):
        ref.step(s, ids(s))
    a = Distiller(cfg, env, *make_pair())
    for s in range(at):
        a.step(s, ids(s))
    ck = a.save_state(ck_dir, at, {"config": cfg.result_dict(), "history": []})
    b = Distiller(cfg, env, *make_pair())
    assert b.load_state(ck)["step"] == at
    return ref, a, b, ck
