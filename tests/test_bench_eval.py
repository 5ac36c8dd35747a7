"""bench.eval: metrics against independent computations; bf16 and pack-quantized checkpoints via the HF path."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from bench import eval as bench_eval
from tests.bench_fixtures import trained_micro  # noqa: F401  (session fixture)

QUICK = dict(max_tokens=1024, seq_len=128, batch_size=4, prompts=4, prompt_len=16, new_tokens=8, unigram=False)


@pytest.fixture(scope="module")
def random_micro(tmp_path_factory):
    """An untrained micro checkpoint with the bench tokenizer: a student far from the trained teacher."""
    from bench.factory import save_random_checkpoint
    from bench.tokenizer import get_tokenizer

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("rand") / "random-micro", seed=7,
                                  tokenizer=get_tokenizer("micro"))


@pytest.fixture(scope="module")
def quantized_micro(trained_micro, tmp_path_factory):
    from pack import quantize
    out = tmp_path_factory.mktemp("q") / "micro-w4a16"
    assert quantize.main([str(trained_micro), "-o", str(out), "--no-progress"]) == 0
    return out


def test_model_against_itself_kl_zero_agreement_one(trained_micro):
    rep = bench_eval.evaluate([trained_micro], teacher=trained_micro, log=lambda *a: None, **QUICK)
    (row,) = rep["rows"]
    assert row["kl"] == pytest.approx(0.0, abs=1e-7) and row["top1"] == 1.0
    assert row["greedy"] == 1.0 and row["first_div"] == QUICK["new_tokens"]
    assert row["tokens"] == rep["windows"] * (QUICK["seq_len"] - 1) == 8 * 127
    lineage = json.loads((trained_micro / "pdqkit_lineage.json").read_text())["source_lineage"]
    assert not row["quantized"] and row["params"] == lineage[-1]["params"]


def test_ppl_and_kl_match_direct_computation(trained_micro, random_micro):
    teacher, tok = bench_eval.load_model(trained_micro)
    student, _ = bench_eval.load_model(random_micro)
    windows = bench_eval.eval_windows(tok, 32, 64)  # 2 windows × 31 targets
    r = bench_eval.evaluate_model(student, windows, teacher, batch_size=1)
    with torch.no_grad():
        hf_loss = torch.stack([student(input_ids=w[None], labels=w[None]).loss for w in windows])
        lt = teacher(input_ids=windows).logits.double()[:, :-1].reshape(-1, 2048)
        ls = student(input_ids=windows).logits.double()[:, :-1].reshape(-1, 2048)
    # HF's own shifted cross-entropy (mean per window, equal-length windows)
    assert r["tokens"] == 62 and r["nll"] / r["tokens"] == pytest.approx(hf_loss.mean().item(), rel=1e-5)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=lt),
                                           torch.distributions.Categorical(logits=ls))
    assert r["kl"] / r["tokens"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert r["kl"] > 0.5  # a random student is far from the trained teacher
    assert r["top1"] == (lt.argmax(-1) == ls.argmax(-1)).sum().item()


def test_greedy_tokens_match_a_plain_argmax_loop(trained_micro):
    model, tok = bench_eval.load_model(trained_micro)
    prompts = bench_eval.prompt_windows(tok, 12, 2)
    got = bench_eval.greedy_tokens(model, prompts, 6)
    x = prompts.clone()
    with torch.no_grad():
        for _ in range(6):  # no KV cache, full recompute: independent of generate()
            logits = model(input_ids=x, use_cache=False).logits[:, -1]
            logits[:, tok.eos_token_id] = -float("inf")  # the harness suppresses EOS (fixed-length answers)
            x = torch.cat([x, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, x[:, 12:])


def test_greedy_agreement_and_unigram_helpers():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]])
    b = torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8], [2, 1, 1, 1]])
    frac, first = bench_eval.greedy_agreement(a, b)
    assert frac == pytest.approx(10 / 12) and first == pytest.approx((2 + 4 + 0) / 3)
    train = np.array([0, 1, 1, 2, 2, 2, 5])
    counts = bench_eval.unigram_counts(train, 6)
    windows = torch.tensor([[9, 2, 1, 3], [9, 2, 2, 4]])  # the first token of a window is never a target
    c, total, v = Counter(train.tolist()), len(train), 6
    direct = math.exp(-sum(math.log((c[t] + 1) / (total + v)) for t in (2, 1, 3, 2, 2, 4)) / 6)
    assert bench_eval.unigram_perplexity(counts, windows) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("which", ["bf16", "quantized"])
def test_bf16_load_computes_like_from_pretrained(trained_micro, quantized_micro, which):
    """In bf16 (the CUDA default) the harness scores the model ``from_pretrained(dtype=bf16)`` gives: RoPE
    frequencies kept in fp32 (a plain ``.to(bf16)`` rounds them and shifts every position), logits equal."""
    from transformers import AutoModelForCausalLM

    path = trained_micro if which == "bf16" else quantized_micro
    model, _ = bench_eval.load_model(path, "cpu", torch.bfloat16)
    inv = {n: b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert inv and set(inv.values()) == {torch.float32}, inv
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(4, 2048, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref(input_ids=ids[:, :1])   # a pack-quantized model decompresses on its first forward
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_pack_quantized_checkpoint_loads_through_hf(trained_micro, quantized_micro):
    cfg = json.loads((quantized_micro / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    rep = bench_eval.evaluate([trained_micro, quantized_micro], teacher=trained_micro, log=lambda *a: None,
                              **QUICK)
    bf16, q = rep["rows"]
    assert q["quantized"] and not bf16["quantized"] and q["params"] == bf16["params"]
    assert q["size_mb"] < 0.6 * bf16["size_mb"]
    assert 0 < q["kl"] < 0.1 and q["top1"] > 0.8  # int4 g128: close to, not equal to, the bf16 model
    assert abs(q["ppl"] / bf16["ppl"] - 1) < 0.1


def test_cli_table_and_json(trained_micro, random_micro, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench_eval.main([str(trained_micro), str(random_micro), "--teacher", str(trained_micro), "--json",
                            str(out), "--max-tokens", "512", "--prompts", "2", "--new-tokens", "4",
                            "--no-unigram"]) == 0
    table = capsys.readouterr().out
    assert "ckpt" in table and "random-micro" in table
    rep = json.loads(out.read_text())
    assert [r["name"] for r in rep["rows"]] == ["ckpt", "random-micro"] and rep["seq_len"] == 128
    assert rep["rows"][1]["ppl"] > rep["rows"][0]["ppl"] and rep["rows"][1]["kl"] > rep["rows"][0]["kl"] == 0
    assert bench_eval.main([str(tmp_path / "missing")]) == 2


def _seen_brute_force(stream, reference, n):
    """Independent reference: a Python set of the reference's n-tuples."""
    grams = {tuple(reference[i:i + n]) for i in range(len(reference) - n + 1)}
    return np.array([k >= n - 1 and tuple(stream[k - n + 1:k + 1]) in grams for k in range(len(stream))])


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_ngram_seen_matches_a_set_of_tuples(n):
    g = np.random.default_rng(n)
    reference = g.integers(0, 5, 4000)  # 5 symbols: short grams mostly seen, long ones mostly not
    stream = np.concatenate([g.integers(0, 5, 300), reference[1234:1290], [0], g.integers(0, 5, 300)])
    got = bench_eval.ngram_seen(stream, reference, n)
    want = _seen_brute_force(stream.tolist(), reference.tolist(), n)
    assert np.array_equal(got, want)
    assert got[300 + n - 1:300 + 56].all()  # the copied passage is seen wherever n tokens of it are in view
    if n == 8:
        assert 0 < got.sum() < len(got)  # both kinds present: the check can fail either way
    assert not bench_eval.ngram_seen(stream[:n - 1], reference, n).any()  # too short: nothing to look up
    assert not bench_eval.ngram_seen(stream, reference[:n - 1], n).any()  # empty reference
    with pytest.raises(ValueError):
        bench_eval.ngram_seen(stream, reference, 0)


