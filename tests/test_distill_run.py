"""``python -m distill`` end to end on CPU with micro models: phases 1 and 2, multimodal towers, lineage, CLI
errors, data sharding, and kill -9 + --resume giving the same bytes as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.__main__ import main as distill_main
from distill.config import DistillConfig
from distill.data import TokenBlocks, load_blocks
from distill.losses import forward_kl
from distill.models import load_model
from distill.toy import save_pair
from distill.train import checkpoint_sha256, lr_at
from pack.checkpoint import read_lineage, sha256_file
from pack.hfcompat import checkpointing_enable

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _write_ids(path: Path, n_docs: int, length: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"input_ids": torch.randint(4, 2048, (length,), generator=g).tolist()}) + "\n")
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_pair")
    teacher, student = save_pair(root, "micro", width=512)
    data = _write_ids(root / "data.jsonl", 8, 128)
    return teacher, student, data, root


def _kl_on(model_dir, teacher, ids) -> float:
    m = load_model(model_dir, torch.float32)
    with torch.no_grad():
        return forward_kl(m(input_ids=ids).logits, teacher(input_ids=ids).logits).mean().item()


def _args(teacher, student, out, data, *extra):
    return ["--teacher", str(teacher), "--student", str(student), "-o", str(out), "--data", str(data),
            "--threads", "1", *map(str, extra)]


def test_phase1_end_to_end(pair, tmp_path):
    teacher, student, data, _ = pair
    out, log = tmp_path / "p1", tmp_path / "p1.jsonl"
    # 4 windows of 64 tokens, batch 4: every step sees the same data, so its loss must fall
    rc = distill_main(_args(teacher, student, out, data, "--steps", 8, "--batch", 4, "--seq-len", 64,
                            "--max-tokens", 256, "--lr", 1e-4, "--log-json", log, "--log-every", 4))
    assert rc == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[-1]["forward_kl"] < 0.9 * steps[0]["forward_kl"]
    assert steps[0]["loss"] == pytest.approx(steps[0]["forward_kl"] + steps[0]["hidden_mse"], rel=1e-5)
    assert steps[3]["tokens_per_s"] > 0 and steps[3]["mfu"] is None  # no MFU on CPU

    # the teacher-student KL on the training windows fell; the checkpoint loads with plain transformers
    t = load_model(teacher, torch.float32)
    ids = load_blocks(str(data), None, 64, 256, 2048).blocks
    assert _kl_on(out, t, ids) < 0.9 * _kl_on(student, t, ids)
    from transformers import Gemma4ForCausalLM

    Gemma4ForCausalLM.from_pretrained(out)

    # frozen embeddings bit-identical, MLPs trained, vLLM's k_norm extras written
    a, b = load_file(out / "model.safetensors"), load_file(student / "model.safetensors")
    assert set(a) == set(b)
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(a["model.embed_tokens_per_layer.weight"], b["model.embed_tokens_per_layer.weight"])
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"])
    assert "model.layers.5.self_attn.k_norm.weight" in a

    lin = read_lineage(out)
    assert [s["kind"] for s in lin] == ["base", "prune", "distill"]
    step = lin[-1]
    assert step["phase"] == 1 and step["from"] == "prune"
    assert step["tokens_seen"] == 8 * 4 * 64
    assert step["teacher"]["sha256"] == checkpoint_sha256(teacher)
    assert step["data"]["sha256"] == sha256_file(data)
    assert step["losses"]["forward_kl"] == {"weight": 1.0, "temperature": 1.0}
    assert step["losses"]["hidden_mse"]["layers"] == list(range(6))
    assert not (tmp_path / "p1-ckpt").exists()


def test_phase2_on_policy(pair, tmp_path):
    teacher, student, data, _ = pair
    out, log = tmp_path / "p2", tmp_path / "p2.jsonl"
    rc = distill_main(_args(teacher, student, out, data, "--phase", 2, "--steps", 2, "--batch", 2, "--seq-len", 40,
                            "--max-new-tokens", 8, "--lmbda", 1.0, "--beta", 0.0, "--log-json", log))
    assert rc == 0
    steps = [json.loads(x) for x in log.read_text().splitlines() if '"step"' in x]
    assert all(r["on_policy"] for r in steps) and all(r["gjsd"] > 0 for r in steps)
    step = read_lineage(out)[-1]
    assert step["phase"] == 2 and step["generated_tokens"] == 2 * 2 * 8
    assert step["losses"]["gjsd"] == {"beta": 0.0, "temperature": 1.0, "convention": "trl"}
    assert step["losses"]["on_policy"] == {"lmbda": 1.0, "sample_temperature": 0.9, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def mm_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("distill_mm"), "micro", width=512, multimodal=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_towers_without_sdpa_load_and_the_language_model_gets_the_attention_asked(mm_pair, monkeypatch, attn):
    """transformers 5.24's Gemma-4 audio tower has no SDPA, and from_pretrained refuses a plain "sdpa" for the
    whole model: load_model asks for it on the language model only (the towers never run on text) and leaves the
    towers to transformers' choice. Simulated on the installed transformers by taking SDPA from the audio tower."""
    import transformers
    from transformers.models.gemma4 import modeling_gemma4

    monkeypatch.setattr(modeling_gemma4.Gemma4AudioModel, "_supports_sdpa", False)
    monkeypatch.setattr(modeling_gemma4.Gemma4AudioModel, "_supports_flash_attn", False)
    teacher, _ = mm_pair
    with pytest.raises(ValueError, match="does not support"):   # the simulation is what 5.24 does
        transformers.Gemma4ForConditionalGeneration.from_pretrained(teacher, attn_implementation="sdpa")
    cfg = load_model(teacher, torch.float32, attn_implementation=attn).config
    assert (cfg.text_config._attn_implementation, cfg.audio_config._attn_implementation) == (attn, "eager")


