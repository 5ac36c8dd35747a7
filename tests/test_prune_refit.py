"""prune --refit: least-squares refit of the kept down_proj columns, on tiny random Gemma-4 checkpoints (CPU).

The references are independent of prune's code paths: the intermediate activations come from forward pre-hooks
on a plain full forward of the unpruned HF model, the kept channels from matching gate rows against the input
checkpoint, and the reference solution from ``torch.linalg.lstsq`` on those activations (the damped problem
written as an augmented least-squares system, not as normal equations).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.corpus import packed_sequences
from bench.tokenizer import get_tokenizer
from pack.checkpoint import read_lineage, sha256_file
from prune.__main__ import main
from prune.config import PruneConfig
from prune.run import load_model
from tests.test_prune import SAMPLES, SEQ, _logits, _mlps, _prune

DUP = 128  # channels of the "twins" checkpoint that are scaled copies of others (test_refit_recovers_...)


@pytest.fixture(scope="module")
def calib_ids(micro_tok):
    """The calibration windows prune reads by default (test_prune.py checks the equality)."""
    return packed_sequences("calib", micro_tok, SEQ)[:SAMPLES]


def _twin_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` with, in every layer, channels ``I-DUP..I-1`` turned into scaled copies of channels ``0..DUP-1``:
    same gate row, up row * 0.01 (so their activation is 0.01 x the twin's and the activation criterion drops
    them), down column * 100 (so their output contribution stays large). A removed channel is then an exact
    linear function of a kept one: the refit can move its contribution onto the twin, plain slicing loses it."""
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    for k in [k for k in t if k.endswith("mlp.gate_proj.weight")]:
        p = k[: -len("gate_proj.weight")]
        g, u, d = (t[p + n].clone() for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        i = g.shape[0]
        g[i - DUP:] = g[:DUP]
        u[i - DUP:] = u[:DUP] * 0.01
        d[:, i - DUP:] = d[:, i - DUP:] * 100
        t[p + "gate_proj.weight"], t[p + "up_proj.weight"], t[p + "down_proj.weight"] = g, u, d
    save_file({k: v.contiguous() for k, v in t.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, prune_ckpts):
    """The shared text and double-wide checkpoints (tests/prune_fixtures.py) and text's twin-channel copy."""
    twins = _twin_checkpoint(prune_ckpts["text"], tmp_path_factory.mktemp("base") / "twins")
    return {"text": prune_ckpts["text"], "wide": prune_ckpts["wide"], "twins": twins}


@pytest.fixture(scope="module")
def pruned(ckpts, tmp_path_factory):
    """``pruned(kind, refit) -> (out_dir, PruneResult)``, activation criterion (default damping), each run once."""
    done = {}

    def get(kind, refit):
        key = (kind, refit)
        if key not in done:
            out = tmp_path_factory.mktemp("pruned") / f"{kind}-{refit}"
            done[key] = out, _prune(ckpts[kind], out, refit=refit)
        return done[key]

    return get


def _kept(orig_mlp, pruned_mlp) -> torch.Tensor:
    """Kept channels, found by matching gate+up rows (the refit leaves them as they are)."""
    def rows(m):
        w = torch.cat([m.gate_proj.weight, m.up_proj.weight], 1).detach().float().numpy()
        return [r.tobytes() for r in w]

    where = {r: i for i, r in enumerate(rows(orig_mlp))}
    return torch.tensor([where[r] for r in rows(pruned_mlp)])


def _activations(model, ids, batch=4) -> list[torch.Tensor]:
    """float64 ``[T, I]`` input of every layer's down_proj over ``ids``: hooks on the whole model's forward."""
    acts = [[] for _ in _mlps(model)]

    def hook(i):
        return lambda mod, args: acts[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

    hooks = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(_mlps(model))]
    with torch.no_grad():
        for b in ids.split(batch):
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return [torch.cat(a) for a in acts]


@pytest.fixture(scope="module")
def unpruned(ckpts, calib_ids):
    """``unpruned(kind) -> (model, activations)``: the input model and its down_proj inputs on the calibration
    windows (:func:`_activations`), each computed once."""
    done = {}

    def get(kind):
        if kind not in done:
            model = load_model(ckpts[kind])
            done[kind] = model, _activations(model, calib_ids)
        return done[kind]

    return get


# ---------------------------------------------------------------------------------- (a) the reference

@pytest.mark.parametrize("kind,layer", [("text", 1), ("wide", 5)])  # wide layer 5: 1280 -> 1024 channels
def test_refit_equals_damped_lstsq_reference(unpruned, pruned, kind, layer):
    """The written down_proj is the augmented-lstsq solution of
    ``min ||H W^T - H_S W'^T||^2 + lambda ||W' - W_S||^2``, lambda = 0.01 * mean_j in S (sum_t h_tj^2),
    rounded to bf16 once: equal to half a bf16 ulp (plus fp64 solver noise)."""
    damp = 0.01
    orig, acts = unpruned(kind)
    out, _ = pruned(kind, True)
    mo, mp = _mlps(orig)[layer], _mlps(load_model(out))[layer]
    h = acts[layer]
    assert h.shape == (SAMPLES * SEQ, mo.down_proj.in_features)
    keep = _kept(mo, mp)
    assert keep.numel() == mo.down_proj.in_features * 4 // 5
    w = mo.down_proj.weight.double()
    w_s = w[:, keep]
    h_s = h[:, keep]
    lam = damp * h_s.square().sum(0).mean()
    a = torch.cat([h_s, lam.sqrt() * torch.eye(keep.numel(), dtype=torch.float64)])
    b = torch.cat([h @ w.T, lam.sqrt() * w_s.T])
    ref = torch.linalg.lstsq(a, b, driver="gelsd").solution.T  # [H, k]
    got = mp.down_proj.weight
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=2.0 ** -8 * 1.001, atol=1e-12)
    assert (got.double() - w_s).abs().max() > 0.1 * w_s.abs().max()  # the refit moved the weights a lot
    # the rest of the MLP is plain slicing
    assert torch.equal(mp.gate_proj.weight, mo.gate_proj.weight[keep])
    assert torch.equal(mp.up_proj.weight, mo.up_proj.weight[keep])


# ---------------------------------------------------------------- (b) it helps, in and out of sample

@pytest.mark.parametrize("kind", ["text", "wide", "twins"])
def test_refit_reduces_every_layers_reconstruction_error(unpruned, pruned, kind):
    """Per layer, on the calibration tokens: ||W h - W'_S h_S||^2 (written bf16 weights) is below plain
    slicing's ||W h - W_S h_S||^2, and PruneResult reports the same numbers (of the fp64 solution)."""
    orig, acts = unpruned(kind)
    (out_r, res_r), (out_p, _) = pruned(kind, True), pruned(kind, False)
    assert len(res_r.refit_errors) == len(acts) == 6
    for mo, mr, mp, h, (e0, e1) in zip(_mlps(orig), _mlps(load_model(out_r)), _mlps(load_model(out_p)), acts,
                                       res_r.refit_errors):
        keep = _kept(mo, mr)
        assert torch.equal(keep, _kept(mo, mp))  # same channels with and without refit
        y = h @ mo.down_proj.weight.double().T
        err_plain = (y - h[:, keep] @ mp.down_proj.weight.double().T).square().sum().item()
        err_refit = (y - h[:, keep] @ mr.down_proj.weight.double().T).square().sum().item()
        assert err_refit < 0.5 * err_plain, (err_refit, err_plain)
        assert e0 == pytest.approx(err_plain, rel=1e-9)
        # fp64 solution vs its bf16 rounding, which matters once the refit error is small (twins)
        assert e1 == pytest.approx(err_refit, rel=0.05, abs=0.01 * e0)


def test_refit_recovers_a_removed_twin_channel_on_held_out_tokens(unpruned, pruned):
    """Twins checkpoint: the activation criterion drops exactly the 128 scaled copies, and on held-out tokens
    the refit model's final logits are much closer (MSE) to the unpruned model's than plain slicing's."""
    orig, _ = unpruned("twins")
    refit, plain = load_model(pruned("twins", True)[0]), load_model(pruned("twins", False)[0])
    for mo, mr in zip(_mlps(orig), _mlps(refit)):
        assert _kept(mo, mr).tolist() == list(range(640 - DUP))
    ids = torch.randint(4, 2048, (2, 96), generator=torch.Generator().manual_seed(7))  # not the calib windows
    lo, lr, lp = (_logits(m, ids).double() for m in (orig, refit, plain))
    mse_refit, mse_plain = (lr - lo).square().mean().item(), (lp - lo).square().mean().item()
    assert mse_refit < 0.1 * mse_plain, (mse_refit, mse_plain)


def test_refit_reduces_held_out_logit_error_of_a_trained_model(trained_micro, calib_ids, tmp_path):
    """The bench's trained micro model (real, correlated activations): held-out (valid split) logit MSE vs
    the unpruned model is lower with the refit than with plain slicing (measured: -20% with 1024 calibration
    tokens for 512 kept channels)."""
    for name, refit in (("plain", False), ("refit", True)):
        _prune(trained_micro, tmp_path / name, refit=refit)
    ids = packed_sequences("valid", get_tokenizer("micro"), SEQ)[:4]
    lo, lp, lr = (_logits(load_model(p), ids).double() for p in (trained_micro, tmp_path / "plain", tmp_path / "refit"))
    mse_plain, mse_refit = (lp - lo).square().mean().item(), (lr - lo).square().mean().item()
    assert mse_refit < 0.9 * mse_plain, (mse_refit, mse_plain)


# -------------------------------------------------------------- (c, d) byte-identical, deterministic

FILES = ("model.safetensors", "config.json", "pdqkit_lineage.json")


def test_without_refit_the_output_is_unchanged_and_damp_is_ignored(ckpts, pruned, tmp_path):
    """No --refit: a --refit-damp makes no difference (same bytes), the lineage has no refit keys and every
    down_proj is plain column slicing of the input."""
    ref_out, _ = pruned("text", False)
    argv = ["--samples", str(SAMPLES), "--seq-len", str(SEQ), "--no-progress"]
    assert main([str(ckpts["text"]), "-o", str(tmp_path / "a"), *argv]) == 0
    assert main([str(ckpts["text"]), "-o", str(tmp_path / "b"), "--refit-damp", "0.5", *argv]) == 0
    for f in FILES:
        assert sha256_file(tmp_path / "a" / f) == sha256_file(tmp_path / "b" / f) == sha256_file(ref_out / f)
    params = read_lineage(tmp_path / "a")[-1]["params"]
    assert "refit" not in params and "refit_damp" not in params
    orig, model = load_model(ckpts["text"]), load_model(tmp_path / "a")
    for mo, mp in zip(_mlps(orig), _mlps(model)):
        assert torch.equal(mp.down_proj.weight, mo.down_proj.weight[:, _kept(mo, mp)])


def test_refit_changes_only_down_proj_and_records_lineage(ckpts, pruned):
    (out_r, res), (out_p, _) = pruned("text", True), pruned("text", False)
    a, b = load_file(out_p / "model.safetensors"), load_file(out_r / "model.safetensors")
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(6)}
    step = read_lineage(out_r)[-1]
    assert step["kind"] == "prune"
    assert step["params"]["refit"] is True and step["params"]["refit_damp"] == 0.01
    assert step["calibration"][0]["tokens"] == SAMPLES * SEQ
    assert f"refit: least-squares down_proj on {SAMPLES * SEQ} tokens" in res.summary()


