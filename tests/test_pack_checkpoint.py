"""Checkpoint plumbing end to end (pack/checkpoint.py, pack/writer.py), each checked against an independent
computation (hashlib, safetensors reads, huggingface_hub's shard split, transformers' loader and size parser):

* aux files (tokenizer, chat template, processor, generation config, ...) are carried over byte-identical by
  ``copy_aux_files``, ``pack.quantize`` and ``save_bf16_checkpoint(source_dir=...)``; nothing else is;
* ``save_bf16_checkpoint``: the KV-shared ``k_norm`` tensors are in the file (one file) or in ``KNORM_SHARD`` and
  the index (sharded), the index's ``total_size`` is the bytes of every tensor in every shard, and transformers
  loads the sharded output with nothing missing;
* ``pack.quantize`` sharding: HF shard names, huggingface_hub's greedy split of the (never split) groups, the
  exact-fill boundary, decimal/binary size units as transformers parses them, the index totals;
* lineage ids stay unique (``distill``, ``distill2``, ``distill3``) when a stage runs three times;
* the model card's sha256 table is the sha256 of the files written.

The micro Gemma-4 (bench/factory.py) is text-only with 6 layers of which the last 2 are KV-shared.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pack.checkpoint import (AUX_FILE_PATTERNS, INDEX_NAME, KNORM_SHARD, LINEAGE_FILE, RECIPE_FILE, SINGLE_NAME,
                             copy_aux_files, lineage_step, read_lineage, save_bf16_checkpoint, write_lineage)
from pack.quantize import main as quantize_main
from pack.writer import parse_size, quantize_checkpoint

# One file per AUX_FILE_PATTERNS entry at least (Gemma-4 ships chat_template.jinja; older checkpoints a .json).
AUX_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
             "video_preprocessor_config.json", "generation_config.json", "added_tokens.json", "spiece.model",
             "vocab.json", "vocab.txt", "merges.txt")
# Files a checkpoint dir may hold that are not aux files: never copied.
NOT_AUX = ("notes.txt", "config.json", "model.safetensors", "model.safetensors.index.json",
           "model-00001-of-00002.safetensors", "model-knorm.safetensors", "pdqkit_lineage.json", "quant_recipe.json",
           "README.md", "vllm_config.yaml", "pytorch_model.bin", "my_tokenizer.json", "chat.jinja", "train.model.bak")
# What pack.quantize writes itself besides the weights (pack/writer.py module doc, step 5).
QUANT_OWN = {"config.json", "README.md", "vllm_config.yaml", LINEAGE_FILE, RECIPE_FILE}
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
Q_OPTS = dict(fsync=False, plan_cache=False, hash_cache=False)   # same bytes; no ~/.cache from module fixtures


def _content(name: str) -> bytes:
    """Distinct bytes per file name, binary included (a text-mode or re-encoding copy would change them)."""
    return f"{name}: pdqkit aux test\n".encode() + hashlib.sha256(name.encode()).digest() + bytes(range(256))


def _plant(d: Path, names) -> None:
    for n in names:
        (d / n).write_bytes(_content(n))


def _tensors(d: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{file: {name: tensor}}`` of every safetensors file in ``d``, read with safetensors."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out[f.name] = {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _kv_shared_layers(ckpt: Path) -> list[int]:
    """The KV-shared layer indices, from config.json: the last ``num_kv_shared_layers`` of the stack."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n, shared = cfg["num_hidden_layers"], cfg["num_kv_shared_layers"]
    assert shared > 0
    return list(range(n - shared, n))