def test_multimodal_towers_bit_identical(mm_pair, tmp_path):
    teacher, student = mm_pair
    data = _write_ids(tmp_path / "d.jsonl", 2, 64)
    out = tmp_path / "mm"
    assert distill_main(_args(teacher, student, out, data, "--steps", 2, "--batch", 2, "--seq-len", 32,
                              "--lr", 1e-3, "--train-embeddings")) == 0
    a, b = load_file(out / "model.safetensors"), load_file(student / "model.safetensors")
    assert set(a) == set(b)
    towers = [k for k in a if not k.startswith("model.language_model.")]
    assert any("vision_tower" in k for k in towers) and any("audio_tower" in k for k in towers)
    for k in towers:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for k in ("layers.0.mlp.up_proj.weight", "embed_tokens.weight", "embed_tokens_per_layer.weight"):
        assert not torch.equal(a[f"model.language_model.{k}"], b[f"model.language_model.{k}"]), k
    from transformers import Gemma4ForConditionalGeneration

    Gemma4ForConditionalGeneration.from_pretrained(out)


def test_cli_errors_are_one_line(pair, tmp_path, capsys):
    teacher, student, data, root = pair
    (tmp_path / "exists").mkdir()
    assert distill_main(_args(teacher, student, tmp_path / "exists", data, "--steps", 1)) == 2
    err = capsys.readouterr().err
    assert "exists; pass --force" in err and err.count("\n") == 1
    assert distill_main(_args(teacher, student, tmp_path / "o", data, "--lmbda", 1.5)) == 2
    assert "--lmbda 1.5: must be in [0, 1]" in capsys.readouterr().err
    assert distill_main(_args(teacher, student, tmp_path / "o", data, "--adam-betas", "0.9")) == 2
    assert "--adam-betas 0.9: give two values" in capsys.readouterr().err
    assert distill_main(_args(teacher, student, tmp_path / "o", data, "--adam-betas", "0.9,1")) == 2
    assert "--adam-betas 0.9,1.0: each must be in [0, 1)" in capsys.readouterr().err
    assert distill_main(_args(teacher, student, tmp_path / "o", data, "--adam-eps", "0")) == 2
    assert "--adam-eps 0.0: must be a positive number" in capsys.readouterr().err
    assert distill_main(_args(teacher, student, tmp_path / "o", data, "--phase", 2, "--seq-len", 64)) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert distill_main(_args(teacher, student, tmp_path / "o", data, "--steps", 1, "--seq-len", 32,
                              "--batch", 2, "--hidden-layers", "0,9")) == 2
    assert "the models have 6 layers" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert distill_main(_args(teacher, tmp_path / "empty", tmp_path / "o", data)) == 2
    assert "no config.json" in capsys.readouterr().err
    # --force never lets the output replace (or a folder holding) the teacher or the student
    for out, who in ((student, "student"), (Path(teacher).parent, "teacher")):
        assert distill_main(_args(teacher, student, out, data, "--steps", 1, "--force")) == 2
        err = capsys.readouterr().err
        assert f"must not be, contain or lie inside the {who}" in err and err.count("\n") == 1, err
    assert (Path(student) / "config.json").is_file() and (Path(teacher) / "config.json").is_file()
    # a student of another hidden size / depth: refused with the field named
    from bench.factory import save_random_checkpoint

    other = save_random_checkpoint("micro", root / "hidden128", hidden_size=128, force=True)
    assert distill_main(_args(teacher, other, tmp_path / "o", data, "--steps", 1)) == 2
    err = capsys.readouterr().err
    assert "student hidden_size=128 differs from teacher" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_outputs_never_overwrite_inputs_and_unwritable_outputs_fail_first(pair, tmp_path, capsys):
    """-o, --log-json and --ckpt-dir are checked against everything the run reads (teacher, student, data) and each
    other before a model loads; a review's repros: --log-json onto the teacher's weights truncated them (then a bus
    error), onto the data file overwrote it (rc 0, lineage naming the old sha256), -o onto the data replaced it, and
    an output under a regular file failed only after training."""
    teacher, student, data, _ = pair
    data_copy = tmp_path / "d.jsonl"
    shutil.copy(data, data_copy)
    before = {f: f.read_bytes() for f in (Path(teacher) / "model.safetensors", data_copy)}
    run = ["--steps", 1, "--batch", 2, "--seq-len", 32]
    cases = [
        (tmp_path / "o", ["--log-json", Path(teacher) / "model.safetensors"], "--log-json",
         "must not be the teacher"),
        (tmp_path / "o", ["--log-json", data_copy], "--log-json", "must not be the data"),
        (tmp_path / "o", ["--log-json", tmp_path / "o"], "--log-json", "must not be the output dir"),
        (data_copy, ["--force"], "", "must not be, contain or lie inside the data"),
        (tmp_path / "o", ["--ckpt-every", 1, "--ckpt-dir", Path(student) / "ck"], "--ckpt-dir",
         "must not be the student"),
    ]
    for out, extra, option, msg in cases:
        assert distill_main(_args(teacher, student, out, data_copy, *run, *extra)) == 2
        err = capsys.readouterr().err
        assert msg in err and option in err and err.count("\n") == 1, err
    assert {f: f.read_bytes() for f in before} == before and not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("x")
    for extra, option in (([], "-o"), (["--ckpt-every", 1, "--ckpt-dir", tmp_path / "afile" / "ck"], "--ckpt-dir")):
        out = tmp_path / "afile" / "out" if option == "-o" else tmp_path / "o"
        assert distill_main(_args(teacher, student, out, data_copy, *run, *extra)) == 2
        err = capsys.readouterr().err
        assert f"{option} " in err and "cannot write there" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_data_files_by_extension_encoding_and_compression(pair, tmp_path):
    """JSON lines whatever the case of .jsonl, or .json; a compressed, non-UTF-8 or folder --data is refused in
    one line naming it (a review found .JSONL and .json files trained on as text: their JSON syntax tokenized)."""
    import gzip

    _, _, data, _ = pair
    ref = load_blocks(str(data), None, 32, None, 2048)
    for name in ("d.JSONL", "d.json"):
        shutil.copy(data, tmp_path / name)
        got = load_blocks(str(tmp_path / name), None, 32, None, 2048)
        assert torch.equal(got.blocks, ref.blocks)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(Path(data).read_bytes()))
    with pytest.raises(ValueError, match=r"d\.jsonl\.gz: a compressed file"):
        load_blocks(str(tmp_path / "d.jsonl.gz"), None, 32, None, 2048)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text .*convert it to UTF-8"):
        load_blocks(str(tmp_path / "latin1.txt"), object(), 32, None, 2048)
    (tmp_path / "big.jsonl").write_text(json.dumps({"input_ids": [10 ** 30] * 40}) + "\n")
    with pytest.raises(ValueError, match=r"big\.jsonl: a token id does not fit in 64 bits"):
        load_blocks(str(tmp_path / "big.jsonl"), None, 32, None, 2048)
    with pytest.raises(ValueError, match="is a folder"):
        load_blocks(str(tmp_path), None, 32, None, 2048)


