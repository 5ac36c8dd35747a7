"""prune: tests from a mutation audit of prune/*.py (each verified to fail on a mutation of the line it protects).

They cover what tests/test_prune.py, test_prune_refit.py and test_prune_taylor.py left open: PruneConfig's guards
just inside and outside each bound, the data-need properties, kept_width at width 128 and for another multiple,
select_channels' and channel_scores' guards and exact scores, ChannelStats, refit_down_proj against an augmented
least-squares reference in float64 (with a non-default damping) and its guards, calibration windows with a
tokenizer without ``backend_tokenizer`` (a char-level stand-in whose stream is computed here), the early stop of a
large .jsonl, the documents count at the window boundary, the CLI's option -> PruneConfig mapping and exit codes,
the run's device-index and vocabulary guards at their boundaries, --force over an earlier output, the random
criterion's generator across layers, a non-default --refit-damp end to end, and what the lineage and the summary
record. References are computed here, not through prune's code paths.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from pack.checkpoint import read_lineage, sha256_file
from prune.calib import CalibrationSet, bench_split, load_calibration
from prune.config import CRITERIA, PruneConfig, kept_width
from prune.importance import channel_scores, select_channels
from prune.refit import refit_down_proj
from prune.run import PruneResult, prune_checkpoint
from prune.stack import ChannelStats, check_supported

SAMPLES, SEQ = 8, 128


class _Reached(Exception):
    """Raised by a stand-in for the step after a guard: the guard let the run through."""


def _mlps(model):
    return [layer.mlp for layer in model.get_decoder().layers]


def _kept_rows(orig_mlp, pruned_mlp) -> list[int]:
    """Channels of ``orig_mlp`` that ``pruned_mlp`` kept, matched on gate rows (random rows are unique)."""
    where = {r.tobytes(): i for i, r in enumerate(orig_mlp.gate_proj.weight.detach().float().numpy())}
    return [where[r.tobytes()] for r in pruned_mlp.gate_proj.weight.detach().float().numpy()]


# ------------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw,msg", [
    ({"criterion": "fisher"}, "--criterion 'fisher': choose one of activation, wanda, taylor, magnitude, random"),
    ({"aggregation": "max"}, "--agg 'max': choose one of l2, mean"),
    ({"samples": 0}, "--samples 0: must be a positive integer"),
    ({"seq_len": 0}, "--seq-len 0: must be a positive integer"),
    ({"batch_size": 0}, "--batch-size 0: must be a positive integer"),
    ({"batch_size": -3}, "--batch-size -3: must be a positive integer"),
    ({"seed": -1}, "--seed -1: must be in [0, 2^63)"),
    ({"seed": 2 ** 63}, f"--seed {2 ** 63}: must be in [0, 2^63)"),
    ({"device": "gpu"}, "--device 'gpu': use cpu, cuda or cuda:N"),
    ({"device": "cuda0"}, "--device 'cuda0': use cpu, cuda or cuda:N"),
    ({"calib": "bench:valid", "criterion": "magnitude"}, "--calib bench:valid: choose bench:calib or bench:train"),
    ({"calib": "bench:"}, "--calib bench:: choose bench:calib or bench:train"),
    ({"ratio": 1}, "--ratio 1: must be in [0, 1)"),
])
def test_prune_config_rejects_just_outside_each_bound(kw, msg):
    """Every PruneConfig guard (not only those the CLI's argparse choices shadow) raises its own message just
    outside its bound; bench:valid is refused by the config itself, even for a data-free criterion that would
    never read it."""
    with pytest.raises(ValueError, match=re.escape(msg)):
        PruneConfig(**kw)


@pytest.mark.parametrize("kw", [
    {"samples": 1, "seq_len": 1, "batch_size": 1}, {"criterion": "taylor", "seq_len": 2},
    {"criterion": "activation", "seq_len": 1}, {"criterion": "magnitude", "seq_len": 1, "refit": True},
    {"seed": 0}, {"seed": 2 ** 63 - 1}, {"device": "cuda"}, {"device": "cuda:3"}, {"device": "cpu"},
    {"calib": "bench:calib"}, {"calib": "bench:train"}, {"calib": "my/file.jsonl"},
    {"refit_damp": 1}, {"refit_damp": 1e-300}, {"ratio": 0}, {"ratio": 0.999},
])
def test_prune_config_accepts_just_inside_each_bound(kw):
    """The values at the edge of each accepted range construct (the taylor 2-token window only for taylor)."""
    cfg = PruneConfig(**kw)
    assert all(getattr(cfg, k) == v for k, v in kw.items())


def test_bench_split_names():
    """None -> the calib split, bench:calib / bench:train -> that split, anything else without the prefix -> a
    file (None)."""
    assert [bench_split(c) for c in (None, "bench:calib", "bench:train", "train", "data/bench:x.jsonl")] == \
        ["calib", "calib", "train", None, None]


@pytest.mark.parametrize("ratio", [0, 0.2])
@pytest.mark.parametrize("refit", [False, True])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_which_runs_read_calibration_data(ratio, refit, criterion):
    """Scores come from data for activation / wanda / taylor when something is pruned; calibration is needed for
    those or for a refit that runs (ratio > 0); a data-free run (magnitude / random, no refit) and every ratio-0
    run read none."""
    cfg = PruneConfig(ratio=ratio, criterion=criterion, refit=refit)
    from_data = ratio > 0 and criterion in ("activation", "wanda", "taylor")
    assert cfg.scores_from_data is from_data
    assert cfg.needs_calibration is (from_data or (ratio > 0 and refit))


# ----------------------------------------------------------------------------------------------- widths

@pytest.mark.parametrize("ratio,msg", [(0.2, "rounds back to 128"), (0.7, "rounds to 0")])
def test_kept_width_at_exactly_one_multiple(ratio, msg):
    """Width 128 is not below the multiple: it is refused because the result rounds to 0 or back to 128, not as
    'below the rounding multiple' (which 127 is)."""
    with pytest.raises(ValueError, match=msg):
        kept_width(128, ratio)
    with pytest.raises(ValueError, match="intermediate_size 127 is below the rounding multiple 128"):
        kept_width(127, ratio)


def test_kept_width_honours_its_multiple_argument():
    """``multiple`` is used throughout (not the module's 128): an integer-only reference at multiples 64 and 256,
    ratio r/100 of width w keeps m * floor(w (100 - r) / (100 m) + 1/2), halves up."""
    for m in (64, 256):
        for w in range(m, 4 * m * 5, 37):
            for r in range(1, 100, 3):
                ref = m * ((2 * w * (100 - r) + 100 * m) // (200 * m))
                if 0 < ref < w:
                    assert kept_width(w, r / 100, multiple=m) == ref, (m, w, r)
                else:
                    with pytest.raises(ValueError):
                        kept_width(w, r / 100, multiple=m)


# ---------------------------------------------------------------------------------------------- selection

@pytest.mark.parametrize("keep", [0, -1, 11])
def test_select_channels_refuses_an_impossible_count(keep):
    """0 < keep <= number of channels: nothing kept, or more than there are, is an error."""
    with pytest.raises(ValueError, match=f"cannot keep {keep} of 10 channels"):
        select_channels(torch.rand(10), keep)


def test_select_channels_keeps_all_at_the_upper_bound():
    assert select_channels(torch.rand(10), 10).tolist() == list(range(10))


class _MLP(nn.Module):
    def __init__(self, hidden=6, width=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj, self.up_proj = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)


@pytest.fixture(scope="module")
def acts():
    """Intermediate activations ``[2, 7, 10]`` (bf16, as the model's) and the ChannelStats of them, fed in two
    calls of the hook (two batches)."""
    a = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(3)).bfloat16()
    st = ChannelStats(10, gram_device="cpu")
    st.hook(None, (a[:1],))
    st.hook(None, (a[1:],))
    return a, st


def test_channel_stats_sums_counts_and_gram(acts):
    """ChannelStats over two batches: tokens = 14, sum |a|, sum a^2, l2 = sqrt(sum a^2), mean = sum |a| / tokens,
    Gram = A^T A, all from one float64 reduction here."""
    a, st = acts
    x = a.double().reshape(-1, 10)
    assert st.tokens == 14
    torch.testing.assert_close(st.sum_abs, x.abs().sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.l2(), x.square().sum(0).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.mean_abs(), x.abs().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.gram, x.T @ x, rtol=1e-12, atol=1e-12)
    empty = ChannelStats(4)
    assert empty.gram is None and torch.equal(empty.mean_abs(), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("criterion,agg", [("activation", "l2"), ("activation", "mean"), ("wanda", "l2"),
                                           ("wanda", "mean"), ("taylor", "mean"), ("magnitude", "l2")])
def test_channel_scores_are_the_documented_values(acts, criterion, agg):
    """The exact score (not only its ranking): activation agg_t(a), wanda agg_t(a) * ||down[:, j]||, taylor the
    stats' agg, magnitude ||[gate[j], up[j], down[:, j]]||; float32 [I] on the CPU."""
    a, st = acts
    mlp = _MLP()
    x = a.double().reshape(-1, 10)
    act = x.square().sum(0).sqrt() if agg == "l2" else x.abs().mean(0)
    g, u, d = (m.weight.double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    want = {"activation": act, "taylor": act, "wanda": act * d.norm(dim=0),
            "magnitude": (g.square().sum(1) + u.square().sum(1) + d.square().sum(0)).sqrt()}[criterion]
    got = channel_scores(criterion, mlp, st, agg)
    assert got.dtype == torch.float32 and got.shape == (10,) and got.device.type == "cpu"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_random_scores_draw_from_the_given_generator():
    """random: torch.rand(I) from the generator passed in (so the run's seed decides), not the global RNG."""
    got = channel_scores("random", _MLP(), generator=torch.Generator().manual_seed(11))
    torch.manual_seed(0)
    assert torch.equal(got, torch.rand(10, generator=torch.Generator().manual_seed(11)))


@pytest.mark.parametrize("criterion", ["activation", "wanda", "taylor"])
def test_data_criteria_need_stats_of_the_layers_width(criterion):
    for stats in (None, ChannelStats(9)):
        with pytest.raises(ValueError, match=f"criterion {criterion} needs calibration statistics of width 10"):
            channel_scores(criterion, _MLP(), stats)


def test_unknown_criterion_is_refused():
    with pytest.raises(ValueError, match="unknown criterion 'fisher'"):
        channel_scores("fisher", _MLP(), ChannelStats(10))


# ---------------------------------------------------------------------------------------------------- refit

@pytest.fixture(scope="module")
def lsq():
    """A float64 problem: activations H [300, 24] (correlated: 24 channels from 10 factors plus noise), weight
    W [5, 24], kept channels S (16, ascending)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(300, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 24, generator=g, dtype=torch.float64)
    h += 0.3 * torch.randn(300, 24, generator=g, dtype=torch.float64)
    w = torch.randn(5, 24, generator=g, dtype=torch.float64)
    keep = torch.tensor(sorted(torch.randperm(24, generator=g)[:16].tolist()))
    return h, w, keep


def _ridge_reference(h, w, keep, damp):
    """min_W' ||H W^T - H_S W'^T||^2 + lam ||W' - W_S||^2, lam = damp * mean_j in S sum_t h_tj^2, as an augmented
    least-squares system (no normal equations)."""
    h_s, w_s = h[:, keep], w[:, keep]
    lam = damp * h_s.square().sum(0).mean()
    a = torch.cat([h_s, lam.sqrt() * torch.eye(keep.numel(), dtype=torch.float64)])
    b = torch.cat([h @ w.T, lam.sqrt() * w_s.T])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T


def _ridge_normal(h, w, keep, damp):
    """The same minimiser from its normal equations written for W' itself (LU solve; the refit writes them for
    W' - W_S and uses Cholesky): (H_S^T H_S + lam I) W'^T = H_S^T H W^T + lam W_S^T. Fast enough for the
    model-sized layers, and with heavy damping well conditioned."""
    h_s, w_s = h[:, keep], w[:, keep]
    lam = damp * h_s.square().sum(0).mean()
    a = h_s.T @ h_s + lam * torch.eye(keep.numel(), dtype=torch.float64)
    return torch.linalg.solve(a, h_s.T @ (h @ w.T) + lam * w_s.T).T


@pytest.mark.parametrize("damp", [0.3, 1e-3])
def test_refit_equals_the_ridge_reference_and_reports_exact_errors(lsq, damp):
    """float64 in, float64 out: the refit is the ridge solution to 1e-9, and the two reported errors are the
    reconstruction errors ||H W^T - H_S W'^T||^2 of plain slicing and of the refit (without the ridge term)."""
    h, w, keep = lsq
    r = refit_down_proj(w, h.T @ h, keep, damp)
    ref = _ridge_reference(h, w, keep, damp)
    assert r.weight.dtype == torch.float64 and r.weight.shape == (5, 16)
    torch.testing.assert_close(r.weight, ref, rtol=1e-9, atol=1e-9)
    y = h @ w.T
    assert r.error_before == pytest.approx((y - h[:, keep] @ w[:, keep].T).square().sum().item(), rel=1e-10)
    assert r.error_after == pytest.approx((y - h[:, keep] @ ref.T).square().sum().item(), rel=1e-8)
    assert r.error_after < r.error_before


def test_refit_returns_the_weights_dtype(lsq):
    """A float32 weight comes back float32 (the float64 solution cast once)."""
    h, w, keep = lsq
    r = refit_down_proj(w.float(), h.T @ h, keep, 0.3)
    assert r.weight.dtype == torch.float32
    torch.testing.assert_close(r.weight.double(), _ridge_reference(h, w.float().double(), keep, 0.3),
                               rtol=1e-6, atol=1e-6)


def test_refit_with_dead_kept_channels_is_plain_slicing(lsq):
    """Every kept channel is 0 on every token (nothing to regress on, the mean kept diagonal is 0): W[:, S]
    comes back, with error after = error before = the whole output's energy."""
    h, w, keep = lsq
    h = h.clone()
    h[:, keep] = 0
    r = refit_down_proj(w, h.T @ h, keep, 0.01)
    assert torch.equal(r.weight, w[:, keep])
    assert r.error_before == r.error_after == pytest.approx((h @ w.T).square().sum().item(), rel=1e-10)


def test_refit_with_nothing_removed_is_the_identity(lsq):
    """All channels kept: the weight unchanged and no error, without looking at the Gram (even a non-finite
    one)."""
    h, w, _ = lsq
    gram = h.T @ h
    gram[0, 0] = float("nan")
    r = refit_down_proj(w, gram, torch.arange(24), 0.01)
    assert torch.equal(r.weight, w) and (r.error_before, r.error_after) == (0.0, 0.0)


def test_refit_guards(lsq):
    """A non-finite Gram (here only in the removed block), a damped kept block that is not positive definite,
    a float32 or wrongly shaped Gram: ValueErrors naming ``where``."""
    h, w, keep = lsq
    gram = h.T @ h
    drop = sorted(set(range(24)) - set(keep.tolist()))
    bad = gram.clone()
    bad[drop[0], drop[0]] = float("inf")
    with pytest.raises(ValueError, match="^L7: the calibration Gram matrix has non-finite entries"):
        refit_down_proj(w, bad, keep, 0.01, where="L7")
    with pytest.raises(ValueError, match="^L7: damped Gram block of the kept channels is not positive definite"):
        refit_down_proj(w, -gram, keep, 0.01, where="L7")
    for g in (gram.float(), gram[:23, :23]):
        with pytest.raises(ValueError, match="^L7: Gram matrix .* does not match down_proj width 24"):
            refit_down_proj(w, g, keep, 0.01, where="L7")


# --------------------------------------------------------------------------------------------- calibration

class _CharTok:
    """A tokenizer without ``backend_tokenizer``: one id per character (its code point), optional bos/eos."""

    def __init__(self, bos=1, eos=2):
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _stream(texts, bos, eos):
    out = []
    for t in texts:
        out += ([bos] if bos is not None else []) + [ord(c) for c in t] + ([eos] if eos is not None else [])
    return out


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.mark.parametrize("bos,eos", [(1, 2), (None, 2), (None, None)])
def test_calibration_stream_with_a_plain_tokenizer(tmp_path, bos, eos):
    """Through the tokenizer's __call__ (no backend_tokenizer), with or without bos/eos: the windows are the
    stream [bos] doc [eos] ... cut into seq_len rows; sha256 of the int32 little-endian ids, file_sha256 of the
    file, a .json file read like .jsonl."""
    texts = [f"doc {i}" + "x" * (i % 4) for i in range(30)]
    ref = _stream(texts, bos, eos)
    for name in ("c.jsonl", "c.json"):
        f = _jsonl(tmp_path / name, texts)
        cal = load_calibration(f, _CharTok(bos, eos), 6, 11)
        want = torch.tensor(ref[:66]).view(6, 11)
        assert cal.input_ids.dtype == torch.int64 and torch.equal(cal.input_ids, want)
        assert cal.sha256 == hashlib.sha256(struct.pack("<66i", *ref[:66])).hexdigest()
        assert cal.file_sha256 == hashlib.sha256(f.read_bytes()).hexdigest() and cal.path == str(f)


def test_calibration_documents_count_at_the_window_boundary(tmp_path):
    """Documents of exactly 5 tokens (<bos> a b c <eos>) and windows of 5: the third document starts exactly
    where the two windows used end, so it is not counted; a file shorter than samples windows gives what it
    has (here 4 windows of 5 from 4 documents, 2 leftover tokens of a fifth dropped)."""
    f = _jsonl(tmp_path / "c.jsonl", ["abc"] * 4 + ["d"])
    two = load_calibration(f, _CharTok(), 2, 5)
    assert two.samples == 2 and two.documents == 2
    more = load_calibration(f, _CharTok(), 10, 5)
    assert more.samples == 4 and more.documents == 4 and more.tokens == 20
    assert torch.equal(more.input_ids.flatten(), torch.tensor(_stream(["abc"] * 4, 1, 2)))
    with pytest.raises(ValueError, match="23 tokens, fewer than one --seq-len 24 window"):
        load_calibration(f, _CharTok(), 1, 24)


def test_a_large_jsonl_is_read_only_as_far_as_needed(tmp_path):
    """A .jsonl is read in batches of 64 documents until samples * seq_len tokens are in: 64 documents of 5 tokens
    (a blank line among them, skipped) give exactly the 4 x 80 tokens asked for, so a broken line after them is
    never parsed; asking one window more reads on and names that line (line 66: blank lines count)."""
    lines = [json.dumps({"text": "abc"})] * 64
    lines.insert(9, "   ")
    lines.append("not json")
    f = tmp_path / "big.jsonl"
    f.write_text("\n".join(lines) + "\n")
    cal = load_calibration(f, _CharTok(), 4, 80)
    assert cal.samples == 4 and cal.documents == 64
    with pytest.raises(ValueError, match=re.escape(f"{f}:66: not a JSON object with a \"text\" field")):
        load_calibration(f, _CharTok(), 5, 80)


def test_calibration_file_errors(tmp_path):
    """A "text" that is not a string names its line; a file that is not UTF-8 (plain or jsonl) is a ValueError."""
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{f}:2: \"text\" is not a string")):
        load_calibration(f, _CharTok(), 1, 2)
    for name in ("c.txt", "d.jsonl"):
        (tmp_path / name).write_bytes(b'{"text": "caf\xe9"}\n')
        with pytest.raises(ValueError, match="not UTF-8 text"):
            load_calibration(tmp_path / name, _CharTok(), 1, 2)


def test_calibration_record_fields():
    """The lineage's calibration record: the bench corpus named by split and corpus hash (not a cache path), a
    file by its absolute path and no split/revision; counts, hashes and the seed from the run."""
    from bench.corpus import corpus_sha256

    from prune.run import _calibration_record

    cal = CalibrationSet(torch.zeros(3, 4, dtype=torch.int64), "/cache/x.jsonl", "f" * 64, "a" * 64, 2)
    common = {"config": None, "num_samples": 3, "seq_len": 4, "tokens": 12, "documents": 2, "seed": 5,
              "sha256": "a" * 64, "file_sha256": "f" * 64, "selection": "first", "device": "cpu"}
    for calib, split in ((None, "calib"), ("bench:train", "train")):
        assert _calibration_record(cal, PruneConfig(calib=calib, seed=5)) == \
            {"dataset": "bench.corpus", "split": split, "revision": corpus_sha256(), **common}
    assert _calibration_record(cal, PruneConfig(calib="my/c.jsonl", seed=5)) == \
        {"dataset": str(Path("my/c.jsonl").resolve()), "split": None, "revision": None, **common}
    # the device type, not its index: cuda:1 computes as cuda:0 does
    assert _calibration_record(cal, PruneConfig(calib="my/c.jsonl", seed=5, device="cuda:1"))["device"] == "cuda"


# -------------------------------------------------------------------------------------------------- summary

def _result(**kw):
    cfg = kw.pop("config")
    cal = CalibrationSet(torch.zeros(4, 64, dtype=torch.int64), "c", "0", "0", 1)
    base = dict(out=Path("/o"), config=cfg, layers=3, width_before=640, width_after=512, double_wide_layers=0,
                calibration=cal if cfg.needs_calibration else None, seconds=1.25)
    return PruneResult(**{**base, **kw})


def test_summary_reports_the_refit_errors():
    """Summed over layers 1 - sum(after) / sum(before), per layer the range of 1 - after / before over layers
    with an error (a layer with before = 0 is left out of the range), and the damping."""
    errors = [(4.0, 1.0), (2.0, 1.5), (0.0, 0.0)]
    s = _result(config=PruneConfig(refit=True, refit_damp=0.05), refit_errors=errors).summary()
    total = 100 * (1 - (1.0 + 1.5) / (4.0 + 2.0))
    per = sorted(100 * (1 - a / b) for b, a in errors if b)
    assert (f"refit: least-squares down_proj on 256 tokens (damp 0.05; down_proj reconstruction error on those "
            f"tokens -{total:.1f}% summed over layers, -{per[0]:.1f}% .. -{per[-1]:.1f}% per layer)") in s
    assert s.startswith("prune: 3 layers, intermediate_size 640 -> 512 (-20.0%; target 512.0 rounded to a "
                        "multiple of 128: 512), criterion activation (l2 over tokens), calibration 4 x 64 = 256 "
                        "tokens") and s.endswith(", cpu, 1.2 s -> /o")


def test_summary_of_runs_without_refit_errors():
    """ratio 0 with --refit says no refit ran and no rounding; a data-free criterion says so (no aggregation);
    taylor aggregates over windows; double-wide layers are reported at twice the width."""
    s = _result(config=PruneConfig(ratio=0, refit=True), width_after=640).summary()
    assert "ratio 0: every channel kept, no rounding" in s and ", refit: none (ratio 0, nothing removed)" in s
    assert "(-0.0%;" in s and "calibration none (data-free)" in s and "criterion activation," in s
    s = _result(config=PruneConfig(criterion="magnitude", aggregation="mean")).summary()
    assert "criterion magnitude, calibration none (data-free), cpu" in s and "refit" not in s
    s = _result(config=PruneConfig(criterion="taylor", aggregation="mean"), double_wide_layers=2).summary()
    assert "criterion taylor (mean over windows)" in s and ", 2 double-wide layers 1280 -> 1024)" in s


# ------------------------------------------------------------------------------------------------------ CLI

@pytest.fixture
def captured(monkeypatch):
    """prune.run.prune_checkpoint replaced by a recorder (main imports it at call time); transformers' progress
    bar switch too (so --no-progress changes nothing in this process)."""
    import transformers.utils.logging as hf_logging

    import prune.run

    seen = {"bars_off": 0}

    class Result:
        def summary(self):
            return "SUMMARY"

    def fake(ckpt, out, cfg, *, force, progress):
        if "raise" in seen:
            raise seen["raise"]
        seen.update(ckpt=ckpt, out=out, cfg=cfg, force=force, progress=progress)
        return Result()

    monkeypatch.setattr(prune.run, "prune_checkpoint", fake)
    monkeypatch.setattr(hf_logging, "disable_progress_bar", lambda: seen.update(bars_off=seen["bars_off"] + 1))
    return seen


def test_cli_passes_every_option_to_the_run(captured, capsys):
    """Each option reaches PruneConfig / prune_checkpoint with its own value (all non-default here), and the
    defaults are PruneConfig's."""
    from prune.__main__ import main

    argv = ["in", "-o", "out", "--ratio", "0.3", "--criterion", "wanda", "--agg", "mean", "--calib", "c.jsonl",
            "--samples", "5", "--seq-len", "7", "--batch-size", "3", "--device", "cuda:1", "--seed", "9", "--refit",
            "--refit-damp", "0.25", "--force", "--no-progress"]
    assert main(argv) == 0 and capsys.readouterr().out == "SUMMARY\n"
    assert captured["cfg"] == PruneConfig(ratio=0.3, criterion="wanda", aggregation="mean", calib="c.jsonl",
                                          samples=5, seq_len=7, batch_size=3, device="cuda:1", seed=9, refit=True,
                                          refit_damp=0.25)
    assert (captured["ckpt"], captured["out"], captured["force"], captured["progress"]) == ("in", "out", True, False)
    assert captured["bars_off"] == 1
    assert main(["in", "-o", "out"]) == 0
    assert captured["cfg"] == PruneConfig() and (captured["force"], captured["progress"]) == (False, True)
    assert captured["bars_off"] == 1


@pytest.mark.parametrize("exc,rc,line", [
    (ValueError("bad value"), 2, "prune: error: bad value"),
    (OSError("disk"), 1, "prune: error: disk"),
    (RuntimeError("cuda oom"), 1, "prune: error: cuda oom"),
    (FileExistsError("out exists"), 2, "prune: error: out exists"),
    (FileNotFoundError("no calib"), 2, "prune: error: no calib"),
    (PermissionError("read-only"), 1, "prune: error: read-only"),
    (KeyboardInterrupt(), 130, "prune: error: interrupted; nothing was written"),
    ("after-commit", 130, "prune: error: interrupted: /o was written; interrupted while syncing it to disk"),
])
def test_cli_exit_codes(captured, capsys, exc, rc, line):
    """Errors the run reports are one line, with pack.quantize's statuses: 2 for the input or the invocation (a
    ValueError, a missing path, an existing output), 1 for the machine; an interruption rc 130 (after the commit:
    it says the output was written)."""
    from pack.checkpoint import InterruptedAfterCommit
    from prune.__main__ import main

    captured["raise"] = InterruptedAfterCommit(Path("/o"), None) if exc == "after-commit" else exc
    assert main(["in", "-o", "out"]) == rc
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_cli_lets_a_programming_error_through(captured):
    """Anything but ValueError / OSError / RuntimeError / an interruption is a bug: a traceback, not a line."""
    from prune.__main__ import main

    captured["raise"] = TypeError("bug")
    with pytest.raises(TypeError, match="bug"):
        main(["in", "-o", "out"])


def test_cli_usage_errors_exit_2_in_one_line(capsys):
    from prune.__main__ import main

    for argv, msg in ((["in"], "the following arguments are required: -o/--out"),
                      (["in", "-o", "o", "--samples", "x"], "argument --samples: invalid int value: 'x'"),
                      (["in", "-o", "o", "--agg", "max"], "argument --agg: invalid choice: 'max'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"prune: error: {msg}") and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------- stack / weights guards

def test_check_supported_configs():
    """One architecture with a language-model head, of a supported model type, dense: two architectures, none,
    a head-less one, and a Gemma-4 MoE are refused."""
    from transformers import Gemma4TextConfig, LlamaConfig

    check_supported(LlamaConfig(architectures=["LlamaForCausalLM"]))
    check_supported(Gemma4TextConfig(architectures=["Gemma4ForCausalLM"]))
    two = "LlamaForCausalLM,LlamaForCausalLM"
    for archs, msg in ((["LlamaForCausalLM", "LlamaForCausalLM"], f"architecture {two} is not supported"),
                       (None, "architecture (none in config.json) is not supported"),
                       (["LlamaModel"], "architecture LlamaModel is not supported")):
        with pytest.raises(ValueError, match=re.escape(f"W: {msg}")):
            check_supported(LlamaConfig(architectures=archs), where="W")
    with pytest.raises(ValueError, match="W: Gemma-4 MoE models"):
        check_supported(Gemma4TextConfig(architectures=["Gemma4ForCausalLM"], enable_moe_block=True), where="W")


def _safetensors_dtype_names():
    """(torch dtype, safetensors name) pairs this torch / safetensors can write, names read back from the file
    header here."""
    names = [("bool", "BOOL"), ("uint8", "U8"), ("int8", "I8"), ("uint16", "U16"), ("int16", "I16"),
             ("uint32", "U32"), ("int32", "I32"), ("uint64", "U64"), ("int64", "I64"), ("float8_e4m3fn", "F8_E4M3"),
             ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0")]
    return [(getattr(torch, t), n) for t, n in names if hasattr(torch, t)]


def _header(f: Path) -> dict:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def test_weight_dtype_check(tmp_path, capsys):
    """Every integer / fp8 storage dtype is refused, naming the tensor; float weights of another width than
    bf16 are counted in one note; bf16 alone says nothing; .bin files and unreadable safetensors are left to the
    loader."""
    from safetensors.torch import save_file

    from prune.run import _check_weight_dtypes

    done = []
    for dt, name in _safetensors_dtype_names():
        f = tmp_path / f"{name}.safetensors"
        try:
            save_file({"a.weight": torch.zeros(2, 2, dtype=torch.bfloat16),
                       "b.weight": torch.zeros(4, dtype=torch.float32).to(dt)}, f)
        except Exception:   # a dtype this safetensors cannot write
            continue
        assert _header(f)["b.weight"]["dtype"] == name
        with pytest.raises(ValueError, match=re.escape(f"{f}: tensor b.weight is stored as {name}, not as floating")):
            _check_weight_dtypes(tmp_path, [f])
        done.append(name)
    assert {"BOOL", "U8", "I8", "I16", "I32", "I64", "F8_E4M3", "F8_E5M2"} <= set(done), done
    capsys.readouterr()
    mixed = tmp_path / "mixed.safetensors"
    save_file({"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.float32),
               "c": torch.zeros(2, dtype=torch.float16), "d": torch.zeros(2, dtype=torch.bfloat16)}, mixed)
    only_bf16 = tmp_path / "bf16.safetensors"
    save_file({"d": torch.zeros(2, dtype=torch.bfloat16)}, only_bf16)
    (tmp_path / "x.bin").write_bytes(b"\0" * 64)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    _check_weight_dtypes(tmp_path, [only_bf16, tmp_path / "x.bin", tmp_path / "junk.safetensors"])
    assert capsys.readouterr().err == ""
    _check_weight_dtypes(tmp_path, [mixed, only_bf16])
    assert capsys.readouterr().err == (f"prune: note: {tmp_path}: 1 tensors stored as F16, 2 tensors stored as F32 "
                                       f"are rounded to bf16\n")


# ---------------------------------------------------------------------------------------------- run guards

@pytest.mark.parametrize("device,ok", [("cuda", True), ("cuda:0", True), ("cuda:1", True), ("cuda:2", False),
                                       ("cuda:x", False), ("cuda:", False), ("cuda:-1", False)])
def test_cuda_device_index_is_checked_against_the_device_count(prune_ckpts, tmp_path, monkeypatch, device, ok):
    """On a machine with 2 CUDA devices (stood in for), cuda:0 .. cuda:1 pass the device check (the run goes
    on to read the config) and anything else is refused before any work, naming the range."""
    import prune.run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def reached(*a, **k):
        raise _Reached

    monkeypatch.setattr(prune.run, "_read_config", reached)
    cfg = PruneConfig(device=device, criterion="magnitude")
    if ok:
        with pytest.raises(_Reached):
            prune_checkpoint(prune_ckpts["text"], tmp_path / "out", cfg, progress=False)
    else:
        with pytest.raises(ValueError, match=re.escape(f"--device {device}: this machine has 2 CUDA device(s), "
                                                       f"cuda:0 .. cuda:1")):
            prune_checkpoint(prune_ckpts["text"], tmp_path / "out", cfg, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_vocabulary_guard_at_its_boundary(prune_ckpts, micro_tok, tmp_path, monkeypatch):
    """The largest calibration token id M must be below vocab_size: a config.json with vocab_size M is refused
    (the id would index past the embedding), one with M + 1 passes the check (stood in for by the next step, so
    the weights, left at the original vocabulary, are never loaded)."""
    from bench.corpus import load_texts

    import prune.run

    f = _jsonl(tmp_path / "c.jsonl", [t[:300] for t in load_texts("calib")[:8]])
    top = int(load_calibration(f, micro_tok, 4, 64).input_ids.max())

    def reached(*a, **k):
        raise _Reached

    monkeypatch.setattr(prune.run, "_check_weight_dtypes", reached)
    cfg = PruneConfig(samples=4, seq_len=64, calib=str(f))
    for vocab in (top, top + 1):
        ckpt = Path(shutil.copytree(prune_ckpts["text"], tmp_path / f"v{vocab}"))
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
        if vocab == top:
            with pytest.raises(ValueError, match=re.escape(f"token id {top} on the calibration text, outside the "
                                                           f"model's vocabulary (vocab_size {top})")):
                prune_checkpoint(ckpt, tmp_path / "out", cfg, progress=False)
        else:
            with pytest.raises(_Reached):
                prune_checkpoint(ckpt, tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tokenless(prune_ckpts, tmp_path_factory):
    """The text checkpoint without its tokenizer files."""
    d = tmp_path_factory.mktemp("tokenless") / "ckpt"
    d.mkdir()
    for f in prune_ckpts["text"].iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy2(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def random_run(tokenless, tmp_path_factory):
    out = tmp_path_factory.mktemp("random") / "out"
    return out, prune_checkpoint(tokenless, out, PruneConfig(criterion="random", seed=7), progress=False)


def test_random_criterion_draws_every_layer_from_one_seeded_generator(tokenless, random_run):
    """--criterion random --seed 7: layer i keeps the top 512 of the i-th torch.rand(640) of one
    torch.Generator seeded 7 (drawn in layer order, not reseeded per layer); data-free, so a checkpoint without
    a tokenizer prunes and nothing about calibration is recorded."""
    from prune.run import load_model

    out, res = random_run
    g = torch.Generator().manual_seed(7)
    orig, pruned = load_model(tokenless), load_model(out)
    seen = []
    for mo, mp in zip(_mlps(orig), _mlps(pruned), strict=True):
        want = torch.rand(640, generator=g).topk(512).indices.sort().values.tolist()
        assert _kept_rows(mo, mp) == want
        seen.append(want)
    assert seen[0] != seen[1]
    assert res.calibration is None and "calibration none (data-free)" in res.summary()
    step = read_lineage(out)[-1]
    assert step["calibration"] == [] and step["method"] == "mlp_width/random"
    assert step["params"] == {"ratio": 0.2, "criterion": "random", "aggregation": None, "intermediate_size": 640,
                              "kept_intermediate_size": 512, "round_multiple": 128, "seed": 7}


def test_force_replaces_an_earlier_output(tokenless, random_run, tmp_path, monkeypatch):
    """Without --force an existing output (or a dangling symlink in its place) is refused before any work (before
    the config is read: the writer's own refusal at the end does not count); with --force an earlier prune output
    is replaced by the new run's."""
    import prune.run

    out, _ = random_run
    cfg = PruneConfig(criterion="random", seed=8)
    before = sha256_file(out / "model.safetensors")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")

    def reached(*a, **k):
        raise _Reached

    with monkeypatch.context() as m:
        m.setattr(prune.run, "_read_config", reached)
        for dst in (out, link):
            with pytest.raises(FileExistsError, match="output directory exists; pass --force"):
                prune_checkpoint(tokenless, dst, cfg, progress=False)
    assert sha256_file(out / "model.safetensors") == before and link.is_symlink() and not link.exists()
    prune_checkpoint(tokenless, out, cfg, force=True, progress=False)
    assert sha256_file(out / "model.safetensors") != before and read_lineage(out)[-1]["params"]["seed"] == 8


def test_refit_damp_and_calibration_file_end_to_end(prune_ckpts, micro_tok, tmp_path):
    """--refit --refit-damp 1.0 --calib FILE (the 2-layer Llama): every layer's down_proj is the ridge solution
    with lambda = 1.0 * mean kept diagonal (not the default 0.01's, which differs), on windows built here from the
    file, with the activations of a plain full forward; the reported errors are that solution's; the lineage
    records the damping and the file (path, file hash, documents reaching the windows, no split / revision)."""
    from bench.corpus import load_texts

    from prune.run import load_model

    texts = [t[:400] for t in load_texts("calib")[:40]]
    f = _jsonl(tmp_path / "calib.jsonl", texts)
    stream, starts = [], []
    for t in texts:
        starts.append(len(stream))
        body = micro_tok(t, add_special_tokens=False)["input_ids"]
        stream += [micro_tok.bos_token_id, *body, micro_tok.eos_token_id]
    assert len(stream) >= SAMPLES * SEQ
    ids = torch.tensor(stream[:SAMPLES * SEQ]).view(SAMPLES, SEQ)
    out = tmp_path / "out"
    res = prune_checkpoint(prune_ckpts["llama"], out, PruneConfig(calib=str(f), samples=SAMPLES, seq_len=SEQ,
                                                                 refit=True, refit_damp=1.0), progress=False)
    orig, pruned = load_model(prune_ckpts["llama"]), load_model(out)
    acts = [[] for _ in _mlps(orig)]
    hooks = [m.down_proj.register_forward_pre_hook(
        lambda mod, a, i=i: acts[i].append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for i, m in enumerate(_mlps(orig))]
    with torch.no_grad():
        for b in ids.split(4):
            orig(input_ids=b)
    for h in hooks:
        h.remove()
    checked_default = False
    for mo, mp, a, (e0, e1) in zip(_mlps(orig), _mlps(pruned), acts, res.refit_errors, strict=True):
        h = torch.cat(a)
        keep = torch.tensor(_kept_rows(mo, mp))
        w = mo.down_proj.weight.double()
        ref = _ridge_normal(h, w, keep, 1.0)
        got = mp.down_proj.weight.double()
        torch.testing.assert_close(got, ref, rtol=2.0 ** -8 * 1.001, atol=1e-12)
        if not checked_default:   # the default damping's solution is another one (so the damping matters here)
            ref_default = _ridge_normal(h, w, keep, 0.01)
            assert not torch.allclose(got, ref_default, rtol=2.0 ** -8 * 1.001, atol=1e-12)
            checked_default = True
        y = h @ w.T
        assert e0 == pytest.approx((y - h[:, keep] @ w[:, keep].T).square().sum().item(), rel=1e-9)
        assert e1 == pytest.approx((y - h[:, keep] @ ref.T).square().sum().item(), rel=1e-6)
    step = read_lineage(out)[-1]
    assert step["params"] == {"ratio": 0.2, "criterion": "activation", "aggregation": "l2", "intermediate_size": 640,
                              "kept_intermediate_size": 512, "round_multiple": 128, "seed": 0, "refit": True,
                              "refit_damp": 1.0}
    (cal,) = step["calibration"]
    assert cal == {"dataset": str(f), "split": None, "revision": None, "config": None, "num_samples": SAMPLES,
                   "seq_len": SEQ, "tokens": SAMPLES * SEQ, "seed": 0,
                   "documents": sum(1 for s in starts if s < SAMPLES * SEQ),
                   "sha256": hashlib.sha256(ids.to(torch.int32).numpy().astype("<i4").tobytes()).hexdigest(),
                   "file_sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "selection": "first", "device": "cpu"}
    assert 1 < cal["documents"] < len(texts)
    assert "(damp 1;" in res.summary()


@pytest.mark.parametrize("kw", [{"criterion": "taylor", "refit": True}, {"criterion": "activation"},
                                {"criterion": "magnitude"}])
def test_progress_total_is_what_the_passes_report(prune_ckpts, tmp_path, monkeypatch, kw):
    """The calibration bar's total equals the updates it gets: per batch (ceil(5 / 2) = 3 here) one for the
    taylor pass and, in the layer-by-layer pass (activation scores or --refit), one for the embedding and one per
    layer; a data-free run has no bar (total 0, disabled)."""
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, *, total, desc, unit, disable):
            self.total, self.disable, self.n = total, disable, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    real = tqdm.auto.tqdm   # transformers' own bars (loading, writing) stay real
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: Bar(**k) if k.get("desc") == "prune: calibrating"
                        else real(*a, **k))
    cfg = PruneConfig(samples=5, seq_len=32, batch_size=2, **kw)
    prune_checkpoint(prune_ckpts["llama"], tmp_path / "out", cfg, progress=True)
    (bar,) = bars
    layers, batches = 2, 3
    want = batches * ((layers + 1) * (kw.get("refit", False) or kw["criterion"] == "activation")
                      + (kw["criterion"] == "taylor"))
    assert bar.total == bar.n == want and bar.disable is (want == 0)
