"""Mutation audit of the evaluation bed's host-side logic (bench/eval.py, corpus.py, tokenizer.py, cache.py,
factory.py): each test pins a line whose mutation no other test caught, against an independent computation
(per-target NLL / KL / agreement from a tiny model's logits, brute-force n-gram sets, Counter-based unigrams,
plain loops). Models are random ``micro`` checkpoints; caches that a test writes live under ``tmp_path``.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from bench import cache as bench_cache
from bench import corpus
from bench import eval as bench_eval

SEQ, WINDOWS, BATCH = 32, 7, 3  # 7 windows in batches of 3, 3, 1: per-batch means differ from per-token ones


@pytest.fixture(scope="module")
def tok():
    from bench.tokenizer import get_tokenizer

    return get_tokenizer("micro")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok):
    """(teacher, student) checkpoint dirs: a random micro model and a slightly perturbed copy of it, so that KL,
    top-1 and greedy agreement all land strictly between their extremes."""
    from bench.factory import build_model, save_random_checkpoint
    from pack.checkpoint import lineage_step, save_bf16_checkpoint

    root = tmp_path_factory.mktemp("audit")
    teacher = save_random_checkpoint("micro", root / "teacher", seed=1, tokenizer=tok)
    model = build_model("micro", seed=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn(p.shape, generator=g) * 3e-4)
    student = save_bf16_checkpoint(model, root / "student", step=lineage_step("base", seed=99), tokenizer=tok)
    return teacher, student


def _logp(model, windows) -> torch.Tensor:
    """fp64 log-probabilities ``[W, L-1, V]`` of the next token, one window per forward (no batching)."""
    with torch.no_grad():
        out = [model(input_ids=w[None], use_cache=False).logits[0, :-1].double() for w in windows]
    return torch.log_softmax(torch.stack(out), -1)


def _target_nll(logp, windows) -> np.ndarray:
    """``-log p(x[t+1] | x[..t])`` per target, by explicit indexing (no cross_entropy)."""
    w, n = windows.shape[0], windows.shape[1] - 1
    out = np.zeros((w, n))
    for i in range(w):
        for t in range(n):
            out[i, t] = -logp[i, t, windows[i, t + 1]].item()
    return out


def _kl_t_s(lt, ls) -> np.ndarray:
    """KL(teacher || student) per target: sum_v p_t (log p_t - log p_s), fp64."""
    return (lt.exp() * (lt - ls)).sum(-1).numpy()


def _seen_mask(windows, reference, n) -> torch.Tensor:
    """Brute force: target ``[i, t]`` (flat ``k``) is seen iff the n tokens of the flattened stream ending at k occur
    in ``reference``; history crosses window boundaries."""
    flat, ref = windows.reshape(-1).tolist(), list(map(int, reference))
    grams = {tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)}
    seen = [k >= n - 1 and tuple(flat[k - n + 1:k + 1]) in grams for k in range(len(flat))]
    return torch.tensor(seen).view(windows.shape)[:, 1:]


def _fake_train_split(monkeypatch, train):
    """``token_stream("train", ...)`` returns ``train`` (other splits as usual); ``evaluate``'s mask cache emptied."""
    real = corpus.token_stream

    def stream(name, t, max_tokens=None):
        return train if name == "train" else real(name, t, max_tokens)

    monkeypatch.setattr(corpus, "token_stream", stream)
    monkeypatch.setattr(bench_eval, "_MASKS", {})