def test_damaged_or_unusable_checkpoints_are_refused_in_one_line(pair, tmp_path, capsys):
    """--resume from a damaged training checkpoint says which and what to do (before: tracebacks, or a bare JSON
    error); checkpoints that 'latest' does not name completely are not silently started over (and deleted)."""
    teacher, student, data, _ = pair
    run = ["--steps", 2, "--batch", 2, "--seq-len", 32, "--ckpt-every", 1, "--keep-ckpt"]
    out, ckpt = tmp_path / "o", tmp_path / "o-ckpt"
    assert distill_main(_args(teacher, student, out, data, *run)) == 0
    capsys.readouterr()
    step = ckpt / (ckpt / "latest").read_text().strip()
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)

    def damage(how):
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        how()

    (distcp,) = step.glob("*.distcp")
    cases = [(lambda: os.truncate(distcp, distcp.stat().st_size // 2), "cannot load this training checkpoint"),
             (lambda: distcp.unlink(), "cannot load this training checkpoint"),
             (lambda: (step / ".metadata").unlink(), "cannot load this training checkpoint"),
             (lambda: (step / "meta.json").write_text("{garbled"), "damaged training checkpoint"),
             (lambda: (step / "meta.json").write_text("{}"), "damaged training checkpoint"),
             (lambda: (ckpt / "latest").write_text("step-00000009"), "none that 'latest' (step-00000009) names")]
    for how, msg in cases:
        damage(how)
        assert distill_main(_args(teacher, student, out, data, *run, "--resume", "--force")) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
        assert step.is_dir()   # nothing deleted
    # no 'latest' (a kill -9 between a step dir's rename and latest's write): the newest step dir is resumed
    damage(lambda: (ckpt / "latest").unlink())
    assert distill_main(_args(teacher, student, out, data, *run, "--resume", "--force")) == 0
    assert f"resume: continuing from {step}" in capsys.readouterr().out
    shutil.rmtree(ckpt)   # no checkpoint at all: --resume starts from step 0
    assert distill_main(_args(teacher, student, out, data, *run, "--resume", "--force")) == 0
    assert "no checkpoint in" in capsys.readouterr().out


def test_resume_refuses_other_models_at_the_same_paths(tmp_path, capsys):
    """A training checkpoint records the teacher's, the student's and the tokenizer's sha256; --resume with another
    model at the same path is refused (a review's repro: it continued, the loss jumped and the lineage named the new
    teacher). The output's lineage records the teacher as hashed when the run started."""
    teacher, student = save_pair(tmp_path / "a", "micro", width=512)
    other, _ = save_pair(tmp_path / "b", "micro", width=512, seed=1)
    data = _write_ids(tmp_path / "d.jsonl", 8, 128)
    run = ["--steps", 2, "--batch", 2, "--seq-len", 32, "--ckpt-every", 1, "--keep-ckpt"]
    out = tmp_path / "o"
    assert distill_main(_args(teacher, student, out, data, *run)) == 0
    (step, ) = [s for s in read_lineage(out) if s["kind"] == "distill"]
    assert step["teacher"]["sha256"] == checkpoint_sha256(teacher)
    shutil.copy(Path(other) / "model.safetensors", Path(teacher) / "model.safetensors")
    capsys.readouterr()
    assert distill_main(_args(teacher, student, out, data, *run, "--resume", "--force")) == 2
    err = capsys.readouterr().err
    assert "checkpoint was made with another teacher (sha256 differs" in err and err.count("\n") == 1, err


def _weights_sha256(files: dict[str, bytes]) -> str:
    """checkpoint_sha256's definition, computed here from the files' bytes: sha256 over ``name sha256`` lines."""
    import hashlib

    lines = "".join(f"{n} {hashlib.sha256(b).hexdigest()}\n" for n, b in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_checkpoint_sha256_of_a_sharded_checkpoint_in_parallel_children(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    files = {f"model-{i:05d}-of-00004.safetensors": os.urandom(1 << (20 + i)) for i in range(1, 5)}
    for n, b in files.items():
        (d / n).write_bytes(b)
    (d / "config.json").write_text("{}")   # not a weights file
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {f"t{i}": n for i, n in
                                                                               enumerate(files)}}))
    (d / "model-old.safetensors").write_bytes(b"a stray file beside the shards: not what from_pretrained reads")
    want = _weights_sha256(files)
    assert checkpoint_sha256(d, workers=3) == want == checkpoint_sha256(d, workers=1)
    from distill.train import CheckpointHash

    h = CheckpointHash(d, workers=3)
    assert len(h._hasher._procs) == 3   # three children at once, the four files shared among them
    h.close()
    with pytest.raises(ValueError, match="no weights"):
        checkpoint_sha256(tmp_path)


def test_lineage_names_the_teacher_as_loaded_even_if_replaced_meanwhile(tmp_path, monkeypatch):
    """The teacher's sha256 is taken from the files opened while the models load (by children hashing them
    meanwhile), not at the end: a teacher replaced (renamed onto) during training is recorded as the version the
    run loaded. (Before, it was hashed when the output was written: the lineage named the new file.)"""
    teacher, student = save_pair(tmp_path / "a", "micro", width=512)
    other, _ = save_pair(tmp_path / "b", "micro", width=512, seed=1)
    data = _write_ids(tmp_path / "d.jsonl", 8, 128)
    loaded = (Path(teacher) / "model.safetensors").read_bytes()
    import distill.train as train

    real = train.load_model

    def load_then_replace_teacher(path, *a, **k):
        model = real(path, *a, **k)
        if Path(path) == Path(teacher) and not (tmp_path / "swapped").exists():
            shutil.copy(Path(other) / "model.safetensors", tmp_path / "new.safetensors")
            os.replace(tmp_path / "new.safetensors", Path(teacher) / "model.safetensors")
            (tmp_path / "swapped").touch()
        return model

    monkeypatch.setattr(train, "load_model", load_then_replace_teacher)
    out = tmp_path / "o"
    assert distill_main(_args(teacher, student, out, data, "--steps", 1, "--batch", 2, "--seq-len", 32)) == 0
    assert (tmp_path / "swapped").exists()
    (step, ) = [s for s in read_lineage(out) if s["kind"] == "distill"]
    assert step["teacher"]["sha256"] == _weights_sha256({"model.safetensors": loaded})
    assert step["teacher"]["sha256"] != checkpoint_sha256(teacher)   # (the file there now)


def test_batches_shard_by_rank_and_wrap_epochs():
    blocks = TokenBlocks(torch.arange(7 * 4).view(7, 4), "x", "0", None)
    for step in range(5):  # 5 steps x 4 rows > 7 windows: wraps into epoch 2 and 3
        one = blocks.batch(step, 4, 0, 1, seed=3)
        two = torch.cat([blocks.batch(step, 4, r, 2, seed=3) for r in range(2)])
        assert torch.equal(one, two)
    epoch0 = torch.cat([blocks.batch(s, 1, seed=3) for s in range(7)])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 28, 4))  # a permutation of all windows
    assert not torch.equal(epoch0, torch.cat([blocks.batch(s, 1, seed=3) for s in range(7, 14)]))
    with pytest.raises(ValueError, match="not divisible"):
        blocks.batch(0, 3, 0, 2)