def test_refit_is_deterministic(ckpts, pruned, tmp_path):
    first, _ = pruned("wide", True)
    _prune(ckpts["wide"], tmp_path / "again", refit=True)
    for f in FILES:
        assert sha256_file(first / f) == sha256_file(tmp_path / "again" / f)


def test_refit_calibrates_a_data_free_criterion(ckpts, tmp_path):
    """--criterion magnitude --refit: the channels are magnitude's (same as without refit), the down_proj is
    refit, and the calibration is recorded (aggregation stays None: the criterion does not use it)."""
    res = _prune(ckpts["text"], tmp_path / "r", criterion="magnitude", refit=True)
    _prune(ckpts["text"], tmp_path / "p", criterion="magnitude")
    assert res.calibration is not None and len(res.refit_errors) == 6
    step = read_lineage(tmp_path / "r")[-1]
    assert step["params"]["aggregation"] is None and step["calibration"][0]["tokens"] == SAMPLES * SEQ
    a, b = load_file(tmp_path / "p" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if "gate_proj" in k or "up_proj" in k)
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"])


# ------------------------------------------------------------------------------------------ (e) bad input

@pytest.mark.parametrize("damp", ["0", "-0.1", "nan", "inf"])
def test_bad_refit_damp_one_line_error_nothing_written(ckpts, tmp_path, capsys, damp):
    out = tmp_path / "out"
    rc = main([str(ckpts["text"]), "-o", str(out), "--refit", f"--refit-damp={damp}", "--samples", "4",
               "--seq-len", "64", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("prune: error: --refit-damp ") and "must be a finite " \
        "number > 0" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damp", [0, -1.0, float("nan"), float("inf"), True])
def test_prune_config_rejects_bad_damp(damp):
    with pytest.raises(ValueError, match="--refit-damp"):
        PruneConfig(refit=True, refit_damp=damp)


def test_refit_warns_when_fitted_on_few_tokens_per_column(ckpts, tmp_path, capsys):
    """Fewer than 4 calibration tokens per kept down_proj column: the least squares fit those tokens and the
    summary's (in-sample) error reduction says little about other text, so the run warns on stderr, counting
    the double-wide layers' kept width."""
    from prune.run import REFIT_MIN_TOKENS_PER_CHANNEL as k, refit_warning

    assert refit_warning(k * 512, 512) is None
    w = refit_warning(k * 512 - 1, 512)
    assert w and "in-sample" in w and "512 kept columns" in w and f"only {k * 512 - 1} " in w and "\n" not in w
    assert SAMPLES * SEQ < k * 1024   # this suite's calibration is small: the wide run must warn
    capsys.readouterr()
    _prune(ckpts["wide"], tmp_path / "w", refit=True)
    assert refit_warning(SAMPLES * SEQ, 1024) in capsys.readouterr().err
    _prune(ckpts["wide"], tmp_path / "p")   # no refit, no warning
    assert "in-sample" not in capsys.readouterr().err
