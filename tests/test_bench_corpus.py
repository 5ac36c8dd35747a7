"""bench.corpus / bench.tokenizer: pinned, verified corpus; disjoint splits; Gemma-4 special ids; loaders agree."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from bench import corpus
from bench.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, get_tokenizer, vocab_size_of


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("micro")


# $PDQKIT_CORPUS_UNPINNED=1 (e.g. a run of the suite against a newer transformers) builds another corpus: the tests
# then check it against itself, not against the pin
UNPINNED = os.environ.get(corpus.UNPINNED_ENV) == "1"
pinned_only = pytest.mark.skipif(UNPINNED, reason=f"checks the pinned corpus; ${corpus.UNPINNED_ENV}=1 is set")


def test_corpus_is_the_pinned_one_and_splits_partition_it():
    m = corpus.manifest()
    assert m["corpus_sha256"] == corpus.corpus_sha256()
    if not UNPINNED:
        assert m["corpus_sha256"] == corpus.PINNED_SHA256
    docs = m["documents"]
    paths = [d["path"] for d in docs]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    by_split = {s: [d for d in docs if d["split"] == s] for s in corpus.SPLITS}
    assert sum(map(len, by_split.values())) == len(docs) and all(by_split.values())
    # a model family never straddles two splits
    group_split = {}
    for d in docs:
        assert group_split.setdefault(corpus._group(d["path"]), d["split"]) == d["split"], d["path"]
    assert not any(p.rsplit("/", 1)[-1].startswith("modular_") for p in paths)
    for s in ("valid", "calib"):
        assert m["splits"][s]["text_bytes"] >= getattr(corpus, f"{s.upper()}_BYTES")
    assert m["splits"]["train"]["text_bytes"] > 30 * m["splits"]["valid"]["text_bytes"]


def test_split_files_hold_the_manifest_documents():
    m = corpus.manifest()
    for s in corpus.SPLITS:
        lines = corpus.split_path(s).read_text(encoding="utf-8").splitlines()
        assert len(lines) == m["splits"][s]["documents"]
        texts = [json.loads(line)["text"] for line in lines[:5]]
        shas = [d["sha256"] for d in m["documents"] if d["split"] == s][:5]
        assert [hashlib.sha256(t.encode()).hexdigest() for t in texts] == shas  # verbatim source files
    with pytest.raises(ValueError, match="unknown split"):
        corpus.split_path("test")


@pinned_only
def test_fresh_build_matches_pin_and_export(tmp_path, monkeypatch):
    monkeypatch.setenv("PDQKIT_CACHE", str(tmp_path / "cache"))
    corpus.corpus_dir.cache_clear()
    try:
        d = corpus.corpus_dir()  # rebuilt from the installed transformers sources
        assert d.parent == tmp_path / "cache"
        assert json.loads((d / "manifest.json").read_text())["corpus_sha256"] == corpus.PINNED_SHA256
        out = corpus.export(tmp_path / "export")
        for s in corpus.SPLITS:
            assert (out / f"{s}.jsonl").read_bytes() == (d / f"{s}.jsonl").read_bytes()
        # a corrupted cache entry is refused, not used
        with open(d / "valid.jsonl", "a") as fh:
            fh.write('{"text": "x"}\n')
        corpus.corpus_dir.cache_clear()
        with pytest.raises(corpus.CorpusError, match="corrupt"):
            corpus.corpus_dir()
    finally:
        corpus.corpus_dir.cache_clear()


def test_other_source_version_fails_loudly(monkeypatch):
    monkeypatch.delenv(corpus.UNPINNED_ENV, raising=False)
    monkeypatch.setattr(corpus, "SOURCE_VERSION", "0.0.1")
    with pytest.raises(corpus.CorpusError, match="pinned to 0.0.1"):
        corpus.source_documents()


def test_unpinned_corpus_names_the_version_it_came_from(tmp_path, monkeypatch, capsys):
    """$PDQKIT_CORPUS_UNPINNED=1 builds from whatever transformers is installed: the manifest and the CLI name that
    version, not the pinned one (here the pin is faked to another version, so the installed one is "unpinned")."""
    import importlib.metadata as md

    monkeypatch.setattr(corpus, "SOURCE_VERSION", "0.0.1")
    monkeypatch.setenv(corpus.UNPINNED_ENV, "1")
    monkeypatch.setenv("PDQKIT_CACHE", str(tmp_path / "cache"))
    corpus.corpus_dir.cache_clear()
    try:
        assert corpus.main([]) == 0
        installed = f"transformers=={md.version('transformers')}"
        assert corpus.manifest()["source"] == installed
        assert f"({installed}) at {tmp_path / 'cache'}" in capsys.readouterr().out
    finally:
        corpus.corpus_dir.cache_clear()


def test_cli_export(tmp_path, capsys):
    assert corpus.main(["--export", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "manifest.json", "train.jsonl",
                                                          "valid.jsonl"]
    assert corpus.corpus_sha256()[:16] in capsys.readouterr().out   # (the pin, unless UNPINNED)


def test_tokenizer_special_ids_match_gemma4_config(tok):
    from bench.factory import text_config

    cfg = text_config("micro")
    assert len(tok) == vocab_size_of("micro") == cfg.vocab_size == 2048
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, BOS_ID,
                                                                                       UNK_ID) == (0, 1, 2, 3)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 2)
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓\n"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:] and EOS_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless


def test_saved_tokenizer_loads_with_autotokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = corpus.load_texts("valid")[0][:2000]
    assert loaded(text).input_ids == tok(text).input_ids
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2)


def test_token_stream_and_windows(tok):
    texts = corpus.load_texts("valid")
    full = corpus.token_stream("valid", tok)
    first = [BOS_ID, *tok(texts[0], add_special_tokens=False).input_ids, EOS_ID]
    assert full.dtype == np.int32 and full[:len(first)].tolist() == first
    assert (full == BOS_ID).sum() == (full == EOS_ID).sum() == len(texts)
    # prefix encoding (no full cache needed) == prefix of the full stream
    assert np.array_equal(corpus._encode_stream(texts, tok, 5000), full[:5000])
    seqs = corpus.packed_sequences("valid", tok, 128, max_tokens=1000)
    assert seqs.shape == (7, 128) and torch.equal(seqs.reshape(-1), torch.from_numpy(full[:896]).long())
    a = list(corpus.token_batches("valid", tok, 64, 4, seed=1, steps=3))
    b = list(corpus.token_batches("valid", tok, 64, 4, seed=1, steps=3))
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