# ------------------------------------------------------------------------------------------------- eval.py
def test_perplexity_is_token_weighted_across_uneven_batches(pair, tok):
    """Protects ``perplexity`` / ``evaluate_model``: ppl = exp(sum NLL / number of targets) over *all* targets,
    the labels shifted by one (target t+1 scored from logits at t), not a mean of per-batch means. 7 windows in
    batches of 3, 3, 1 make the two differ."""
    student, _ = bench_eval.load_model(pair[1])
    windows = bench_eval.eval_windows(tok, SEQ, SEQ * WINDOWS)
    assert windows.shape == (WINDOWS, SEQ)
    nll = _target_nll(_logp(student, windows), windows)
    got = bench_eval.perplexity(student, windows, batch_size=BATCH)
    assert got == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    batch_means = [nll[i:i + BATCH].mean() for i in range(0, WINDOWS, BATCH)]
    assert abs(math.exp(np.mean(batch_means)) - math.exp(nll.mean())) > 1e-4 * got  # the check can tell them apart
    r = bench_eval.evaluate_model(student, windows, batch_size=BATCH)
    assert r["tokens"] == WINDOWS * (SEQ - 1) and r["nll"] == pytest.approx(nll.sum(), rel=1e-6)


def test_evaluate_rows_match_direct_metrics(pair, tok, monkeypatch):
    """Protects ``evaluate``/``_means``: every row number equals its definition computed here from the models'
    logits — ppl = exp(mean target NLL), kl = mean KL(teacher || student), top1 = fraction of argmax matches,
    greedy = fraction of the M×N generated positions where student and teacher agree and first_div = mean first
    differing index (student's *own* continuation vs the teacher's), unigram_ppl from train-split counts with
    add-one over the whole vocabulary, and the seen/novel subsets (and their fractions) of bigram overlap with the
    train stream. The train stream is replaced by a small one that copies a stretch of validation text, so both
    subsets are non-empty."""
    valid = corpus.token_stream("valid", tok, 4096)
    rng = np.random.default_rng(0)
    train = np.concatenate([valid[40:120], rng.integers(4, len(tok), 500)]).astype(np.int32)
    _fake_train_split(monkeypatch, train)
    teacher_dir, student_dir = pair
    kw = dict(max_tokens=SEQ * WINDOWS, seq_len=SEQ, batch_size=BATCH, prompts=3, prompt_len=8, new_tokens=6)
    rep = bench_eval.evaluate([teacher_dir, student_dir], teacher=teacher_dir, log=lambda *a: None, unigram=True,
                              overlap_ngrams=(2,), **kw)
    teacher, _ = bench_eval.load_model(teacher_dir)
    student, _ = bench_eval.load_model(student_dir)
    windows = bench_eval.eval_windows(tok, SEQ, SEQ * WINDOWS)
    lt, ls = _logp(teacher, windows), _logp(student, windows)
    nll, kl = _target_nll(ls, windows), _kl_t_s(lt, ls)
    top1 = (lt.argmax(-1) == ls.argmax(-1)).numpy()
    t_row, s_row = rep["rows"]
    assert t_row["kl"] == pytest.approx(0, abs=1e-7) and t_row["top1"] == 1.0 and t_row["greedy"] == 1.0
    assert s_row["tokens"] == nll.size == WINDOWS * (SEQ - 1)
    assert s_row["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert s_row["nll"] == pytest.approx(nll.mean(), rel=1e-6)
    assert s_row["kl"] == pytest.approx(kl.mean(), rel=1e-3) and 1e-5 < s_row["kl"]
    assert s_row["top1"] == pytest.approx(top1.mean(), abs=1e-12) and 0 < s_row["top1"] < 1

    prompts = bench_eval.prompt_windows(tok, 8, 3)
    gt, gs = (bench_eval.greedy_tokens(m, prompts, 6, tok.pad_token_id).tolist() for m in (teacher, student))
    same = [[a == b for a, b in zip(rs, rt)] for rs, rt in zip(gs, gt)]
    frac = sum(map(sum, same)) / 18
    first = np.mean([row.index(False) if False in row else 6 for row in same])
    assert s_row["greedy"] == pytest.approx(frac, abs=1e-12) and s_row["first_div"] == pytest.approx(first)
    assert frac < 1  # the student's own continuation, not the teacher's: a swap would read 1.0

    c, v = Counter(train.tolist()), len(tok)
    want = math.exp(-np.mean([math.log((c[y] + 1) / (len(train) + v)) for y in windows[:, 1:].reshape(-1).tolist()]))
    assert rep["unigram_ppl"] == pytest.approx(want, rel=1e-12)

    seen = _seen_mask(windows, train, 2).numpy()
    assert 0 < seen.sum() < seen.size
    for name, m in (("seen2", seen), ("novel2", ~seen)):
        d = s_row["subsets"][name]
        assert d["tokens"] == m.sum() and rep["subset_fraction"][name] == pytest.approx(m.mean())
        assert d["ppl"] == pytest.approx(math.exp(nll[m].mean()), rel=1e-6)
        assert d["kl"] == pytest.approx(kl[m].mean(), rel=1e-3)
        assert d["top1"] == pytest.approx(top1[m].mean(), abs=1e-12)


def test_overlap_mask_cache_follows_the_window_geometry(pair, tok, monkeypatch):
    """Protects the key of ``evaluate``'s module-level overlap-mask cache: a second call in the same process with
    another ``seq_len`` or ``max_tokens`` must get masks of its own windows (the quality pipeline evaluates one
    checkpoint after another in one process), not the last call's."""
    valid = corpus.token_stream("valid", tok, 4096)
    train = np.concatenate([valid[10:200], valid[300:330]]).astype(np.int32)
    _fake_train_split(monkeypatch, train)
    student, _ = bench_eval.load_model(pair[1])
    for seq_len, max_tokens in ((32, 224), (16, 224), (16, 160)):
        rep = bench_eval.evaluate([pair[1]], seq_len=seq_len, max_tokens=max_tokens, batch_size=BATCH, unigram=False,
                                  overlap_ngrams=(3,), log=lambda *a: None)
        windows = bench_eval.eval_windows(tok, seq_len, max_tokens)
        seen = _seen_mask(windows, train, 3).numpy()
        nll = _target_nll(_logp(student, windows), windows)
        sub = rep["rows"][0]["subsets"]
        assert sub["seen3"]["tokens"] == seen.sum() and sub["novel3"]["tokens"] == (~seen).sum()
        assert sub["seen3"]["ppl"] == pytest.approx(math.exp(nll[seen].mean()), rel=1e-6)


def test_prompts_are_evenly_spread_slices_of_the_validation_stream(tok):
    """Protects ``prompt_windows``: M prompts of P consecutive validation tokens whose starts are spread evenly over
    the split, from its first token to the last P (``linspace(0, len - P, M)``), not M adjacent slices."""
    stream = corpus.token_stream("valid", tok)
    p, m = 16, 5
    got = bench_eval.prompt_windows(tok, p, m)
    assert got.shape == (m, p) and got.dtype == torch.int64
    span = len(stream) - p
    for i in range(m):
        x = i * span / (m - 1)
        starts = {math.floor(x), math.floor(x - 1e-6)}  # linspace's float rounding at an exact integer
        assert any(got[i].tolist() == stream[s:s + p].tolist() for s in starts), i
    assert got[-1].tolist() == stream[-p:].tolist()


def test_unigram_counts_span_the_whole_vocabulary():
    """Protects ``unigram_counts``' ``minlength``: add-one smoothing is over all V ids, so a target id the train
    split never holds (here 5 of V=8) gets 1/(T+V), and the denominator counts the unseen ids too."""
    train = np.array([0, 1, 1, 2])
    counts = bench_eval.unigram_counts(train, 8)
    assert counts.shape == (8,)
    windows = torch.tensor([[0, 5, 1, 7]])
    want = math.exp(-(math.log(1 / 12) + math.log(3 / 12) + math.log(1 / 12)) / 3)
    assert bench_eval.unigram_perplexity(counts, windows) == pytest.approx(want, rel=1e-12)


def test_kl_divergence_is_teacher_to_student_without_temperature():
    """Protects ``kl_divergence``: KL(p_t || p_s) = sum_v p_t (log p_t - log p_s) on the logits as given (softmax at
    temperature 1), per position; the reverse direction differs on these far-apart distributions."""
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(2, 5, 50, generator=g) * 3, torch.randn(2, 5, 50, generator=g) * 3
    got = bench_eval.kl_divergence(t, s)
    pt, ps = torch.softmax(t.double(), -1).numpy(), torch.softmax(s.double(), -1).numpy()
    want = (pt * (np.log(pt) - np.log(ps))).sum(-1)
    assert got.shape == (2, 5) and np.allclose(got.numpy(), want, rtol=1e-5)
    rev = (ps * (np.log(ps) - np.log(pt))).sum(-1)
    assert not np.allclose(want, rev, rtol=1e-2)


def test_greedy_agreement_is_per_token_over_every_position():
    """Protects ``greedy_agreement``: the fraction counts each of the M×N positions (not whole sequences), and
    first_div is each row's first mismatch index (N for an identical row), averaged over rows."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 3, (40, 7), generator=g)
    b = torch.where(torch.rand(40, 7, generator=g) < 0.8, a, torch.randint(0, 3, (40, 7), generator=g))
    b[0] = a[0]  # at least one identical row
    frac, first = bench_eval.greedy_agreement(b, a)
    rows = [[x == y for x, y in zip(ra, rb)] for ra, rb in zip(a.tolist(), b.tolist())]
    assert frac == pytest.approx(sum(map(sum, rows)) / 280, abs=1e-7)
    assert first == pytest.approx(np.mean([r.index(False) if False in r else 7 for r in rows]), abs=1e-6)


# ------------------------------------------------------------------------------------------------- corpus.py
def test_token_batches_order_and_epochs(tok):
    """Protects ``token_batches``: seed None yields the windows in corpus order, last partial batch kept, ``steps``
    honoured; seeded, each epoch is one permutation of all windows (no window twice before every window was seen),
    drawn afresh per epoch, and another seed gives another order."""
    seqs = corpus.packed_sequences("valid", tok, 16, 10 * 16)
    plain = list(corpus.token_batches("valid", tok, 16, 4, seed=None, max_tokens=160))
    assert [len(b) for b in plain] == [4, 4, 2] and torch.equal(torch.cat(plain), seqs)
    assert len(list(corpus.token_batches("valid", tok, 16, 4, seed=None, steps=2, max_tokens=160))) == 2
    seqs8 = [tuple(w) for w in corpus.packed_sequences("valid", tok, 16, 8 * 16).tolist()]
    assert len(set(seqs8)) == 8
    got = list(corpus.token_batches("valid", tok, 16, 4, seed=3, steps=6, max_tokens=128))
    assert len(got) == 6 and all(b.shape == (4, 16) for b in got)
    epochs = [[tuple(w) for b in got[2 * e:2 * e + 2] for w in b.tolist()] for e in range(3)]
    assert all(sorted(epoch) == sorted(seqs8) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # a fresh permutation per epoch, not one order replayed
    other = list(corpus.token_batches("valid", tok, 16, 4, seed=4, steps=6, max_tokens=128))
    assert not all(torch.equal(x, y) for x, y in zip(got, other))


def test_packed_windows_are_the_stream_prefix(tok):
    """Protects ``packed_sequences``/``eval_windows``: the first ``max_tokens // seq_len`` whole windows of the
    ``<bos> doc <eos>`` stream, in order, no padding, no overlap."""
    texts = corpus.load_texts("valid")[:3]
    ids = [t for x in texts for t in (tok.bos_token_id, *tok(x, add_special_tokens=False).input_ids,
                                      tok.eos_token_id)]
    w = bench_eval.eval_windows(tok, 64, 64 * 5 + 63)
    assert w.shape == (5, 64) and w.dtype == torch.int64
    assert w.reshape(-1).tolist() == ids[:320]


def test_split_assignment_fills_valid_then_calib_with_whole_groups_in_salted_hash_order(monkeypatch):
    """Protects ``_group``/``_assign_splits`` on a synthetic tree (independent of the installed transformers): the
    files of one ``models/<name>`` family share a split; other files are groups of their own; groups taken in
    ``sha256(SALT \\0 group)`` order go to valid while it holds < VALID_BYTES, then calib likewise, then train, so
    valid/calib each end with the group that crossed the cap and no train group precedes a valid or calib one."""
    monkeypatch.setattr(corpus, "VALID_BYTES", 3000)
    monkeypatch.setattr(corpus, "CALIB_BYTES", 2000)
    rng = np.random.default_rng(0)
    docs = []
    for i in range(25):
        for f in ("modeling", "configuration"):
            docs.append((f"transformers/models/m{i}/{f}_m{i}.py", "", "x" * int(rng.integers(100, 400))))
    docs += [(f"transformers/utils/u{j}.py", "", "y" * int(rng.integers(100, 400))) for j in range(10)]
    split_of = corpus._assign_splits(docs)
    assert set(split_of) == {p for p, _, _ in docs}

    def group(path):
        parts = path.split("/")
        return f"models/{parts[2]}" if parts[1] == "models" else path

    groups = {}
    for path, _, text in docs:
        g = groups.setdefault(group(path), {"bytes": 0, "splits": set()})
        g["bytes"] += len(text)
        g["splits"].add(split_of[path])
    assert all(len(g["splits"]) == 1 for g in groups.values())
    assert len(groups) == 35
    order = sorted(groups, key=lambda g: hashlib.sha256(f"{corpus.SALT}\0{g}".encode()).hexdigest())
    seq = [next(iter(groups[g]["splits"])) for g in order]
    rank = {"valid": 0, "calib": 1, "train": 2}
    assert [rank[x] for x in seq] == sorted(rank[x] for x in seq)  # valid..., calib..., train...
    for name, cap in (("valid", 3000), ("calib", 2000)):
        sizes = [groups[g]["bytes"] for g, x in zip(order, seq) if x == name]
        assert sum(sizes) >= cap > sum(sizes[:-1])
    assert seq.count("train") > 0


def _write_split_files(d, sha):
    d.mkdir(parents=True)
    splits = {}
    for n in corpus.SPLITS:
        data = json.dumps({"text": f"doc of {n}"}) + "\n"
        (d / f"{n}.jsonl").write_text(data)
        splits[n] = {"jsonl_sha256": hashlib.sha256(data.encode()).hexdigest()}
    (d / "manifest.json").write_text(json.dumps({"corpus_sha256": sha, "splits": splits}))


def test_corpus_verify_checks_the_manifest_hash_and_every_split(tmp_path):
    """Protects ``corpus._verify``: a cache entry is used only if its manifest names the expected corpus hash and
    every split file matches the sha256 its manifest records."""
    d = tmp_path / "c"
    _write_split_files(d, "a" * 64)
    corpus._verify(d, "a" * 64)
    with pytest.raises(corpus.CorpusError, match="corrupt"):
        corpus._verify(d, "b" * 64)
    for n in corpus.SPLITS:
        f = d / f"{n}.jsonl"
        good = f.read_bytes()
        f.write_bytes(good + b"\n")
        with pytest.raises(corpus.CorpusError, match="corrupt"):
            corpus._verify(d, "a" * 64)
        f.write_bytes(good)


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    """A fake pinned corpus (texts per split, corpus hash) and an empty bench cache under tmp_path."""
    monkeypatch.setenv("PDQKIT_CACHE", str(tmp_path / "cache"))
    state = {"sha": "1" * 64, "texts": {n: ["".join(f"def {n}_{i}_{j}(alpha, beta):\n    return alpha * {j} - beta  "
                                                    f"# {n} case {i}.{j}\n" for j in range(8 + i)) for i in range(4)]
                                        for n in corpus.SPLITS}}
    monkeypatch.setattr(corpus, "corpus_sha256", lambda: state["sha"])
    monkeypatch.setattr(corpus, "load_texts", lambda name: list(state["texts"][name]))
    return state


def test_token_stream_cache_key_covers_split_corpus_and_tokenizer(tok, tiny_corpus, tmp_path):
    """Protects ``token_stream``'s cache key: the split name, the corpus hash and the tokenizer hash each select a
    cache entry of their own, so a cached stream is never served for another split, corpus or tokenizer."""
    from bench.tokenizer import train_tokenizer, wrap

    def want(name, t):  # <bos> doc <eos> per document, encoded here one document at a time
        ids = [[t.bos_token_id, *t(x, add_special_tokens=False).input_ids, t.eos_token_id]
               for x in tiny_corpus["texts"][name]]
        return np.array([i for doc in ids for i in doc], dtype=np.int32)

    for name in corpus.SPLITS:
        assert np.array_equal(corpus.token_stream(name, tok), want(name, tok)), name
    assert (tmp_path / "cache").is_dir() and len(list((tmp_path / "cache").glob("tokens-*"))) == 3
    tiny_corpus["sha"] = "2" * 64
    tiny_corpus["texts"]["valid"] = ["class Other:\n    pass\n" * 9]
    assert np.array_equal(corpus.token_stream("valid", tok), want("valid", tok))
    other = wrap(train_tokenizer([t for ts in tiny_corpus["texts"].values() for t in ts] * 4, 300))
    assert corpus.tokenizer_sha256(other) != corpus.tokenizer_sha256(tok)
    assert np.array_equal(corpus.token_stream("valid", other), want("valid", other))
    # a prefix request is the prefix of the cached stream
    assert np.array_equal(corpus.token_stream("valid", other, 7), want("valid", other)[:7])


# ------------------------------------------------------------------------------------------------- tokenizer.py
def test_tokenizer_cache_key_and_pin(tiny_corpus, tmp_path, monkeypatch):
    """Protects ``get_tokenizer``: its cache entry is keyed by the corpus hash, the vocabulary size and the
    ``tokenizers`` version (each change trains anew), and a tokenizer whose (vocab, merges) differ from the pinned
    hash is refused unless ``$PDQKIT_CORPUS_UNPINNED=1``."""
    import tokenizers

    from bench import tokenizer as bt

    monkeypatch.delenv(corpus.UNPINNED_ENV, raising=False)   # (set by a run against a newer transformers)
    tiny_corpus["texts"]["train"] = [t for ts in tiny_corpus["texts"].values() for t in ts] * 4
    trained, real = [], bt.train_tokenizer
    monkeypatch.setattr(bt, "train_tokenizer", lambda texts, v: trained.append(v) or real(texts, v))
    get = bt.get_tokenizer.__wrapped__  # past the lru_cache
    a = get(280)
    assert len(a) == 280 and trained == [280]
    assert corpus.tokenizer_sha256(get(280)) == corpus.tokenizer_sha256(a) and trained == [280]  # cache hit
    assert len(get(290)) == 290 and trained == [280, 290]
    tiny_corpus["sha"] = "3" * 64
    get(280)
    assert trained == [280, 290, 280]
    monkeypatch.setattr(tokenizers, "__version__", tokenizers.__version__ + ".audit")
    get(280)
    assert trained == [280, 290, 280, 280]
    monkeypatch.setitem(bt.PINNED_VOCAB_SHA256, 280, "0" * 64)
    with pytest.raises(corpus.CorpusError, match="differs from the pinned"):
        get(280)
    monkeypatch.setitem(bt.PINNED_VOCAB_SHA256, 280, bt.vocab_sha256(a))
    assert len(get(280)) == 280
    monkeypatch.setitem(bt.PINNED_VOCAB_SHA256, 280, "0" * 64)
    monkeypatch.setenv(corpus.UNPINNED_ENV, "1")
    assert len(get(280)) == 280


# ------------------------------------------------------------------------------------------------- cache.py
def test_cached_dir_builds_once_and_never_publishes_a_failed_build(tmp_path, monkeypatch):
    """Protects ``cached_dir``: entries live under ``$PDQKIT_CACHE``; a complete entry is served without
    rebuilding; a build that raises leaves neither the entry nor its temp dir; an incomplete leftover (no
    ``.complete``) is rebuilt and replaced."""
    monkeypatch.setenv("PDQKIT_CACHE", str(tmp_path / "c"))
    assert bench_cache.cache_root() == tmp_path / "c"
    calls = []

    def build(d):
        calls.append(d)
        (d / "x.txt").write_text(str(len(calls)))

    d = bench_cache.cached_dir("e", build)
    assert d == tmp_path / "c" / "e" and (d / ".complete").is_file() and (d / "x.txt").read_text() == "1"
    assert bench_cache.cached_dir("e", build) == d and len(calls) == 1

    def boom(d):
        (d / "half").write_text("")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        bench_cache.cached_dir("f", boom)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["e"]
    (tmp_path / "c" / "g").mkdir()
    (tmp_path / "c" / "g" / "stale").write_text("")
    g = bench_cache.cached_dir("g", build)
    assert (g / "x.txt").read_text() == "2" and not (g / "stale").exists() and len(calls) == 2


def test_sha256_text_separates_its_parts():
    """Protects ``sha256_text``'s separator: keys built from parts must not collide when a boundary moves."""
    assert bench_cache.sha256_text("ab", "c") != bench_cache.sha256_text("a", "bc")
    assert bench_cache.sha256_text("a", "") != bench_cache.sha256_text("a")
    assert bench_cache.sha256_text("a", "b") == bench_cache.sha256_text("a", "b")


def test_write_json_atomic_is_deterministic(tmp_path):
    """Protects ``write_json_atomic``: sorted keys, so two reports with the same numbers are the same bytes."""
    a = bench_cache.write_json_atomic({"b": 1, "a": [1.5, None]}, tmp_path / "a.json")
    b = bench_cache.write_json_atomic({"a": [1.5, None], "b": 1}, tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes() and json.loads(a.read_text()) == {"a": [1.5, None], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


# ------------------------------------------------------------------------------------------------- factory.py
def test_layer_pattern_and_overrides():
    """Protects ``_layer_types``/``text_config``: micro has full attention at layers 2 and 5 (every 3rd), larger
    models every 6th (5 sliding then 1 full, as E4B); overrides replace fields and the derived ones follow them."""
    from bench.factory import text_config

    def full(tc):
        return [i for i, t in enumerate(tc.layer_types) if t == "full_attention"]

    assert full(text_config("micro")) == [2, 5]
    assert full(text_config("small")) == [5, 11]
    assert full(text_config("e4b")) == list(range(5, 42, 6))
    tc = text_config("micro", vocab_size=512, num_hidden_layers=12, final_logit_softcapping=10.0)
    assert tc.vocab_size == tc.vocab_size_per_layer_input == 512 and full(tc) == [5, 11]
    assert tc.final_logit_softcapping == 10.0


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "mm"])
def test_bf16_build_is_the_fp32_draw_rounded_and_tied(multimodal):
    """Protects ``build_model``'s bf16 path: its weights are the fp32 draw of the same seed rounded to bf16 (one
    model per seed whatever the dtype), every buffer computed in fp32 then stored in its dtype (RoPE ``inv_freq``
    kept fp32; the audio tower's ``inv_timescales`` rounded from fp32, not computed in bf16), and lm_head tied to
    the embedding again."""
    from bench.factory import build_model

    ref = build_model("micro", multimodal, seed=2, dtype=torch.float32)
    got = build_model("micro", multimodal, seed=2)
    rs, gs = ref.state_dict(), got.state_dict()
    assert rs.keys() == gs.keys()
    for k, v in gs.items():
        assert v.dtype == (torch.bfloat16 if rs[k].is_floating_point() else rs[k].dtype), k
        assert torch.equal(v, rs[k].to(v.dtype)), k
    inv = {n: b for n, b in got.named_buffers() if n.endswith("inv_freq")}
    ref_bufs = dict(ref.named_buffers())
    assert inv and all(b.dtype == torch.float32 and torch.equal(b, ref_bufs[n]) for n, b in inv.items())
    bufs = dict(got.named_buffers())
    assert bufs.keys() == ref_bufs.keys()
    assert [n for n, b in bufs.items() if not torch.equal(b, ref_bufs[n].to(b.dtype))] == []
    emb = got.get_input_embeddings().weight
    assert got.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