def test_overlap_masks_reach_across_windows():
    reference = np.arange(100, 140)
    stream = torch.tensor([1, 2, 100, 101, 102, 103, 7, 8])  # a 4-token copy that straddles two windows
    masks = bench_eval.overlap_masks(stream.view(2, 4), reference, [2])
    # targets are positions 1..3 of each window; the bigram (101, 102) ends at flat index 4 = window 1's first
    # token (never a target), (102, 103) ends at flat 5 = window 1, target 0
    assert masks["seen2"].tolist() == [[False, False, True], [True, False, False]]
    assert torch.equal(masks["novel2"], ~masks["seen2"])


def test_subset_sums_partition_the_totals(trained_micro, random_micro):
    teacher, tok = bench_eval.load_model(trained_micro)
    student, _ = bench_eval.load_model(random_micro)
    windows = bench_eval.eval_windows(tok, 32, 128)  # 4 windows × 31 targets
    g = torch.Generator().manual_seed(0)
    m = torch.rand(4, 31, generator=g) < 0.3
    r = bench_eval.evaluate_model(student, windows, teacher, batch_size=3, masks={"a": m, "b": ~m})
    a, b = r["subsets"]["a"], r["subsets"]["b"]
    assert a["tokens"] == m.sum().item() and a["tokens"] + b["tokens"] == r["tokens"] == 124
    for k in ("nll", "kl", "top1"):
        assert a[k] + b[k] == pytest.approx(r[k], rel=1e-9)
    with torch.no_grad():  # the subset's nll directly: per-target cross-entropy picked by the mask
        ls = student(input_ids=windows).logits.double()[:, :-1]
        nll = torch.nn.functional.cross_entropy(ls.transpose(1, 2), windows[:, 1:], reduction="none")
    assert a["nll"] == pytest.approx(nll[m].sum().item(), rel=1e-5)