def test_each_epoch_is_a_permutation_seeded_by_seed_plus_epoch():
    """Window order: epoch e of --seed s is torch.randperm(n) from a generator seeded s + e (the documented
    overlap: epoch e of seed s is epoch e - 1 of seed s + 1); other seeds give other orders."""
    n, b = 7, 2
    blocks = TokenBlocks(torch.arange(n).view(n, 1), "x", "0", None)
    for seed in (0, 5):
        got = torch.cat([blocks.batch(step, b, seed=seed)[:, 0] for step in range(7)])   # 14 rows: 2 epochs
        want = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)) for e in (0, 1)])
        assert torch.equal(got, want)
    first = [torch.cat([blocks.batch(s, 1, seed=seed)[:, 0] for s in range(n)]) for seed in (0, 5)]
    assert not torch.equal(*first)


def test_windows_are_the_first_max_tokens_of_the_stream(tmp_path):
    """--max-tokens cuts the stream (even inside a line), and the windows are its head: a tail shorter than a
    window is dropped."""
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"input_ids": list(range(10 * i, 10 * i + 10))}) + "\n" for i in range(3)))
    got = load_blocks(str(f), None, 4, 15, 2048)
    assert torch.equal(got.blocks, torch.arange(12).view(3, 4))   # first 15 tokens -> 3 windows of 4
    assert torch.equal(load_blocks(str(f), None, 7, None, 2048).blocks, torch.arange(28).view(4, 7))


def test_the_default_data_is_the_bench_train_split():
    """Without --data, the windows are the evaluation bed's train split (never its validation split), encoded as
    <bos> doc <eos> per document; built here from the split's texts."""
    from bench.corpus import load_texts
    from bench.tokenizer import get_tokenizer

    tok = get_tokenizer("micro")
    want = []
    for text in load_texts("train"):
        want += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        if len(want) >= 300:
            break
    got = load_blocks(None, tok, 32, 300, tok.vocab_size)
    assert got.source == "bench.corpus:train"
    assert torch.equal(got.blocks.flatten(), torch.tensor(want[:288]))   # 9 windows of 32


def test_text_data_is_bos_doc_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "b": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "bba"}) + "\n")
    got = load_blocks(str(f), tok, 3, 100, 6)
    assert got.blocks.tolist() == [[2, 4, 5], [1, 2, 5], [5, 4, 1]]
    assert got.sha256 == sha256_file(f) and got.tokenizer_sha256 is not None
    with pytest.raises(ValueError, match="outside the models' vocabulary"):
        load_blocks(str(f), tok, 3, 100, 5)
    with pytest.raises(ValueError, match="need a tokenizer"):
        load_blocks(str(f), None, 3, 100, 6)
    # text and input_ids lines mixed: the stream keeps the file's order
    f.write_text("\n".join(json.dumps(r) for r in ({"text": "a"}, {"input_ids": [5, 5]}, {"text": "b"})) + "\n")
    assert load_blocks(str(f), tok, 1, 100, 6).blocks.flatten().tolist() == [2, 4, 1, 5, 5, 2, 5, 1]
    for bad in ([5, None], [5, 1.9], [True], ["12"]):
        f.write_text(json.dumps({"input_ids": bad}) + "\n")
        with pytest.raises(ValueError, match="t.jsonl:1: input_ids must be a list of integers"):
            load_blocks(str(f), tok, 1, 100, 6)


