"""What the distill tests share: a training-checkpoint round trip (tests/test_distill_precision.py,
tests/test_distill_ema.py) and a torch.compile that records what Dynamo captured (tests/test_distill_speed.py,
tests/test_distill_ce.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distill.losses as L

from bench.factory import build_model
from distill.train import Distiller


def write_random_ids(path: Path, docs: int, length: int, seed: int = 0) -> Path:
    """``path``: a JSON-lines training file of ``docs`` documents of ``length`` random token ids (4..2047)."""
    g = torch.Generator().manual_seed(seed)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(4, 2048, (length,), generator=g).tolist()}) + "\n"
                            for _ in range(docs)))
    return path


def saved_micro_pair(root: Path, docs: int = 8, length: int = 128, **pair_kw) -> tuple[Path, Path, Path]:
    """``(teacher, student, data)``: :func:`distill.toy.save_pair`'s micro pair (MLP 512) under ``root``, and
    ``root/data.jsonl`` from :func:`write_random_ids`."""
    from distill.toy import save_pair

    teacher, student = save_pair(root, "micro", **{"width": 512, **pair_kw})
    return teacher, student, write_random_ids(root / "data.jsonl", docs, length)


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


def recording_backend(graphs: list, on_graph=None):
    """A torch.compile backend that appends every graph Dynamo captured to ``graphs`` (after ``on_graph(gm)``, if
    given) and runs it as aot_eager does (the same capture and AOTAutograd split as inductor, no C++ build on the
    CPU runner). A function Dynamo does not capture (falls back to eager) leaves ``graphs`` as it was."""
    def backend(gm, example_inputs):
        graphs.append(on_graph(gm) if on_graph else gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """``torch.compile`` -> :func:`recording_backend` with distill.losses' compile cache and Dynamo's caches
    emptied (a recompile limit left over from other tests would make Dynamo fall back to eager silently); yields
    ``(compiled fns, captured graphs)``."""
    real = torch.compile
    calls, graphs = [], []

    def fake_compile(fn, **kw):
        calls.append(fn)
        return real(fn, backend=recording_backend(graphs), dynamic=False)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(L, "_COMPILED", {})
    return calls, graphs