def _sha(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    """The micro Gemma-4 text model (bf16), built once."""
    from bench.factory import build_model

    return build_model("micro", seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def bf16_single(model, root) -> Path:
    return save_bf16_checkpoint(model, root / "single", step=lineage_step("base", model="micro"))


@pytest.fixture(scope="module")
def bf16_sharded(model, root) -> Path:
    return save_bf16_checkpoint(model, root / "sharded", step=lineage_step("base", model="micro"),
                                max_shard_size="1MB")


@pytest.fixture(scope="module")
def aux_src(bf16_sharded, root) -> Path:
    """The sharded bf16 checkpoint plus every kind of aux file and decoys (non-aux files, a folder whose name
    matches an aux pattern, an aux-named file inside it). Its generation_config.json is replaced by distinct bytes,
    so that a copy of it is told apart from one that save_pretrained writes."""
    d = root / "aux_src"
    shutil.copytree(bf16_sharded, d)
    _plant(d, AUX_NAMES)
    # (not a model.safetensors: beside the index it would be the weights, as from_pretrained reads a folder)
    _plant(d, [n for n in NOT_AUX if not (d / n).exists() and n != SINGLE_NAME])
    (d / "tokenizer_extra").mkdir()
    _plant(d / "tokenizer_extra", ["vocab.txt"])
    return d


@pytest.fixture(scope="module")
def q_aux(aux_src, root) -> Path:
    """``python -m pack.quantize`` of :func:`aux_src` (default shard size: one file)."""
    out = root / "q_aux"
    assert quantize_main([str(aux_src), "-o", str(out), "--no-progress", "--no-fsync", "--no-plan-cache",
                          "--no-hash-cache"]) == 0
    return out


@pytest.fixture(scope="module")
def q_single(bf16_single, root) -> Path:
    out = root / "q_single"
    quantize_checkpoint(bf16_single, out, **Q_OPTS)
    return out


@pytest.fixture(scope="module")
def groups(bf16_single, q_single) -> list[tuple[str, dict[str, int]]]:
    """The quantized output's tensors as the writer's groups, in save order: ``[(group, {tensor: bytes})]``.

    Independent of the writer: the order is the state_dict order of the transformers model built from the
    input's config.json (tied aliases left out, as save_pretrained does); a Linear whose ``weight_packed`` is in
    the output stands for its three tensors; bytes are read from the one-file output."""
    from transformers import AutoConfig, Gemma4ForCausalLM

    with torch.device("meta"):
        m = Gemma4ForCausalLM(AutoConfig.from_pretrained(bf16_single))
    tied = set(getattr(m, "all_tied_weights_keys", None) or {})
    sizes = {k: _nbytes(t) for k, t in _tensors(q_single)[SINGLE_NAME].items()}
    out = []
    for key in m.state_dict():
        if key in tied:
            continue
        mod = key.removesuffix(".weight")
        if f"{mod}.weight_packed" in sizes:
            out.append((mod, {f"{mod}.{s}": sizes[f"{mod}.{s}"] for s in ("weight_packed", "weight_scale",
                                                                          "weight_shape")}))
        else:
            out.append((key, {key: sizes[key]}))
    assert {t for _, g in out for t in g} == set(sizes)   # the reference covers exactly the output's tensors
    assert sum(len(g) == 3 for _, g in out) >= 30
    return out


# ---------------------------------------------------------------------------------------------- aux files


def test_copy_aux_files_table(tmp_path):
    """copy_aux_files copies exactly the files matching AUX_FILE_PATTERNS (chat_template.jinja/.json included),
    byte-identical, each once (tokenizer.model matches two patterns), returning their names; it skips non-aux files
    (the input's weights, index, config, lineage, card, notes), folders and what lies in them, and never replaces
    a file already in ``dst`` (save_pretrained's own files, a tokenizer saved from the model's run)."""
    for pattern in AUX_FILE_PATTERNS:   # the table keeps up with the patterns
        assert any(fnmatch.fnmatchcase(n, pattern) for n in AUX_NAMES), pattern
    assert not any(fnmatch.fnmatchcase(n, p) for n in NOT_AUX for p in AUX_FILE_PATTERNS)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _plant(src, AUX_NAMES + NOT_AUX)
    (src / "tokenizer_extra").mkdir()
    _plant(src / "tokenizer_extra", ["vocab.txt"])
    (dst / "special_tokens_map.json").write_bytes(b"mine\n")
    copied = copy_aux_files(src, dst)
    want = sorted(n for n in AUX_NAMES if n != "special_tokens_map.json")
    assert sorted(copied) == want
    assert sorted(p.name for p in dst.iterdir()) == sorted(AUX_NAMES)
    for n in want:
        assert (dst / n).read_bytes() == (src / n).read_bytes(), n
    assert (dst / "special_tokens_map.json").read_bytes() == b"mine\n"
    assert copy_aux_files(None, dst) == []


def test_quantize_carries_aux_files_byte_identical(aux_src, q_aux):
    """pack.quantize's output holds every aux file of its input byte-identical (the chat template too: without it
    a served model has no chat format) and nothing else of the input: not its shards, index, k_norm shard, notes
    or decoys; its own README/config/lineage replace the input's."""
    names = {p.name for p in q_aux.iterdir()}
    assert names == set(AUX_NAMES) | QUANT_OWN | {SINGLE_NAME}
    for n in AUX_NAMES:
        assert _sha(q_aux / n) == _sha(aux_src / n), n
    for n in ("README.md", "config.json", LINEAGE_FILE):
        assert _sha(q_aux / n) != _sha(aux_src / n), n


def test_save_bf16_with_source_dir_carries_aux_files(model, aux_src, bf16_single, tmp_path):
    """save_bf16_checkpoint(source_dir=...) (prune, distill) copies the source's aux files byte-identical, chat
    template included, and none of its weights, index or other files; generation_config.json is the one
    save_pretrained wrote for the model (identical to a save without a source), not replaced by the source's."""
    out = save_bf16_checkpoint(model, tmp_path / "o", source_dir=aux_src, step=lineage_step("prune"))
    names = {p.name for p in out.iterdir()}
    assert names == set(AUX_NAMES) | {"config.json", SINGLE_NAME, LINEAGE_FILE}
    for n in AUX_NAMES:
        if n != "generation_config.json":
            assert _sha(out / n) == _sha(aux_src / n), n
    assert _sha(out / "generation_config.json") == _sha(bf16_single / "generation_config.json")
    assert _sha(out / "generation_config.json") != _sha(aux_src / "generation_config.json")
    assert _sha(out / SINGLE_NAME) == _sha(bf16_single / SINGLE_NAME)


# ---------------------------------------------------------------------------------------------- bf16 writer


def test_sharded_bf16_indexes_knorm_shard_and_total_size(bf16_sharded):
    """Sharded save_bf16_checkpoint: the KV-shared layers' k_norm tensors (ones, their layer's head dim) are in
    KNORM_SHARD and the index maps them there; the index maps every tensor of every file to that file and nothing
    else; metadata.total_size is the bytes of all tensors of all files, the k_norm shard included."""
    files = _tensors(bf16_sharded)
    index = json.loads((bf16_sharded / INDEX_NAME).read_text())
    shards = [f for f in files if f != KNORM_SHARD]
    assert len(shards) > 2 and KNORM_SHARD in files
    assert all(SHARD_RE.fullmatch(f) for f in shards), shards
    assert index["weight_map"] == {k: f for f, ts in files.items() for k in ts}
    shared = _kv_shared_layers(bf16_sharded)
    want = {f"model.layers.{i}.self_attn.k_norm.weight" for i in shared}
    assert set(files[KNORM_SHARD]) == want
    assert {k for k, f in index["weight_map"].items() if f == KNORM_SHARD} == want
    q_norm = {k: t for ts in files.values() for k, t in ts.items() if k.endswith("self_attn.q_norm.weight")}
    for k in want:
        t = files[KNORM_SHARD][k]
        assert t.dtype == torch.bfloat16 and torch.equal(t, torch.ones_like(t)), k
        assert t.shape == q_norm[k.replace("k_norm", "q_norm")].shape, k
    assert len({t.shape for t in files[KNORM_SHARD].values()}) == 2   # a sliding and a full layer: both head dims
    assert index["metadata"]["total_size"] == sum(_nbytes(t) for ts in files.values() for t in ts.values())


def test_single_bf16_holds_knorm_and_no_index(bf16_single, bf16_sharded):
    """One-file save_bf16_checkpoint: no index, one model.safetensors holding the KV-shared k_norm tensors; its
    tensors are exactly the sharded save's, with equal values."""
    assert sorted(p.name for p in bf16_single.glob("*.safetensors*")) == [SINGLE_NAME]
    single = _tensors(bf16_single)[SINGLE_NAME]
    for i in _kv_shared_layers(bf16_single):
        t = single[f"model.layers.{i}.self_attn.k_norm.weight"]
        q_norm = single[f"model.layers.{i}.self_attn.q_norm.weight"]
        assert torch.equal(t, torch.ones_like(t)) and t.shape == q_norm.shape
    sharded = {k: t for ts in _tensors(bf16_sharded).values() for k, t in ts.items()}
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_sharded_bf16_loads_in_transformers(model, bf16_sharded):
    """transformers' from_pretrained loads the sharded output (index + shards + k_norm shard) with no missing or
    mismatched keys, only the extra k_norm tensors unexpected, and the weights of the model saved."""
    from transformers import Gemma4ForCausalLM

    loaded, info = Gemma4ForCausalLM.from_pretrained(bf16_sharded, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert set(info["unexpected_keys"]) <= {f"model.layers.{i}.self_attn.k_norm.weight"
                                            for i in _kv_shared_layers(bf16_sharded)}, info
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


# ---------------------------------------------------------------------------------------------- quantize sharding


def _hf_split(groups, limit) -> dict[str, set[str]]:
    """huggingface_hub's greedy split (what transformers' save_pretrained uses) of the groups as units, expanded
    back to tensor names."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    sizes = {name: sum(g.values()) for name, g in groups}
    split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n, max_shard_size=limit,
                                                 filename_pattern="model{suffix}.safetensors")
    members = dict(groups)
    return {f: {t for name in names for t in members[name]} for f, names in split.filename_to_tensors.items()}


def _check_sharded(out: Path, limit: int, groups) -> dict[str, set[str]]:
    """The invariants of any sharded pack.quantize output; returns its split."""
    group_of = {t: name for name, g in groups for t in g}
    files = _tensors(out)
    names = sorted(files)
    n = len(names)
    assert n > 1 and not (out / SINGLE_NAME).exists()
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], names
    assert all(SHARD_RE.fullmatch(f) for f in names)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == {k: f for f, ts in files.items() for k in ts}
    tensors = [t for ts in files.values() for t in ts.values()]
    assert index["metadata"]["total_size"] == sum(_nbytes(t) for t in tensors)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors)
    for f, ts in files.items():   # at most the limit, unless one tensor group alone exceeds it
        size = sum(_nbytes(t) for t in ts.values())
        assert size <= limit or len({group_of[k] for k in ts}) == 1, (f, size, limit)
    return {f: set(ts) for f, ts in files.items()}


def test_quantize_one_file_has_no_index(q_single, groups):
    """Under the default limit (20 GB) pack.quantize writes model.safetensors alone, with no index."""
    assert sorted(p.name for p in q_single.glob("*.safetensors*")) == [SINGLE_NAME]
    assert sum(sum(g.values()) for _, g in groups) < parse_size("20GB")


@pytest.mark.parametrize("limit", ["2MB", "exact", "exact-1"])
def test_quantize_shards_like_huggingface_hub(bf16_single, q_single, groups, tmp_path, limit):
    """pack.quantize's split (writer._shard: "transformers' split_torch_state_dict_into_shards rule") equals
    huggingface_hub's greedy split of the same groups in save order when no group exceeds the limit: same file
    names, same tensors per file; a quantized Linear's three tensors never split. ``exact``: the limit is the
    bytes of the first groups that reach the largest group's size, so the first shard is filled exactly to the
    limit (a shard of exactly max_shard_size is allowed); ``exact-1``: one byte less, the last of them moves on."""
    sizes = [sum(g.values()) for _, g in groups]
    if limit.startswith("exact"):
        k = next(i for i in range(1, len(sizes) + 1) if sum(sizes[:i]) >= max(sizes))
        assert k >= 2
        n = sum(sizes[:k]) - (limit == "exact-1")
    else:
        n = limit
    assert max(sizes) <= parse_size(n)   # the regime where pdqkit and huggingface_hub agree
    out = tmp_path / "q"
    quantize_checkpoint(bf16_single, out, max_shard_size=n, **Q_OPTS)
    got = _check_sharded(out, parse_size(n), groups)
    assert got == _hf_split(groups, n)
    if limit.startswith("exact"):   # the first shard: the first k groups exactly filling it, or k - 1 of them
        first = groups[:k] if limit == "exact" else groups[:k - 1]
        assert got[min(got)] == {t for _, g in first for t in g}
        assert (sum(sizes[:k]) == parse_size(n)) is (limit == "exact")
    # same tensors and bytes as the one-file output
    single = _tensors(q_single)[SINGLE_NAME]
    sharded = {k: t for ts in _tensors(out).values() for k, t in ts.items()}
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


def test_quantize_oversized_group_gets_a_shard_of_its_own(bf16_single, groups, tmp_path):
    """A group larger than the limit (under "1MB" = 10**6 bytes: embed_tokens, 2**20 bytes, and the per-layer
    embedding) is written alone; every other shard stays within the limit, the files follow the save order
    ("fill shards in order": groups are never reordered), and every group is whole."""
    limit = "1MB"
    sizes = {name: sum(g.values()) for name, g in groups}
    big = [name for name, s in sizes.items() if s > parse_size(limit)]
    assert big
    out = tmp_path / "q"
    quantize_checkpoint(bf16_single, out, max_shard_size=limit, **Q_OPTS)
    got = _check_sharded(out, parse_size(limit), groups)
    where = {t: f for f, ts in got.items() for t in ts}
    members = dict(groups)
    for name in big:
        assert got[where[next(iter(members[name]))]] == set(members[name]), name
    order = [where[next(iter(g))] for _, g in groups]
    assert order == sorted(order)   # in save order: shard numbers never go back
    for _, g in groups:
        assert len({where[t] for t in g}) == 1


@pytest.mark.parametrize("size", ["1KB", "2MB", "20GB", "5GB", "1.5MB", " 3MB ", "10KiB", "1MiB", "500MiB", "2GiB",
                                  4096])
def test_max_shard_size_units_as_transformers(size):
    """--max-shard-size units are transformers' (and huggingface_hub's): KB/MB/GB decimal, KiB/MiB/GiB binary, an
    int in bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(size, str) and "." in size:   # transformers parses ints only; huggingface_hub floats
        from huggingface_hub.serialization._base import parse_size_to_int

        assert parse_size(size) == parse_size_to_int(size)
        return
    ref = size.strip() if isinstance(size, str) else size   # (transformers does not strip blanks)
    assert parse_size(size) == convert_file_size_to_int(ref)


# ---------------------------------------------------------------------------------------------- lineage


def test_lineage_ids_stay_unique_when_a_stage_repeats(tmp_path):
    """write_lineage numbers a repeated id (spec §6 ids are unique): ``distill``, ``distill2``, ``distill3``
    (the first free number from 2); each step's ``from`` is the previous step's final id unless given; an explicit
    id is numbered the same way."""
    steps = []
    for kind in ("base", "prune", "distill", "distill", "distill"):
        steps = write_lineage(tmp_path, steps, lineage_step(kind, seed=len(steps)))
    assert [s["id"] for s in steps] == ["base", "prune", "distill", "distill2", "distill3"]
    assert [s.get("from") for s in steps] == [None, "base", "prune", "distill", "distill2"]
    assert [s["kind"] for s in steps] == ["base", "prune", "distill", "distill", "distill"]
    assert [s["seed"] for s in steps] == list(range(5))
    assert read_lineage(tmp_path) == steps
    steps = write_lineage(tmp_path, steps, lineage_step("merge", id="distill", **{"from": "prune"}))
    assert steps[-1]["id"] == "distill4" and steps[-1]["from"] == "prune"
    gap = write_lineage(tmp_path, [lineage_step("distill"), lineage_step("distill", id="distill3")],
                        lineage_step("distill"))
    assert [s["id"] for s in gap] == ["distill", "distill3", "distill2"]
    for _ in range(2):
        gap = write_lineage(tmp_path, gap, lineage_step("finetune", id="phase"))
    assert [s["id"] for s in gap][-2:] == ["phase", "phase2"]
    assert len({s["id"] for s in gap}) == len(gap)


def test_lineage_through_prune_distill_distill_distill_and_quantize(model, bf16_single, tmp_path):
    """Checkpoints saved in a chain (prune -> distill -> distill -> distill, each with source_dir the previous)
    and then quantized carry one lineage with unique ids and ``from`` links; quant_recipe.json and the card hold
    the same list."""
    prev = bf16_single
    for i, kind in enumerate(("prune", "distill", "distill", "distill")):
        prev = save_bf16_checkpoint(model, tmp_path / f"s{i}", source_dir=prev, step=lineage_step(kind))
    steps = read_lineage(prev)
    assert [s["id"] for s in steps] == ["base", "prune", "distill", "distill2", "distill3"]
    assert [s.get("from") for s in steps] == [None, "base", "prune", "distill", "distill2"]
    out = tmp_path / "q"
    quantize_checkpoint(prev, out, **Q_OPTS)
    recipe = json.loads((out / RECIPE_FILE).read_text())["source_lineage"]
    assert [s["id"] for s in recipe] == ["base", "prune", "distill", "distill2", "distill3", "quant"]
    assert recipe[-1]["from"] == "distill3" and recipe[:-1] == steps
    assert read_lineage(out) == recipe
    assert "- `distill3`: **distill** (from `distill2`)" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- model card


def _card_table(out: Path) -> dict[str, str]:
    text = (out / "README.md").read_text()
    body = text.split("## Files", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", body, flags=re.M)
    assert len(rows) == sum(line.startswith("| `") for line in body.splitlines()), body
    return dict(rows)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_card_sha256_table_matches_the_files(bf16_single, q_single, tmp_path, sharded):
    """The model card's Files table lists every safetensors file written, each with the sha256 of its bytes
    (hashlib over the file); quant_recipe.json's output_sha256 says the same."""
    out = q_single
    if sharded:
        out = tmp_path / "q"
        quantize_checkpoint(bf16_single, out, max_shard_size="2MB", **Q_OPTS)
    want = {f.name: _sha(f) for f in sorted(out.glob("*.safetensors"))}
    assert len(want) > 1 if sharded else list(want) == [SINGLE_NAME]
    assert _card_table(out) == want
    assert json.loads((out / RECIPE_FILE).read_text())["source_lineage"][-1]["output_sha256"] == want
