"""The chain prune -> distill -> pack.quantize on inputs a user brings (a read-only audit's repros, forty-fourth
session; each fails on the code before): checkpoints that are wrong in ways ``from_pretrained`` tolerates, a folder
holding both ``model.safetensors`` and an index, a hub snapshot without a pdqkit lineage, relative paths, an untied
``lm_head``. References: the files' own bytes (hashlib), transformers' own loading, the documented contracts."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.__main__ import main as distill_main
from tests.distill_fixtures import saved_micro_pair
from pack.checkpoint import read_lineage
from pack.quantize import main as quantize_main
from prune.__main__ import main as prune_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from bench.tokenizer import get_tokenizer

    return saved_micro_pair(tmp_path_factory.mktemp("inputs_pair"), docs=4, length=64,
                            tokenizer=get_tokenizer("micro"))


def _sha(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _distill(teacher, student, out, data, *extra) -> int:
    return distill_main(["--teacher", str(teacher), "--student", str(student), "-o", str(out), "--data", str(data),
                         "--threads", "1", "--steps", "1", "--batch", "2", "--seq-len", "32", *map(str, extra)])


def _drop_tensor(d: Path, name: str) -> None:
    sd = load_file(d / "model.safetensors")
    del sd[name]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _shard(d: Path, weight_map) -> None:
    """model.safetensors renamed to a shard; an index with ``weight_map`` (None: no index)."""
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    if weight_map is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])


BROKEN = {  # what is done to the checkpoint, what the one line says
    "missing tensor": (lambda d: _drop_tensor(d, "model.layers.1.mlp.down_proj.weight"),
                       "its weights do not match Gemma4ForCausalLM as config.json describes it: tensors 1 missing "
                       "(e.g. model.layers.1.mlp.down_proj.weight)"),
    "truncated file": (_truncate, "a safetensors file of the checkpoint is unreadable"),
    "index not one": (lambda d: _shard(d, 5), "model.safetensors.index.json: not a valid safetensors index"),
    "shards, no index": (lambda d: _shard(d, None), "no weights (model.safetensors, model.safetensors.index.json, "
                                                    "pytorch_model.bin or its index); it has safetensors files "
                                                    "(model-00001-of-00001.safetensors)"),
    "garbled config": (lambda d: (d / "config.json").write_text("{not json"),
                       "config.json: transformers cannot read it"),
}


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_distill_refuses_a_broken_model_in_one_line(pair, tmp_path, capsys, role, case):
    """Before: a missing tensor was left randomly initialised and the run distilled from (or trained) it, exit 0;
    the other cases were tracebacks or exit 1."""
    teacher, student, data = pair
    broken = Path(shutil.copytree(teacher if role == "teacher" else student, tmp_path / role))
    damage, said = BROKEN[case]
    damage(broken)
    models = (broken, student) if role == "teacher" else (teacher, broken)
    capsys.readouterr()
    assert _distill(*models, tmp_path / "o", data) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distill: error: {broken}") and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["index not one", "shards, no index", "missing tensor"])
def test_prune_refuses_a_broken_checkpoint_in_one_line(pair, tmp_path, capsys, case):
    """Before: an index that is not one was a traceback (AttributeError), shards without their index exit 1."""
    broken = Path(shutil.copytree(pair[0], tmp_path / "t"))
    damage, said = BROKEN[case]
    damage(broken)
    capsys.readouterr()
    assert prune_main([str(broken), "-o", str(tmp_path / "o"), "--criterion", "magnitude", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prune: error: {broken}") and said in err and err.count("\n") == 1, err


def test_distill_refuses_a_quantized_model(pair, tmp_path, capsys):
    """A W4A16 checkpoint as the teacher or the student: one line saying what distill takes (before: tracebacks,
    'only Tensors of floating point dtype can require gradients' and "'Linear' object has no attribute 'weight'")."""
    teacher, student, data = pair
    assert quantize_main([str(teacher), "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    for models in ((tmp_path / "q", student), (teacher, tmp_path / "q")):
        capsys.readouterr()
        assert _distill(*models, tmp_path / "o", data) == 2
        err = capsys.readouterr().err
        assert err == (f"distill: error: {tmp_path / 'q'}: a quantized checkpoint (config.json has "
                       f"quantization_config); distill takes bf16 checkpoints (the unpruned teacher, the pruned "
                       f"student) and pack.quantize runs on its output\n")


def test_a_folder_with_both_layouts_is_read_as_from_pretrained_reads_it(pair, tmp_path):
    """``model.safetensors`` beside an index and its shards (other weights): transformers loads model.safetensors,
    and so must pack (before: the shards), prune and distill, whose lineage hashes only it."""
    from transformers import AutoModelForCausalLM

    teacher = pair[0]
    both = Path(shutil.copytree(teacher, tmp_path / "both"))
    other = {k: v.clone() for k, v in load_file(both / "model.safetensors").items()}
    for v in other.values():
        v.mul_(2)
    save_file(other, both / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (both / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model-00001-of-00001."
                                                                                     "safetensors" for k in other}}))
    hf = AutoModelForCausalLM.from_pretrained(both, dtype=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(hf.state_dict()[name], load_file(teacher / "model.safetensors")[name])   # (transformers)

    assert quantize_main([str(both), "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    assert quantize_main([str(teacher), "-o", str(tmp_path / "q1"), "--no-progress"]) == 0
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == (tmp_path / "q1" / "model.safetensors").read_bytes()
    assert prune_main([str(both), "-o", str(tmp_path / "p"), "--criterion", "magnitude", "--no-progress"]) == 0
    assert read_lineage(tmp_path / "p")[-1]["input_files_sha256"] == {
        "model.safetensors": _sha(both / "model.safetensors")}


def test_the_chain_keeps_the_base_model_and_pins_each_input(pair, tmp_path, monkeypatch):
    """A hub snapshot without a pdqkit lineage, pruned, distilled and packed, with relative paths: the lineage
    starts with its base step (hub id, revision, files' sha256), as when it is packed directly (before: the chain
    started at prune, and the model was named nowhere); the distill step pins teacher and student by their files'
    sha256 (the student's equal to the pruned files'), and every path in it is absolute."""
    teacher, _, data = pair
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "0123abc"
    shutil.copytree(teacher, snap)
    (snap / "pdqkit_lineage.json").unlink()
    (tmp_path / "cal.txt").write_text(("the quick brown fox jumps over the lazy dog. " * 200 + "\n") * 4)
    monkeypatch.chdir(tmp_path)
    rel = Path("hub/models--acme--tiny/snapshots/0123abc")
    assert prune_main([str(rel), "-o", "p", "--samples", "4", "--seq-len", "32", "--calib", "cal.txt",
                       "--no-progress"]) == 0
    assert _distill(rel, "p", "d", data) == 0
    assert quantize_main(["d", "-o", "q", "--no-progress"]) == 0
    lineage = read_lineage(tmp_path / "q")
    assert [s["kind"] for s in lineage] == ["base", "prune", "distill", "quant"]
    base = lineage[0]
    assert (base["model"], base["revision"]) == ("acme/tiny", "0123abc")
    assert base["files_sha256"] == {"model.safetensors": _sha(snap / "model.safetensors")}
    assert lineage[1]["from"] == "base" and lineage[1]["calibration"][0]["dataset"] == str(tmp_path / "cal.txt")
    d = lineage[2]
    assert d["teacher"]["path"] == str(snap) and d["student"]["path"] == str(tmp_path / "p")
    assert d["teacher"]["files_sha256"] == base["files_sha256"]
    assert d["student"]["files_sha256"] == {"model.safetensors": _sha(tmp_path / "p" / "model.safetensors")}
    assert d["data"]["source"] == str(Path(data).resolve())
    card = (tmp_path / "q" / "README.md").read_text()
    assert "acme/tiny" in card


def test_train_embeddings_trains_an_untied_lm_head(tmp_path):
    """--train-embeddings trains the embedding tables, an untied lm_head (Llama's, or a Gemma-4 built untied)
    included; without it both stay as they were (before: the untied lm_head was never trained)."""
    teacher, student, data = saved_micro_pair(tmp_path, docs=4, length=64, tie_word_embeddings=False)
    before = load_file(student / "model.safetensors")
    assert not torch.equal(before["lm_head.weight"], before["model.embed_tokens.weight"])   # untied
    for flag, trained in (([], False), (["--train-embeddings"], True)):
        out = tmp_path / f"o{len(flag)}"
        assert _distill(teacher, student, out, data, "--lr", 1e-2, *flag) == 0
        after = load_file(out / "model.safetensors")
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            assert torch.equal(after[name], before[name]) != trained, (flag, name)
        up = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(after[up], before[up])   # (the step trained)