def test_the_default_checkpoint_dir_is_a_sibling_of_the_output_as_written(tmp_path, monkeypatch):
    """``-o out/`` (a shell's completion) and ``-o out/.`` name the same output as ``-o out``: the training
    checkpoints go beside it, never inside it (which the run refuses: the output is replaced at the end)."""
    monkeypatch.chdir(tmp_path)
    for out, want in (("o", "o-ckpt"), ("o/", "o-ckpt"), ("o//", "o-ckpt"), ("./o/.", "o-ckpt"),
                      (str(tmp_path / "a" / "o") + "/", str(tmp_path / "a" / "o-ckpt")),
                      (".", str(tmp_path) + "-ckpt"), ("a/..", str(tmp_path) + "-ckpt")):
        cfg = DistillConfig(teacher="t", student="s", out=out)
        assert cfg.ckpt_dir == want, out
        assert Path(out).resolve() not in Path(cfg.ckpt_dir).resolve().parents, out
    assert DistillConfig(teacher="t", student="s", out="o/", ckpt_dir="o/ck").ckpt_dir == "o/ck"  # as given


def test_lr_schedule():
    from distill.config import DistillConfig

    cfg = DistillConfig(teacher="t", student="s", out="o", steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "distill", *map(str, args)]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _kill9_after_a_checkpoint_then_resume(common: list, out: Path, ckpt: Path, steps: int, wait_s: float) -> None:
    """Start ``python -m distill *common -o out``, kill -9 it once its first checkpoint is in ``ckpt``, then run it
    again with ``--resume``: it must continue from that step and finish."""
    proc = subprocess.Popen(_cli(*common, "-o", out), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while not (ckpt / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "meta.json").read_text())["step"]
    assert 0 < killed_at < steps and not out.exists()
    res = subprocess.run(_cli(*common, "-o", out, "--resume"), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "continuing from" in res.stdout and f"(step {killed_at}/{steps})" in res.stdout


@pytest.mark.parametrize("precision,ema", [("fp32", 0), ("bf16-master", 0), ("fp32", 0.8)])
def test_kill9_then_resume_is_byte_identical(pair, tmp_path, precision, ema):
    """bf16-master: the checkpoint must carry the fp32 masters (the bf16 weights alone would lose their low
    bits, and the continued run would drift from the uninterrupted one). --ema-decay: it must carry the moving
    average too (the written weights are the average)."""
    teacher, student, data, _ = pair
    common = ["--teacher", teacher, "--student", student, "--data", data, "--threads", "1", "--steps", 12,
              "--batch", 2, "--seq-len", 32, "--lr", 3e-4, "--ckpt-every", 3, "--log-every", 100,
              "--precision", precision, "--ema-decay", ema]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*common, "-o", ref), check=True, env=_env(), cwd=REPO, capture_output=True)

    out, ckpt = tmp_path / "killed", tmp_path / "killed-ckpt"
    _kill9_after_a_checkpoint_then_resume(common, out, ckpt, steps=12, wait_s=120)
    for name in ("model.safetensors", "config.json", "pdqkit_lineage.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not ckpt.exists()  # removed after the successful finish
    assert read_lineage(out)[-1].get("ema", {}).get("decay") == (ema or None)


def test_deterministic_kernels_are_switched_on_for_the_run_and_back_off_after(pair, tmp_path, monkeypatch, capsys):
    """--deterministic turns on torch's deterministic algorithms and cuBLAS's fixed workspace for the run (seen
    from inside it), and puts the algorithms switch back afterwards, also after a failed run (the workspace
    variable stays: cuBLAS reads it once per process). A workspace value that is not deterministic is refused."""
    import distill.train as train

    teacher, student, data, _ = pair
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real = train._run

    def spy(cfg, env):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real(cfg, env)

    monkeypatch.setattr(train, "_run", spy)
    run = _args(teacher, student, tmp_path / "o", data, "--steps", 1, "--batch", 2, "--seq-len", 32)
    assert distill_main(run + ["--deterministic"]) == 0
    assert distill_main(_args(teacher, student, tmp_path / "o2", data, "--steps", 1, "--batch", 2,
                              "--seq-len", 32)) == 0
    assert seen == [(True, ":4096:8"), (False, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled()
    assert read_lineage(tmp_path / "o")[-1]["deterministic"] is True
    assert "deterministic" not in read_lineage(tmp_path / "o2")[-1]

    def fails(cfg, env):
        assert torch.are_deterministic_algorithms_enabled()
        raise OSError("disk full")

    monkeypatch.setattr(train, "_run", fails)
    assert distill_main(run + ["--deterministic", "--force"]) == 1
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    capsys.readouterr()
    assert distill_main(run + ["--deterministic", "--force"]) == 2
    err = capsys.readouterr().err
    assert "CUBLAS_WORKSPACE_CONFIG=:0:0 does not make cuBLAS deterministic" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def pair512(tmp_path_factory):
    """The micro pair with E4B's 512-wide full-attention heads, which SDPA's flash kernel does not take: their
    backward runs the memory-efficient kernel, whose query gradient is accumulated with atomics by default (on
    the H200 two default runs of such a pair differed in 42.7M of their weights: bench/gpu/distill_determinism.py)."""
    root = tmp_path_factory.mktemp("distill_pair512")
    teacher, student = save_pair(root, "micro", width=512, global_head_dim=512)
    return teacher, student, _write_ids(root / "data.jsonl", 16, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("phase", [1, 2])
def test_cuda_kill9_then_resume_is_byte_identical_with_deterministic_kernels(pair512, tmp_path, phase):
    """On CUDA (bf16-mixed, SDPA) with --deterministic: a second uninterrupted run, and a run killed with kill -9
    after a checkpoint and resumed, write the same bytes as the first run. Phase 2 samples continuations on the
    GPU from the checkpointed RNG state."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    teacher, student, data = pair512
    common = ["--teacher", teacher, "--student", student, "--data", data, "--device", "cuda", "--deterministic",
              "--phase", phase, "--steps", 8, "--batch", 8, "--seq-len", 512, "--lr", 3e-4, "--ckpt-every", 2,
              "--log-every", 100]
    if phase == 2:
        common += ["--max-new-tokens", 32, "--lmbda", 1.0]
    outs = []
    for name in ("ref", "ref2"):
        subprocess.run(_cli(*common, "-o", tmp_path / name), check=True, env=_env(), cwd=REPO, capture_output=True)
        outs.append(tmp_path / name)

    out = tmp_path / "killed"
    _kill9_after_a_checkpoint_then_resume(common, out, tmp_path / "killed-ckpt", steps=8, wait_s=300)
    for d in (outs[1], out):
        for name in ("model.safetensors", "config.json", "pdqkit_lineage.json"):
            assert (d / name).read_bytes() == (outs[0] / name).read_bytes(), (d.name, name)


def test_ema_run_writes_the_average(pair, tmp_path):
    """One step at a large lr: the written weights are 0.5 * (student + stepped weights) (within bf16 rounding of
    the three), not the stepped weights; the lineage says whose losses it logged and the start's share."""
    teacher, student, data, _ = pair
    run = ("--steps", 1, "--batch", 2, "--seq-len", 32, "--lr", 1e-2, "--warmup-steps", 0)
    assert distill_main(_args(teacher, student, tmp_path / "raw", data, *run)) == 0
    assert distill_main(_args(teacher, student, tmp_path / "avg", data, *run, "--ema-decay", 0.5)) == 0
    w0, w1, wa = (load_file(d / "model.safetensors") for d in (student, tmp_path / "raw", tmp_path / "avg"))
    moved = 0
    for name, a in wa.items():
        x0, x1, xa = w0[name].float(), w1[name].float(), a.float()
        tol = 2.0 ** -8 * torch.maximum(x0.abs(), x1.abs()) + 1e-12
        assert ((xa - 0.5 * (x0 + x1)).abs() <= tol).all(), name
        moved += int((xa != x1).sum())
    assert moved > 0.5 * sum(int((w0[n] != w1[n]).sum()) for n in w1)  # most trained weights are averages
    ema = read_lineage(tmp_path / "avg")[-1]["ema"]
    assert ema["decay"] == 0.5 and ema["start_weight"] == 0.5 and "raw weights" in ema["losses_of"]
    assert "ema" not in read_lineage(tmp_path / "raw")[-1]


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_teacher_and_student_tokenizers_must_agree(pair, tmp_path, capsys):
    """A student whose tokenizer maps text to other ids than the teacher's is refused before training (a one-line
    error naming both); the same tokenizer in both, or one in either, passes."""
    import shutil

    teacher, student, data, _ = pair
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(60)]
    t2, s2 = shutil.copytree(teacher, tmp_path / "t"), shutil.copytree(student, tmp_path / "s")
    _word_tokenizer(words).save_pretrained(t2)
    _word_tokenizer(words[:4] + words[4:][::-1]).save_pretrained(s2)   # same size, other ids
    assert distill_main(_args(t2, s2, tmp_path / "o", data, "--steps", 1, "--batch", 2, "--seq-len", 32)) == 2
    err = capsys.readouterr().err
    assert f"{s2}: its tokenizer differs from the teacher's ({t2})" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    _word_tokenizer(words).save_pretrained(s2)
    assert distill_main(_args(t2, s2, tmp_path / "o", data, "--steps", 1, "--batch", 2, "--seq-len", 32)) == 0
    assert distill_main(_args(t2, student, tmp_path / "o2", data, "--steps", 1, "--batch", 2, "--seq-len", 32)) == 0


def test_resume_refuses_other_settings(pair, tmp_path, capsys):
    teacher, student, data, _ = pair
    base = _args(teacher, student, tmp_path / "a", data, "--steps", 2, "--batch", 2, "--seq-len", 32)
    assert distill_main(base + ["--ckpt-every", "1", "--keep-ckpt"]) == 0
    assert (tmp_path / "a-ckpt" / "latest").read_text().strip() == "step-00000001"
    again = _args(teacher, student, tmp_path / "b", data, "--steps", 2, "--batch", 2, "--seq-len", 32,
                  "--ckpt-dir", tmp_path / "a-ckpt", "--resume", "--lr", 1e-3)
    assert distill_main(again) == 2
    assert "different settings (lr)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # without --resume an existing checkpoint dir is not silently reused
    assert distill_main(_args(teacher, student, tmp_path / "c", data, "--ckpt-dir", tmp_path / "a-ckpt")) == 2
    assert "pass --resume" in capsys.readouterr().err
    # another --adam-eps is another run
    eps = _args(teacher, student, tmp_path / "d", data, "--steps", 2, "--batch", 2, "--seq-len", 32,
                "--ckpt-dir", tmp_path / "a-ckpt", "--resume", "--adam-eps", 1e-5)
    assert distill_main(eps) == 2 and "different settings (adam_eps)" in capsys.readouterr().err
    # the fused loss kernel computes the same loss with other fp32 rounding: other bytes, another run
    fused = _args(teacher, student, tmp_path / "f", data, "--steps", 2, "--batch", 2, "--seq-len", 32,
                  "--ckpt-dir", tmp_path / "a-ckpt", "--resume", "--loss-impl", "fused")
    assert distill_main(fused) == 2 and "different settings (loss_impl)" in capsys.readouterr().err
    # deterministic kernels round differently from the default ones on CUDA: another run
    det = _args(teacher, student, tmp_path / "g", data, "--steps", 2, "--batch", 2, "--seq-len", 32,
                "--ckpt-dir", tmp_path / "a-ckpt", "--resume", "--deterministic")
    assert distill_main(det) == 2 and "different settings (deterministic)" in capsys.readouterr().err
    # a checkpoint written before --adam-eps / --ema-decay / --ce-weight / --deterministic existed (none of them in
    # its meta) ran with their defaults (torch's 1e-8, no average, no data term, default kernels): it resumes
    import json

    step = tmp_path / "a-ckpt" / "step-00000001"
    meta = json.loads((step / "meta.json").read_text())
    for k in ("adam_eps", "ema_decay", "ce_weight", "deterministic"):
        del meta["config"][k]
    (step / "meta.json").write_text(json.dumps(meta))
    old = _args(teacher, student, tmp_path / "e", data, "--steps", 2, "--batch", 2, "--seq-len", 32,
                "--ckpt-dir", tmp_path / "a-ckpt", "--resume")
    assert distill_main(old) == 0, capsys.readouterr().err
    assert "resume: continuing from" in capsys.readouterr().out


def test_resume_on_other_hardware_is_recorded_and_printed(pair, tmp_path, capsys):
    """The lineage names where the arithmetic ran (device type, and the CPU thread count, which changes the
    rounding). A resume with another thread count is allowed (moving a run is why one resumes) but printed, and
    the lineage then lists both segments; a resume on the same hardware lists one, as an uninterrupted run does."""
    teacher, student, data, _ = pair
    run = ["--steps", 2, "--batch", 2, "--seq-len", 32]
    assert distill_main(_args(teacher, student, tmp_path / "a", data, *run, "--ckpt-every", 1, "--keep-ckpt")) == 0
    one = {"device": "cpu", "threads": 1}
    assert read_lineage(tmp_path / "a")[-1]["hardware"] == [one]
    assert json.loads((tmp_path / "a-ckpt" / "step-00000001" / "meta.json").read_text())["hardware"] == [one]
    resume = ["--ckpt-dir", tmp_path / "a-ckpt", "--resume"]
    capsys.readouterr()
    assert distill_main(_args(teacher, student, tmp_path / "same", data, *run, *resume, "--keep-ckpt")) == 0
    assert "rounded differently" not in capsys.readouterr().out
    assert read_lineage(tmp_path / "same")[-1]["hardware"] == [one]
    try:
        # (argparse keeps the last --threads)
        assert distill_main(_args(teacher, student, tmp_path / "b", data, *run, *resume, "--threads", 2)) == 0
    finally:
        torch.set_num_threads(1)
    out = capsys.readouterr().out
    assert "was trained on (device cpu, threads 1), this run is on (device cpu, threads 2)" in out, out
    assert read_lineage(tmp_path / "b")[-1]["hardware"] == [one, {"device": "cpu", "threads": 2}]


def test_phase2_resume_keeps_lineage_and_log(pair, tmp_path):
    """A resumed phase-2 run writes the same weights and lineage (``generated_tokens`` counts the steps before
    the checkpoint too) as the uninterrupted run, and its ``--log-json`` reads like that run's log."""
    teacher, student, data, _ = pair
    common = ["--phase", 2, "--steps", 3, "--batch", 2, "--seq-len", 40, "--max-new-tokens", 8, "--lmbda", 1.0]
    log = tmp_path / "log.jsonl"
    assert distill_main(_args(teacher, student, tmp_path / "a", data, *common, "--ckpt-every", 1, "--keep-ckpt",
                              "--log-json", log)) == 0
    first = log.read_text()
    assert (tmp_path / "a-ckpt" / "latest").read_text().strip() == "step-00000002"
    # the killed run's situation: its log holds every step and a summary, its last checkpoint is step 2
    assert distill_main(_args(teacher, student, tmp_path / "b", data, *common, "--ckpt-dir", tmp_path / "a-ckpt",
                              "--resume", "--log-json", log)) == 0
    for name in ("model.safetensors", "pdqkit_lineage.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert read_lineage(tmp_path / "b")[-1]["generated_tokens"] == 3 * 2 * 8

    def events(text):
        return [(r["event"], r.get("step"), r.get("loss")) for r in map(json.loads, text.splitlines())]

    assert events(log.read_text()) == events(first)
    assert [e[:2] for e in events(first)] == [("config", None), ("step", 1), ("step", 2), ("step", 3),
                                              ("summary", None)]


def test_checkpoint_cleanup_removes_only_its_own_files(pair, tmp_path, capsys):
    teacher, student, data, _ = pair
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    run = ["--steps", 3, "--batch", 2, "--seq-len", 32, "--ckpt-every", 1, "--ckpt-dir", mine]
    assert distill_main(_args(teacher, student, mine / "d1", data, *run)) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["d1", "notes.txt"]  # step dirs and latest gone
    assert (mine / "d1" / "model.safetensors").is_file()
    assert distill_main(_args(teacher, student, mine / "d2", data, *run[:-2], "--ckpt-dir", mine / "d2")) == 2
    assert "must not be the output dir" in capsys.readouterr().err and not (mine / "d2").exists()
    assert distill_main(_args(teacher, student, tmp_path / "o", data, *run[:-2], "--ckpt-dir",
                              tmp_path / "o" / "ck")) == 2
    assert "must not be the output dir" in capsys.readouterr().err
    # a JSON log inside the output dir: refused before anything is written (it used to create OUT, so that the
    # finished run's own write refused it, or with --force the output's swap deleted the log)
    assert distill_main(_args(teacher, student, tmp_path / "o", data, *run[:-2], "--ckpt-dir", tmp_path / "ck2",
                              "--log-json", tmp_path / "o" / "log.jsonl")) == 2
    assert "must not be the output dir" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # --force over an earlier run's checkpoints deletes those, not the rest of the dir
    log = tmp_path / "d1.jsonl"
    assert distill_main(_args(teacher, student, mine / "d1", data, *run, "--keep-ckpt", "--force", "--log-json",
                              log)) == 0
    assert (mine / "latest").is_file()
    # ... but only once the run has loaded and checked its input: a run refused for bad input (a layer the models
    # do not have, found after loading them) leaves the earlier run's checkpoints and log as they were
    kept, logged = (mine / "latest").read_text(), log.read_text()
    assert distill_main(_args(teacher, student, mine / "d1", data, *run, "--force", "--log-json", log,
                              "--hidden-layers", "0,9")) == 2
    assert "--hidden-layers" in capsys.readouterr().err
    assert (mine / "latest").read_text() == kept and (mine / kept.strip()).is_dir() and log.read_text() == logged
    assert distill_main(_args(teacher, student, mine / "d1", data, *run, "--force")) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["d1", "notes.txt"]


def test_option_combinations_refused(pair, tmp_path, capsys):
    teacher, student, data, _ = pair
    cases = [(["--phase", 2, "--seq-len", 64, "--max-new-tokens", 8, "--compile-loss"], "--compile-loss is for phase 1"),
             (["--steps", 4, "--warmup-steps", 4], "--warmup-steps 4: must be below --steps 4")]
    for extra, msg in cases:
        assert distill_main(_args(teacher, student, tmp_path / "o", data, *extra)) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    if not torch.cuda.is_available():
        assert distill_main(_args(teacher, student, tmp_path / "o", data, "--device", "cuda")) == 2
        err = capsys.readouterr().err
        assert "CUDA is not available on this machine; use --device cpu" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_student_gradients_with_activation_checkpointing_and_chunking(pair):
    """The training module's gradients (KL + hidden matching, layer-output hooks) are the same with activation
    checkpointing and a small loss chunk as with neither, and equal a direct reference on the full logits."""
    from distill.losses import hidden_state_loss
    from distill.models import DistillModule, capture_layer_outputs, set_trainable

    teacher_dir, student_dir, _, _ = pair
    t = load_model(teacher_dir, torch.float32)
    ids = torch.randint(4, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_layer_outputs(t.get_decoder().layers, [1, 4]) as th:
        t_last = t.get_decoder()(input_ids=ids).last_hidden_state
        t_logits = t(input_ids=ids).logits
    n = ids.numel()

    def grads(ckpt: bool, chunk: int):
        s = load_model(student_dir, torch.float32)
        set_trainable(s)
        if ckpt:
            checkpointing_enable(s, {"use_reentrant": False})
        s.train()
        dm = DistillModule(s, logit_loss="forward_kl", temperature=2.0, beta=0.5, logit_weight=1.0,
                           hidden_layers=[1, 4], hidden_weights=[0.3, 0.7], chunk=chunk, compute_dtype=torch.float32)
        loss, _ = dm(ids, teacher_last=t_last, teacher_head=t.get_output_embeddings().weight, teacher_hidden=th,
                     rows=torch.arange(n), row_weights=torch.full((n,), 1.0 / n))
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in s.named_parameters() if p.requires_grad}

    ref_s = load_model(student_dir, torch.float32)
    set_trainable(ref_s)
    with capture_layer_outputs(ref_s.get_decoder().layers, [1, 4]) as sh:
        logits = ref_s(input_ids=ids).logits
    ref = forward_kl(logits.reshape(n, -1), t_logits.reshape(n, -1), 2.0).mean()
    ref = ref + hidden_state_loss([sh[1], sh[4]], [th[1], th[4]], [0.3, 0.7])[0]
    ref.backward()
    ref_g = {k: p.grad for k, p in ref_s.named_parameters() if p.requires_grad}
    for ckpt, chunk in ((False, 4096), (True, 7)):
        loss, g = grads(ckpt, chunk)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7)
        assert set(g) == set(ref_g)
        for k in g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-5 * float(ref_g[k].abs().max()) + 1e-12,
                                       msg=k)


def test_trainable_mlp_changes_only_mlp_weights(pair, tmp_path):
    """--trainable mlp: every decoder-layer MLP weight moves, every other tensor is bit-identical to the student's;
    the lineage records it; with --train-embeddings it is refused."""
    teacher, student, _, _ = pair
    data = _write_ids(tmp_path / "d.jsonl", 2, 64)
    out = tmp_path / "mlp"
    assert distill_main(_args(teacher, student, out, data, "--steps", 2, "--batch", 2, "--seq-len", 32,
                              "--lr", 1e-3, "--trainable", "mlp")) == 0
    a, b = load_file(out / "model.safetensors"), load_file(student / "model.safetensors")
    assert set(a) == set(b)
    mlp = [k for k in a if ".mlp." in k]
    assert mlp and all(not torch.equal(a[k], b[k]) for k in mlp)
    assert all(torch.equal(a[k], b[k]) for k in a if ".mlp." not in k)
    assert read_lineage(out)[-1]["trainable"] == "mlp"
    with pytest.raises(ValueError, match="trainable mlp"):
        DistillConfig(teacher="t", student="s", out="o", trainable="mlp", train_embeddings=True)


def test_training_checkpoint_is_durable_before_it_is_named(tmp_path, monkeypatch):
    """A training checkpoint's files (model, optimizer, RNG, meta) are synced before the step dir is renamed into
    place, the rename before `latest` names it, and `latest` itself before the older step dirs are deleted: a power
    loss never leaves `latest` naming data that did not reach the disk."""
    import pack.checkpoint
    from distill.parallel import DistEnv
    from distill.state import LATEST, save_checkpoint

    events, ck = [], tmp_path / "ck"
    real_tree, real_dir = pack.checkpoint.fsync_tree, pack.checkpoint.fsync_dir

    def tree(root):
        root = Path(root)
        events.append(("tree", root.name, sorted(p.name for p in root.iterdir()) if root.is_dir() else None))
        real_tree(root)

    def fdir(d):   # (fsync_tree syncs the step dir's own directories through it too: those are not listed)
        if Path(d) == ck:
            events.append(("dir", ck.name, (ck / LATEST).is_file() and (ck / LATEST).read_text().strip()))
        real_dir(d)

    monkeypatch.setattr(pack.checkpoint, "fsync_tree", tree)
    monkeypatch.setattr(pack.checkpoint, "fsync_dir", fdir)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    env = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    save_checkpoint(ck, 1, model, opt, env, {"k": 1})
    events.clear()
    save_checkpoint(ck, 2, model, opt, env, {"k": 1})
    (kind0, name0, files0), rename, (kind2, name2, _), after = events
    assert (kind0, name0) == ("tree", ".step-00000002.tmp") and {"meta.json", "rng-rank0.pt"} <= set(files0)
    assert rename == ("dir", "ck", "step-00000001")                  # the step dir renamed, `latest` still old
    assert (kind2, name2) == ("tree", f".{LATEST}.tmp") and after == ("dir", "ck", "step-00000002")
    assert sorted(p.name for p in ck.iterdir()) == [LATEST, "step-00000002"]
