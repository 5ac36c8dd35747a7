"""``python -m prune --criterion taylor`` (CPU): the loss-aware score and its wiring.

The reference for the score is independent of autograd: central finite differences of each window's next-token
loss when one channel of one layer's MLP intermediate is scaled by ``1 +- eps`` (float64 model, plain forwards
with a bare hook), on Gemma-4 text, multimodal and double-wide checkpoints and on Llama. The pruned checkpoints
are checked like tests/test_prune.py checks the other criteria: the kept channels (recovered by matching weight
rows) are the top scores of ``taylor_stats`` (checked against the finite differences on the same four kinds)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pack.checkpoint import read_lineage
from prune.calib import default_calib_path, load_calibration
from prune.config import PruneConfig
from prune.run import load_model, prune_checkpoint
from prune.taylor import taylor_stats

torch.set_num_threads(1)
SAMPLES, SEQ = 8, 128


def _mlps(model):
    return [layer.mlp for layer in model.get_decoder().layers]


def _window_losses_fd(model, ids, layer, channel, scale) -> torch.Tensor:
    """float64 [B]: each window's mean next-token CE with channel ``channel`` of layer ``layer`` scaled."""
    def hook(module, args):
        a = args[0].clone()
        a[..., channel] *= scale
        return (a,)
    h = _mlps(model)[layer].down_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        h.remove()
    return torch.stack([F.cross_entropy(logits[w, :-1], ids[w, 1:]) for w in range(ids.shape[0])])


# Per checkpoint kind: the layers and channels compared with finite differences. The first and the last layer
# (on `wide` the last is a double-wide KV-shared one, 1280 channels: 640, 1000 and 1279 lie beyond the normal
# width), and channels spread over the width, so that scores attached to the wrong channels (e.g. in reverse
# order: 0 <-> 639, 7 <-> 632, 640 <-> 639) cannot pass on any kind.
_FD_POINTS = {
    "text": {0: (0, 7, 300, 639), 5: (0, 7, 300, 639)},
    "mm": {0: (0, 7, 300, 639), 5: (0, 7, 300, 639)},
    "wide": {0: (0, 7, 300, 639), 5: (0, 7, 300, 639, 640, 1000, 1279)},
    "llama": {0: (0, 7, 300, 639), 1: (0, 7, 300, 639)},
}


