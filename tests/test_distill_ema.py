"""``--ema-decay`` (CPU, fast): the written weights are the exponential moving average of what the optimizer
stepped, started from the student's own weights; the average is training state (a checkpoint restores it).

References are independent: the average is recomputed in float64 from snapshots of the weights after every
step; the resumed run is compared with an uninterrupted one bit for bit (``kill -9`` + ``--resume`` end to end
is in tests/test_distill_run.py, FSDP2 shards in tests/test_distill_fsdp.py)."""
from __future__ import annotations

import pytest
import torch

from distill.config import DistillConfig
from distill.parallel import DistEnv
from distill.train import Distiller
from tests.distill_fixtures import micro_pair, resume_midway

torch.set_num_threads(1)
ENV = DistEnv(0, 1, 0, torch.device("cpu"))


def _cfg(**kw):
    base = dict(teacher="-", student="-", out="-", phase=1, steps=5, batch=2, seq_len=32, lr=1e-3,
                warmup_steps=0, precision="fp32", hidden_layers=[1, 4], ema_decay=0.7)
    return DistillConfig(**{**base, **kw})


def _ids(seed):
    return torch.randint(4, 2048, (2, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_ema_is_the_moving_average_of_the_stepped_weights(precision):
    cfg = _cfg(precision=precision)
    dz = Distiller(cfg, ENV, *micro_pair())
    ref = [p.detach().double().clone() for p in dz.opt_params]  # starts from the student
    for s in range(cfg.steps):
        dz.step(s, _ids(s))
        for r, p in zip(ref, dz.opt_params):
            r.mul_(cfg.ema_decay).add_(p.detach().double(), alpha=1 - cfg.ema_decay)
    last = [p.detach().clone() for p in dz.opt_params]
    assert any(not torch.allclose(a.double(), r, rtol=0, atol=1e-6) for a, r in zip(last, ref))  # it does differ
    dz.use_ema()
    for r, p in zip(ref, dz.opt_params):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-7)
    if precision == "bf16-master":  # the model's bf16 weights are the average rounded
        assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(dz.params, dz.opt_params))


def test_no_ema_writes_the_last_weights():
    dz = Distiller(_cfg(ema_decay=0.0), ENV, *micro_pair())
    assert dz.ema is None
    dz.step(0, _ids(0))
    before = [p.detach().clone() for p in dz.params]
    dz.use_ema()
    assert all(torch.equal(a, p) for a, p in zip(before, dz.params))


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_checkpoint_restores_the_average(tmp_path, precision):
    """Save after 2 of 4 steps, load into a fresh Distiller, finish: the same average bit for bit."""
    cfg = _cfg(steps=4, precision=precision)
    ref, a, b, ck = resume_midway(cfg, ENV, micro_pair, _ids, tmp_path / "ck", at=2)
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    assert sum(k.startswith("ema.") for k in md) == len(a.opt_params)
    assert all(torch.equal(x, y) for x, y in zip(a.ema.values(), b.ema.values()))
    for s in range(2, 4):
        b.step(s, _ids(s))
    ref.use_ema()
    b.use_ema()
    assert all(torch.equal(x, y) for x, y in zip(ref.params, b.params))


@pytest.mark.parametrize("bad", [1.0, -0.1, True, float("nan")])
def test_bad_decay_refused(bad):
    with pytest.raises(ValueError, match="--ema-decay"):
        _cfg(ema_decay=bad)
