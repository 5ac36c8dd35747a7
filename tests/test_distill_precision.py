"""``--precision bf16-master`` (CPU, fast): a bf16 student run without autocast, AdamW on fp32 master copies.

Checked against independent references: the masters follow ``torch.optim.AdamW`` stepping fp32 copies of the
weights with the bf16 model's gradients (clipped in fp32) and the bf16 weights are those masters rounded to
nearest, bit for bit; a training checkpoint restores the fp32 masters and the AdamW state exactly (the
continued run equals the uninterrupted one bit for bit; ``kill -9`` + ``--resume`` end to end is in
tests/test_distill_run.py); torchrun refuses the mode with a one-line error."""
from __future__ import annotations

import pytest
import torch

from distill.config import DistillConfig
from distill.parallel import DistEnv
from distill.train import BF16_MASTER_DIST_ERROR, Distiller, lr_at, student_dtype
from tests.distill_fixtures import micro_pair, resume_midway

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _cfg(**kw):
    base = dict(teacher="-", student="-", out="-", phase=1, steps=6, batch=2, seq_len=32, lr=1e-3,
                warmup_steps=0, precision="bf16-master", grad_clip=1.0, weight_decay=0.01, hidden_layers=[1, 4])
    return DistillConfig(**{**base, **kw})


def _ids(seed=0, b=2, s=32):
    return torch.randint(4, 2048, (b, s), generator=torch.Generator().manual_seed(seed))


def test_bf16_master_trains_in_bf16_with_fp32_masters():
    teacher, student = micro_pair()
    dz = Distiller(_cfg(), DistEnv(0, 1, 0, CPU), teacher, student)
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    inv_freq = [b for n, b in student.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)  # RoPE frequencies stay fp32
    assert [m.dtype for m in dz.opt_params] == [torch.float32] * len(dz.params)
    assert len(dz.opt_params) == len(dz.params) and all(m.shape == p.shape for m, p in zip(dz.opt_params, dz.params))
    assert {id(p) for g in dz.opt.param_groups for p in g["params"]} == {id(m) for m in dz.opt_params}
    frozen = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}
    assert any(n.endswith("embed_tokens.weight") for n in frozen)  # embeddings frozen: no master

    seen = []  # the residual stream really is bf16 (no autocast, no fp32 copy of the model)
    h = student.get_decoder().layers[2].register_forward_hook(lambda m, a, o: seen.append(
        (o[0] if isinstance(o, tuple) else o).dtype))
    ids = _ids()
    losses = [dz.step(s, ids)["loss"] for s in range(6)]
    h.remove()
    assert set(seen) == {torch.bfloat16}
    assert losses[-1] < 0.8 * losses[0], losses
    for m, p in zip(dz.opt_params, dz.params):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(p, m.to(torch.bfloat16))  # the weights are the masters rounded
    assert any(not torch.equal(m, p.float()) for m, p in zip(dz.opt_params, dz.params))  # masters hold more bits
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_bf16_master_step_equals_adamw_on_fp32_copies(train_embeddings):
    """Three steps (clip active: micro-model gradient norms are >> 1) against torch.optim.AdamW stepping fp32
    copies of the initial bf16 weights with the bf16 gradients the model produced, then rounding: bit-equal."""
    teacher, student = micro_pair()
    # non-default betas / eps (--adam-betas, --adam-eps): the reference gets them only from the config
    cfg = _cfg(lr=3e-3, steps=3, train_embeddings=train_embeddings, adam_betas=(0.8, 0.99), adam_eps=1e-4)
    dz = Distiller(cfg, DistEnv(0, 1, 0, CPU), teacher, student)
    names = [n for n, p in dz.dm.named_parameters() if p.requires_grad]
    assert any("embed_tokens." in n for n in names) == train_embeddings
    ref = [p.detach().float().clone() for p in dz.params]
    ref_opt = torch.optim.AdamW(ref, lr=cfg.lr, betas=(0.8, 0.99), eps=1e-4, weight_decay=cfg.weight_decay)
    grads = []
    orig = dz.masters.grads_from_model

    def spy():  # observe the model's gradients on their way to the masters
        grads.append([p.grad.clone() for p in dz.params])
        orig()
    dz.masters.grads_from_model = spy

    for step in range(3):
        rec = dz.step(step, _ids(step))
        g = grads[-1]
        assert all(x.dtype == torch.bfloat16 for x in g)
        for r, x in zip(ref, g):
            r.grad = x.float()
        norm = torch.nn.utils.clip_grad_norm_(ref, cfg.grad_clip)
        assert float(norm) > cfg.grad_clip and rec["grad_norm"] == float(norm)
        for grp in ref_opt.param_groups:
            grp["lr"] = lr_at(step, cfg)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for n, r, m, p in zip(names, ref, dz.opt_params, dz.params):
            assert torch.equal(m, r), (step, n)
            assert torch.equal(p, r.to(torch.bfloat16)), (step, n)
    assert all(m.grad is None for m in dz.opt_params) and all(p.grad is None for p in dz.params)


def test_bf16_master_checkpoint_restores_masters_and_adam(tmp_path):
    """Save after 2 of 4 steps, load into a fresh Distiller, finish: the same bits as 4 uninterrupted steps."""
    cfg = _cfg(steps=4, lr=3e-3)
    ref, a, b, ck = resume_midway(cfg, DistEnv(0, 1, 0, CPU), micro_pair, _ids, tmp_path / "ck", at=2)
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    masters = {k: v for k, v in md.items() if k.startswith("model.")}
    assert len(masters) == len(a.params)
    assert all(v.properties.dtype == torch.float32 for v in masters.values())  # fp32 masters, not bf16 weights
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in md)

    for ma, mb, pb in zip(a.opt_params, b.opt_params, b.params):
        assert torch.equal(ma, mb) and torch.equal(pb, mb.to(torch.bfloat16))
    for s in range(2, 4):
        b.step(s, _ids(s))
    names = [n for n, p in ref.dm.named_parameters() if p.requires_grad]
    assert len(names) == len(b.params)
    for n, pr, pb, mr, mb in zip(names, ref.params, b.params, ref.opt_params, b.opt_params):
        assert torch.equal(pr, pb) and torch.equal(mr, mb), n


def test_bf16_master_refused_under_torchrun_and_config():
    teacher, student = micro_pair()
    with pytest.raises(ValueError, match="bf16-master runs in one process only; under torchrun use bf16-mixed"):
        Distiller(_cfg(), DistEnv(0, 2, 0, CPU), teacher, student)
    assert "\n" not in BF16_MASTER_DIST_ERROR
    assert student.get_decoder().layers[0].mlp.up_proj.weight.dtype == torch.float32  # refused before any change
    with pytest.raises(ValueError, match="choose bf16-mixed, bf16-master or fp32"):
        _cfg(precision="bf16")
    assert student_dtype("bf16-master") == torch.bfloat16 and student_dtype("bf16-mixed") == torch.float32
    assert _cfg().result_dict()["precision"] == "bf16-master"  # a --resume must match it