@pytest.mark.parametrize("kind", list(_FD_POINTS))
def test_scores_equal_finite_differences(prune_ckpts, monkeypatch, kind):
    # Gemma-4's and Llama's RMSNorms compute in fp32 even in an fp64 model, which would bury the finite
    # differences in rounding noise; here they run in the model's dtype (the same model for both sides of the
    # comparison)
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def norm_in_dtype(self, x):
        out = self._norm(x)
        return out * self.weight if self.with_scale else out

    def llama_norm_in_dtype(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(Gemma4RMSNorm, "forward", norm_in_dtype)
    monkeypatch.setattr(LlamaRMSNorm, "forward", llama_norm_in_dtype)
    model = load_model(prune_ckpts[kind]).double()
    widths = [m.down_proj.in_features for m in _mlps(model)]
    points = _FD_POINTS[kind]
    assert max(points) == len(widths) - 1 and all(max(ch) == widths[i] - 1 for i, ch in points.items())
    if kind == "wide":
        assert widths[-1] == 2 * widths[0]  # the last layer's MLP really is double width
    ids = torch.randint(4, 2048, (3, 48), generator=torch.Generator().manual_seed(0))
    stats = taylor_stats(model, ids, batch_size=2)  # two batches: 2 + 1 windows
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert [st.width for st in stats] == widths and all(st.tokens == 3 for st in stats)
    # central differences: their O(eps^2) error reached 8e-6 relative at eps 1e-4 (mm, layer 0, channel 639; 7e-4
    # at 1e-3); at 1e-5 that channel agrees to 1e-7 and every sampled one on mm to 3e-7 (fp64 rounding)
    eps = 1e-5
    for layer, channels in points.items():
        for channel in channels:
            d = (_window_losses_fd(model, ids, layer, channel, 1 + eps)
                 - _window_losses_fd(model, ids, layer, channel, 1 - eps)) / (2 * eps)  # dL_w/dm_wj
            st = stats[layer]
            assert st.l2()[channel].item() == pytest.approx(d.square().sum().sqrt().item(), rel=1e-5, abs=1e-12)
            assert st.mean_abs()[channel].item() == pytest.approx(d.abs().mean().item(), rel=1e-5, abs=1e-12)
    # the score is not the activation size in disguise: the two rankings differ
    from prune.stack import collect_mlp_stats

    act = collect_mlp_stats(model, ids, batch_size=3)[0].l2()
    assert not torch.equal(act.topk(512).indices.sort().values, stats[0].l2().topk(512).indices.sort().values)


def _kept_rows(orig_mlp, pruned_mlp) -> list[int]:
    where = {r.tobytes(): i for i, r in enumerate(orig_mlp.gate_proj.weight.detach().float().numpy())}
    return [where[r.tobytes()] for r in pruned_mlp.gate_proj.weight.detach().float().numpy()]


def _assert_top_scores(orig_dir, out_dir, micro_tok, aggregation="l2"):
    """The pruned checkpoint kept, in every layer, the top channels of taylor_stats on the same calibration
    windows and batches (the run's batch size 4: fp32 sums do not depend on it in practice, but a tie at the
    cut could)."""
    cal = load_calibration(default_calib_path("calib"), micro_tok, SAMPLES, SEQ)
    orig = load_model(orig_dir)
    ref = taylor_stats(orig, cal.input_ids, batch_size=4)
    for mo, mp, st in zip(_mlps(orig), _mlps(load_model(out_dir)), ref):
        keep = mp.down_proj.in_features
        assert keep == (1024 if mo.down_proj.in_features == 1280 else 512)
        score = st.l2() if aggregation == "l2" else st.mean_abs()
        assert set(_kept_rows(mo, mp)) == set(score.topk(keep).indices.tolist())


@pytest.mark.parametrize("kind", ["text", "mm", "wide", "llama"])
def test_pruned_checkpoint_keeps_the_top_taylor_scores(prune_ckpts, micro_tok, tmp_path, kind):
    out = tmp_path / kind
    res = prune_checkpoint(prune_ckpts[kind], out, PruneConfig(criterion="taylor", samples=SAMPLES, seq_len=SEQ,
                                                               batch_size=4), progress=False)
    assert "criterion taylor (l2 over windows)" in res.summary()
    _assert_top_scores(prune_ckpts[kind], out, micro_tok)
    step = read_lineage(out)[-1]
    assert step["method"] == "mlp_width/taylor" and step["params"]["aggregation"] == "l2"
    assert step["calibration"][0]["num_samples"] == SAMPLES


def test_taylor_with_refit_keeps_the_taylor_channels(prune_ckpts, micro_tok, tmp_path):
    """--refit runs the layer-by-layer pass for its Gram matrices; the channels must still be taylor's (not the
    activation statistics of that pass). The kept rows are matched on gate_proj, which the refit leaves alone."""
    res = prune_checkpoint(prune_ckpts["text"], tmp_path / "o", PruneConfig(criterion="taylor", samples=SAMPLES,
                                                                           seq_len=SEQ, batch_size=4, refit=True),
                           progress=False)
    assert len(res.refit_errors) == res.layers and all(e1 < e0 for e0, e1 in res.refit_errors)
    _assert_top_scores(prune_ckpts["text"], tmp_path / "o", micro_tok)


def test_cli_mean_aggregation(prune_ckpts, micro_tok, tmp_path, capsys):
    from prune.__main__ import main

    out = tmp_path / "cli"
    assert main([str(prune_ckpts["mm"]), "-o", str(out), "--criterion", "taylor", "--agg", "mean", "--samples",
                 str(SAMPLES), "--seq-len", str(SEQ), "--batch-size", "4", "--no-progress"]) == 0
    assert "criterion taylor (mean over windows)" in capsys.readouterr().out
    _assert_top_scores(prune_ckpts["mm"], out, micro_tok, aggregation="mean")


def test_the_model_comes_back_unchanged_also_after_a_failure(prune_ckpts):
    """After the pass (fp32 on the device) every tensor is back, bit for bit, in its own dtype; hooks are gone and
    requires_grad restored, also when the forward fails; it works under no_grad and inference_mode too (and the
    weights do not come back as inference tensors)."""
    model = load_model(prune_ckpts["text"])
    model.get_decoder().layers[1].requires_grad_(True)
    def tensors():  # parameters and every buffer (the fp32 rotary inv_freq is not in the state dict)
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}
    before = {k: v.detach().clone() for k, v in tensors().items()}
    flags = [p.requires_grad for p in model.parameters()]
    assert {v.dtype for v in before.values()} >= {torch.bfloat16, torch.float32}  # fp32 rotary buffers too

    def unchanged():
        after = tensors()
        assert after.keys() == before.keys()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(not m._forward_pre_hooks for m in model.modules())

    ids = torch.randint(4, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stats = taylor_stats(model, ids, batch_size=2)
    assert all(st.tokens == 2 and torch.isfinite(st.l2()).all() and st.l2().max() > 0 for st in stats)
    unchanged()
    with torch.inference_mode():
        again = taylor_stats(model, ids, batch_size=2)
    assert all(torch.equal(a.sum_sq, b.sum_sq) for a, b in zip(stats, again))
    unchanged()
    assert not any(p.is_inference() for p in model.parameters())
    with pytest.raises(IndexError):
        taylor_stats(model, torch.cat([ids, torch.full((1, 32), 10**6)]), batch_size=2)  # 2nd batch fails
    unchanged()


@pytest.mark.parametrize("kind", ["text", "llama_bias"])
def test_a_bf16_model_is_scored_in_fp32(prune_ckpts, kind):
    """The pass computes in fp32 whatever the model's dtype (in bf16 the first layers' scores were 7-13 % off):
    a bf16 model's scores equal those of its exact fp32 copy bit for bit, and the model is left as it was."""
    import copy

    model = load_model(prune_ckpts[kind])
    assert next(model.parameters()).dtype == torch.bfloat16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 2048, (3, 48), generator=torch.Generator().manual_seed(1))
    f32 = copy.deepcopy(model).float()
    got, ref = taylor_stats(model, ids, batch_size=2), taylor_stats(f32, ids, batch_size=2)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.sum_abs, b.sum_abs) and torch.equal(a.sum_sq, b.sum_sq)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
