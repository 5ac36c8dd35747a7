"""DistillConfig (distill/config.py): which fields are compared on --resume (RESULT_FIELDS, result_dict) and the
boundary guards of ``__post_init__``: each rejects the value just outside its range with a message naming the
option, and accepts the value just inside."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from distill.config import LOSS_IMPLS, PRECISIONS, RESULT_FIELDS, TRAINABLE, DistillConfig

# Every DistillConfig field that is NOT compared on --resume, each with why it cannot change the trained weights.
# A new field must be added here or to RESULT_FIELDS (test_every_field_is_classified).
NON_RESULT_FIELDS = {
    "out": "where the final weights are written",
    "grad_ckpt": "activation checkpointing recomputes the same forward: same values, less memory",
    "ckpt_layers": "how many layers grad_ckpt recomputes (models.limit_checkpointing: values the same either way)",
    "device": "which device runs it; the precision it implies is resolved into `precision` (compared) first",
    "threads": "CPU thread count (a speed setting)",
    "ckpt_every": "training-checkpoint cadence",
    "ckpt_dir": "where training checkpoints go",
    "resume": "whether to continue from a checkpoint",
    "keep_ckpt": "whether checkpoints are kept after the run",
    "log_every": "logging cadence",
    "log_json": "log file path",
    "peak_tflops": "MFU denominator, reporting only",
    "force": "whether an existing output/checkpoint may be replaced",
    "extra": "free-form dict, not read by training",
}


def _base(**kw) -> DistillConfig:
    """A valid phase-1 config with every result field set explicitly (so changing one alone stays valid)."""
    args = dict(teacher="t", student="s", out="o", phase=1, data="d.txt", max_tokens=1000, steps=10, batch=4,
                seq_len=64, lr=1e-4, min_lr_ratio=0.1, warmup_steps=2, weight_decay=0.0, adam_betas=(0.9, 0.95),
                adam_eps=1e-8, grad_clip=1.0, seed=0, temperature=1.0, hidden_weight=1.0, hidden_layers=[0, 1],
                hidden_layer_weights=[1.0, 1.0], lmbda=0.5, beta=0.5, sample_temperature=0.9, jsd_temperature=1.0,
                max_new_tokens=16, train_embeddings=False, precision="fp32", chunk=2048, attn="sdpa",
                trainable="all", ema_decay=0.0, ce_weight=0.0, loss_impl="autograd", compile_loss=False,
                compile_layers=False, deterministic=False)
    args.update(kw)
    return DistillConfig(**args)


# One valid change per result field (relative to _base). The keys must be exactly RESULT_FIELDS: a new result
# field needs a change here that the test proves result_dict (and so --resume) sees.
RESULT_CHANGES = {
    "teacher": "t2", "student": "s2", "phase": 2, "data": "d2.txt", "steps": 11, "batch": 5, "seq_len": 65,
    "lr": 2e-4, "min_lr_ratio": 0.2, "warmup_steps": 3, "weight_decay": 0.01, "adam_betas": (0.9, 0.99),
    "adam_eps": 1e-6, "grad_clip": 0.5, "seed": 1, "temperature": 2.0, "hidden_weight": 0.5,
    "hidden_layers": [0, 2], "hidden_layer_weights": [1.0, 3.0], "lmbda": 0.25, "beta": 0.75,
    "sample_temperature": 0.7, "jsd_temperature": 0.5, "max_new_tokens": 17, "train_embeddings": True,
    "precision": "bf16-mixed", "chunk": 1024, "max_tokens": 2000, "attn": "eager", "trainable": "mlp",
    "ema_decay": 0.5, "ce_weight": 0.1, "loss_impl": "fused", "compile_loss": True, "compile_layers": True,
    "deterministic": True,
}


def test_every_field_is_classified():
    """Each DistillConfig field is either compared on --resume (RESULT_FIELDS) or listed above as one that cannot
    change the weights — never both, never neither; RESULT_FIELDS names real fields, once each, and result_dict has
    exactly those keys."""
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert len(set(RESULT_FIELDS)) == len(RESULT_FIELDS)
    assert set(RESULT_FIELDS) <= fields
    assert not set(RESULT_FIELDS) & set(NON_RESULT_FIELDS)
    assert set(RESULT_FIELDS) | set(NON_RESULT_FIELDS) == fields, "classify the new field(s)"
    assert set(_base().result_dict()) == set(RESULT_FIELDS)


def test_weight_determining_fields_are_result_fields():
    """The data window (--max-tokens: load_blocks reads only the first N tokens, so other batches) and the
    per-layer hidden-state loss weights (--hidden-layer-weights: layer_selection scales each layer's MSE by them)
    change the trained weights, so they are compared on --resume. Proven here through the code paths themselves:
    the per-layer weights layer_selection returns differ, and so must result_dict."""
    a, b = _base(), _base(hidden_layer_weights=[1.0, 3.0])
    assert a.layer_selection(4)[1] != b.layer_selection(4)[1]   # a different loss...
    assert a.result_dict() != b.result_dict()                   # ...is a different result
    assert {"max_tokens", "hidden_layer_weights", "hidden_layers", "hidden_weight", "data"} <= set(RESULT_FIELDS)


def test_result_changes_cover_result_fields():
    """The change table below names exactly the result fields (so a new one gets a change to prove)."""
    assert set(RESULT_CHANGES) == set(RESULT_FIELDS)


@pytest.mark.parametrize("name", RESULT_FIELDS)
def test_changing_a_result_field_changes_result_dict(name):
    """Changing one result field changes result_dict in that key and no other, also after the JSON round trip
    meta.json puts it through (train.py compares the fresh result_dict with the checkpoint's by key: a difference
    refuses the --resume)."""
    base = _base()
    changed = dataclasses.replace(base, **{name: RESULT_CHANGES[name]})
    a, b = base.result_dict(), changed.result_dict()
    stored = json.loads(json.dumps(a))   # what the killed run wrote into meta.json
    assert sorted(k for k in a if b[k] != stored[k]) == [name]
    assert sorted(k for k in a if b[k] != a[k]) == [name]


def test_result_dict_survives_the_meta_json_round_trip():
    """result_dict is what meta.json stores and --resume compares against the continuation's own: it must equal
    its JSON round trip (a tuple, e.g. adam_betas, would come back a list and refuse every resume)."""
    for cfg in (_base(), _base(**RESULT_CHANGES | {"phase": 1, "data": None, "train_embeddings": False}),
                dataclasses.replace(_base(), phase=2)):
        d = cfg.result_dict()
        assert json.loads(json.dumps(d)) == d


def test_result_dict_resolves_model_and_data_paths():
    """teacher, student and data are compared as resolved paths: the same files written differently compare equal,
    other files not; data None stays None."""
    d = _base(teacher="./x/../t", student="s/.", data="./d.txt").result_dict()
    assert (d["teacher"], d["student"], d["data"]) == tuple(str(Path(p).resolve()) for p in ("t", "s", "d.txt"))
    assert _base(data=None).result_dict()["data"] is None


@pytest.mark.parametrize("name, value", [
    ("out", "other-out"), ("grad_ckpt", True), ("ckpt_layers", 1), ("device", "cpu"), ("threads", 2),
    ("ckpt_every", 5), ("ckpt_dir", "elsewhere"), ("resume", True), ("keep_ckpt", True), ("log_every", 3),
    ("log_json", "log.jsonl"), ("peak_tflops", 100.0), ("force", True), ("extra", {"k": 1}),
])
def test_non_result_fields_do_not_change_result_dict(name, value):
    """The settings a continuation may change (paths, logging, cadence, speed) leave result_dict as it was, so
    --resume accepts them."""
    assert name in NON_RESULT_FIELDS
    base = _base()
    assert getattr(base, name) != value
    assert dataclasses.replace(base, **{name: value}).result_dict() == base.result_dict()


# --- __post_init__ guards ------------------------------------------------------------------------------------

TINY = 1e-12
BELOW_1 = math.nextafter(1.0, 0.0)
ABOVE_1 = math.nextafter(1.0, 2.0)
BELOW_0 = -5e-324


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{"teacher": "t", "student": "s", "out": "o", **kw})


# (settings just outside a boundary, text the message must contain: the option's name)
REJECTED = [
    (dict(trainable="none"), "--trainable"),
    (dict(trainable="mlp", train_embeddings=True), "--trainable mlp"),
    (dict(phase=0), "--phase"),
    (dict(phase=3), "--phase"),
    (dict(teacher=""), "--teacher"),
    (dict(student=""), "--student"),
    (dict(out=""), "--out"),
    *[(dict({n: 0}), f"--{n.replace('_', '-')} 0") for n in
      ("steps", "batch", "seq_len", "max_new_tokens", "chunk", "log_every")],
    *[(dict({n: 2.0}), f"--{n.replace('_', '-')} 2.0") for n in ("steps", "batch", "chunk", "log_every")],
    (dict(ckpt_every=-1), "--ckpt-every -1"),
    (dict(warmup_steps=-1), "--warmup-steps -1"),
    (dict(ckpt_every=1.0), "--ckpt-every"),
    (dict(seq_len=64, max_tokens=63), "--max-tokens 63"),
    *[(dict({n: v}), f"--{n.replace('_', '-')} ") for n in
      ("lr", "temperature", "sample_temperature", "jsd_temperature", "peak_tflops")
      for v in (0.0, -TINY, math.inf, math.nan)],
    *[(dict({n: v}), f"--{n.replace('_', '-')} ") for n in ("weight_decay", "grad_clip", "hidden_weight", "ce_weight")
      for v in (BELOW_0, math.inf, math.nan)],
    *[(dict({n: v}), f"--{n.replace('_', '-')} ") for n in ("lmbda", "beta", "min_lr_ratio")
      for v in (BELOW_0, ABOVE_1, math.nan)],
    (dict(ema_decay=1.0), "--ema-decay"),
    (dict(ema_decay=BELOW_0), "--ema-decay"),
    (dict(ema_decay=True), "--ema-decay"),
    (dict(ema_decay=False), "--ema-decay"),   # a flag is not a decay (False == 0 would otherwise pass)
    (dict(adam_betas="0.9,0.95"), "--adam-betas 0.9,0.95"),
    (dict(adam_betas="00"), "--adam-betas 00"),   # a two-character string: not two values either
    (dict(adam_betas=(0.9,)), "--adam-betas"),
    (dict(adam_betas=(0.9, 0.95, 0.99)), "--adam-betas"),
    (dict(adam_betas=(1.0, 0.95)), "--adam-betas"),
    (dict(adam_betas=(0.9, 1.0)), "--adam-betas"),
    (dict(adam_betas=(BELOW_0, 0.95)), "--adam-betas"),
    (dict(adam_betas=(0.9, BELOW_0)), "--adam-betas"),
    (dict(adam_eps=0.0), "--adam-eps"),
    (dict(adam_eps=-TINY), "--adam-eps"),
    (dict(adam_eps=math.inf), "--adam-eps"),
    (dict(adam_eps=True), "--adam-eps"),
    (dict(phase=2, seq_len=128, max_new_tokens=128), "--seq-len 128"),
    (dict(hidden_layers=[]), "--hidden-layers"),
    (dict(hidden_layers=[-1]), "--hidden-layers"),
    (dict(hidden_layers=[0.0]), "--hidden-layers"),
    (dict(hidden_layers=[1, 1]), "--hidden-layers"),
    (dict(hidden_layer_weights=[1.0]), "--hidden-layer-weights"),
    (dict(hidden_layers=[0, 1], hidden_layer_weights=[1.0]), "--hidden-layer-weights"),
    (dict(hidden_layers=[0, 1], hidden_layer_weights=[1.0, BELOW_0]), "--hidden-layer-weights"),
    (dict(hidden_layers=[0], hidden_layer_weights=[math.inf]), "--hidden-layer-weights"),
    (dict(hidden_layers=[0], hidden_layer_weights=[math.nan]), "--hidden-layer-weights"),
    (dict(precision="bf16"), "--precision"),
    (dict(attn="flash"), "--attn"),
    (dict(loss_impl="triton"), "--loss-impl"),
    (dict(phase=2, seq_len=256, loss_impl="fused"), "--loss-impl fused"),
    (dict(phase=2, seq_len=256, ce_weight=0.1), "--ce-weight"),
    (dict(phase=2, seq_len=256, compile_loss=True), "--compile-loss"),
    (dict(phase=2, seq_len=256, compile_layers=True), "--compile-layers"),
    (dict(steps=2, warmup_steps=2), "--warmup-steps 2"),
    (dict(ckpt_layers=-1), "--ckpt-layers"),
    (dict(ckpt_layers=1.0), "--ckpt-layers"),
    (dict(device="gpu"), "--device"),
    (dict(device="CPU"), "--device"),
    (dict(device="cuda0"), "--device"),
    (dict(device="cuda:"), "--device"),
    (dict(device="cuda:x"), "--device"),
    (dict(threads=0), "--threads"),
    (dict(threads=1.5), "--threads"),   # the CLI parses an int; a config built in Python must hold one too
    (dict(threads=True), "--threads"),
]

# settings just inside the same boundaries: accepted, and kept as given (``expect``: the stored value, if not it)
ACCEPTED = [
    dict(trainable="mlp"), dict(trainable="all", train_embeddings=True),
    *[dict(trainable=t) for t in TRAINABLE],
    dict(phase=1), dict(phase=2),
    *[dict({n: 1}) for n in ("steps", "batch", "seq_len", "max_new_tokens", "chunk", "log_every")],
    dict(ckpt_every=0), dict(warmup_steps=0),
    dict(seq_len=64, max_tokens=64), dict(max_tokens=None),
    *[dict({n: TINY}) for n in ("lr", "temperature", "sample_temperature", "jsd_temperature", "peak_tflops")],
    *[dict({n: 0.0}) for n in ("weight_decay", "grad_clip", "hidden_weight", "ce_weight")],
    *[dict({n: v}) for n in ("lmbda", "beta", "min_lr_ratio") for v in (0.0, 1.0)],
    dict(ema_decay=0.0), dict(ema_decay=BELOW_1),
    dict(adam_betas=(0.0, 0.0)), dict(adam_betas=(BELOW_1, BELOW_1)),
    dict(adam_eps=TINY),
    dict(phase=2, seq_len=129, max_new_tokens=128),
    dict(hidden_layers=[0]), dict(hidden_layers=[3, 0]),
    dict(hidden_layers=[0, 1], hidden_layer_weights=[0.0, 2.0]),
    *[dict(precision=p) for p in PRECISIONS], dict(precision=None),
    *[dict(attn=a) for a in ("sdpa", "eager", "flex_attention", "flash_attention_2", "pdq_hybrid")],
    *[dict(loss_impl=x) for x in LOSS_IMPLS],
    dict(phase=2, seq_len=256, ce_weight=0.0, compile_loss=False, compile_layers=False, loss_impl="autograd"),
    dict(ce_weight=0.1, compile_loss=True, compile_layers=True, loss_impl="fused"),
    dict(steps=2, warmup_steps=1), dict(steps=1, warmup_steps=1),   # one step: no decay follows, any warm-up
    dict(ckpt_layers=0), dict(ckpt_layers=None),
    *[dict(device=d) for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:12")],
    dict(threads=1), dict(threads=None),
]


@pytest.mark.parametrize("kw, option", REJECTED, ids=[str(kw) for kw, _ in REJECTED])
def test_guard_rejects_just_outside(kw, option):
    """A value just outside an option's range is refused at construction with a ValueError naming the option."""
    with pytest.raises(ValueError) as e:
        _cfg(**kw)
    assert option in str(e.value)


@pytest.mark.parametrize("kw", ACCEPTED, ids=[str(kw) for kw in ACCEPTED])
def test_guard_accepts_just_inside(kw):
    """The value just inside the same boundary is accepted and kept as given."""
    cfg = _cfg(**kw)
    for k, v in kw.items():
        got = getattr(cfg, k)
        assert got == v or (k == "adam_betas" and got == tuple(float(b) for b in v)), (k, got, v)


def test_adam_betas_are_stored_as_a_float_tuple():
    """--adam-betas given as a list (argparse) or ints is stored as a tuple of floats (result_dict compares them)."""
    cfg = _cfg(adam_betas=[0, 0.5])
    assert cfg.adam_betas == (0.0, 0.5) and all(type(b) is float for b in cfg.adam_betas)


@pytest.mark.parametrize("phase", [1, 2])
def test_phase_defaults_fill_only_what_is_unset(phase):
    """Fields left at None take the phase's defaults (PHASE_DEFAULTS), warm-up defaults to 10% of steps (at least 1;
    0 for a single step), and the default --ckpt-dir is OUT + '-ckpt' beside the normalised OUT."""
    from distill.config import PHASE_DEFAULTS

    cfg = _cfg(phase=phase, out="run/out/")
    for k, v in PHASE_DEFAULTS[phase].items():
        assert getattr(cfg, k) == v
    assert cfg.warmup_steps == max(1, cfg.steps // 10)
    assert _cfg(phase=phase, steps=1).warmup_steps == 0
    assert _cfg(phase=phase, steps=5).warmup_steps == 1 and _cfg(phase=phase, lr=3e-3).lr == 3e-3  # given: kept
    assert cfg.ckpt_dir == str(Path("run/out")) + "-ckpt"
