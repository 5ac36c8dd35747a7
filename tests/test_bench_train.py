"""bench.train: deterministic on CPU, learns, records lineage and the loss curve, honours its time budget."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.train import TrainConfig, _Schedule, main, train
from tests.bench_fixtures import trained_micro  # noqa: F401  (session fixture)

TINY = dict(scale="micro", steps=2, batch=2, seq_len=32, warmup=1, eval_every=2, eval_tokens=64,
            train_tokens=4096, unigram=False)


def _quiet(*a, **k):
    pass


def test_same_seed_same_weight_bytes_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(TrainConfig(**TINY, seed=seed), tmp_path / name, log=_quiet)
        runs[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_schedule_warmup_then_cosine():
    s = _Schedule(warmup=4, total=14, floor=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and math.isclose(s(9), 0.55) and math.isclose(s(14), 0.1) and math.isclose(s(99), 0.1)
    assert all(s(i) >= s(i + 1) for i in range(4, 20))


def test_trained_micro_learned_and_is_recorded(trained_micro):
    from bench import corpus
    from bench.eval import eval_windows, unigram_counts, unigram_perplexity
    from bench.tokenizer import get_tokenizer
    from bench.train import TEST_MICRO

    step = json.loads((trained_micro / "pdqkit_lineage.json").read_text())["source_lineage"][-1]
    assert step["kind"] == "base" and step["init"] == "trained"
    assert step["tokens_seen"] == TEST_MICRO["steps"] * TEST_MICRO["batch"] * TEST_MICRO["seq_len"]
    assert step["data"]["corpus_sha256"] == corpus.corpus_sha256()   # (verified against the pin when pinned)
    assert step["recipe"]["seq_len"] == TEST_MICRO["seq_len"]
    log = json.loads((trained_micro / "train_log.json").read_text())
    losses = [v for _, v in log["loss_curve"]]
    assert len(losses) == TEST_MICRO["steps"] and log["tokens_per_s"] > 0
    assert losses[0] > math.log(2048) - 0.5  # starts near uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    # better than the unigram baseline of the data it saw, on held-out tokens
    tok = get_tokenizer("micro")
    windows = eval_windows(tok, TEST_MICRO["seq_len"], TEST_MICRO["eval_tokens"])
    counts = unigram_counts(corpus.token_stream("train", tok, TEST_MICRO["train_tokens"]), len(tok))
    assert step["final"]["valid_ppl"] < unigram_perplexity(counts, windows)
    assert log["valid_curve"][-1][1] == step["final"]["valid_loss"]


def test_time_budget_shortens_the_run(tmp_path):
    cfg = TrainConfig(**{**TINY, "steps": 40, "batch": 1, "seq_len": 32, "eval_every": 100}, time_budget=1e-3)
    log = train(cfg, tmp_path / "t", log=_quiet)
    assert log["steps_planned"] == 40 and 11 <= log["steps"] < 40  # stopped right after the timing probe
    assert len(log["loss_curve"]) == log["steps"]
    step = json.loads((tmp_path / "t" / "pdqkit_lineage.json").read_text())["source_lineage"][-1]
    assert step["recipe"]["steps"] == log["steps"] and step["tokens_seen"] == log["steps"] * 32


def test_time_budget_shrinks_the_warmup(tmp_path):
    """A run cut short keeps its warm-up below the new length (never below the steps already taken), and the
    lineage records the warm-up that ran."""
    cfg = TrainConfig(**{**TINY, "steps": 40, "warmup": 30, "batch": 1, "seq_len": 32, "eval_every": 100},
                      time_budget=1e-3)
    log = train(cfg, tmp_path / "t", log=_quiet)
    step = json.loads((tmp_path / "t" / "pdqkit_lineage.json").read_text())["source_lineage"][-1]
    assert log["steps"] < 40 and step["recipe"]["warmup"] < 30 and step["recipe"]["warmup"] <= log["steps"]


def test_cli_rejects_bad_input(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert main(["--scale", "micro", "-o", str(tmp_path / "exists")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--scale", "micro", "-o", str(tmp_path / "x"), "--warmup", "500", "--steps", "10"]) == 2
    assert "--warmup" in capsys.readouterr().err
    assert main(["--scale", "micro", "-o", str(tmp_path / "x"), "--eval-every", "0"]) == 2
    assert "--eval-every must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--scale", "e4b", "-o", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fewer_windows_than_a_batch_is_refused(tmp_path):
    """A batch would silently shrink to the windows there are, and tokens_seen (steps x batch x seq_len, which the
    lineage and the distill budget read) would overstate what was trained."""
    with pytest.raises(ValueError, match="4 windows of 32 tokens, fewer than one --batch of 8"):
        train(TrainConfig(**{**TINY, "batch": 8, "train_tokens": 128}), tmp_path / "o", log=_quiet)
    assert not (tmp_path / "o").exists()


def test_trained_micro_cache_key_covers_the_transformers_version(monkeypatch):
    """The cached test checkpoint is trained by transformers' Gemma-4 code: another transformers version must train
    a fresh one, not reuse the old entry (the corpus pin does not catch it once the corpus is cached)."""
    import transformers

    import bench.cache
    from bench.train import trained_micro_checkpoint

    names, real = [], bench.cache.cached_dir

    def fake_cached_dir(name, build):   # the corpus and tokenizer come from the cache as usual
        if not name.startswith("trained-micro-"):
            return real(name, build)
        names.append(name)
        return Path("/nonexistent") / name

    monkeypatch.setattr(bench.cache, "cached_dir", fake_cached_dir)
    trained_micro_checkpoint()
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".other")
    trained_micro_checkpoint()
    assert len(names) == 2 and names[0] != names[1]