def test_cli_overlap_ngrams(trained_micro, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench_eval.main([str(trained_micro), "--teacher", str(trained_micro), "--json", str(out), "--max-tokens",
                            "512", "--new-tokens", "0", "--no-unigram", "--overlap-ngrams", "4,64"]) == 0
    assert "targets seen4" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    (row,) = rep["rows"]
    assert set(row["subsets"]) == {"seen4", "novel4", "seen64", "novel64"}
    for n in (4, 64):
        s, v = row["subsets"][f"seen{n}"], row["subsets"][f"novel{n}"]
        assert s["tokens"] + v["tokens"] == row["tokens"]
        assert rep["subset_fraction"][f"seen{n}"] == pytest.approx(s["tokens"] / row["tokens"])
    # longer grams are rarer: seen64 is a subset of seen4 (a 64-gram seen implies its last 4 tokens seen)
    assert row["subsets"]["seen64"]["tokens"] <= row["subsets"]["seen4"]["tokens"]
    assert row["subsets"]["seen4"]["tokens"] > 0
    with pytest.raises(SystemExit):
        bench_eval.main([str(trained_micro), "--overlap-ngrams", "0"])


def test_report_names_its_tokens_and_dtype_and_refuses_less_than_a_window(trained_micro):
    rep = bench_eval.evaluate([trained_micro], log=lambda *a: None, **{**QUICK, "prompts": 0, "new_tokens": 0})
    assert (rep["max_tokens"], rep["dtype"], rep["device"]) == (1024, "float32", "cpu")
    with pytest.raises(ValueError, match="--max-tokens 100: fewer than one window of 128 tokens"):
        bench_eval.evaluate([trained_micro], log=lambda *a: None, **{**QUICK, "max_tokens": 100})
    # greedy agreement asked for with no prompts: a message that says how to skip it (was numpy's "need at least
    # one array to stack")
    with pytest.raises(ValueError, match="at least one prompt .* --new-tokens 0"):
        bench_eval.evaluate([trained_micro], trained_micro, log=lambda *a: None,
                            **{**QUICK, "prompts": 0, "new_tokens": 4})
