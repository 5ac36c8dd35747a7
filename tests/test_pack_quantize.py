"""End to end: ``python -m pack.quantize`` on a tiny random multimodal Gemma-4 (text + vision + audio, PLE,
KV-shared layers), then the real loaders: HF transformers loads it with nothing missing and computes the same
logits as the bf16 model holding our own dequantized weights; outputs are byte-identical across runs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from pack.packing import dequantize, unpack_int4
from pack.qconfig import DEFAULT_IGNORE, QuantRecipe
from pack.quantize import main
from pack.writer import quantize_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from bench.factory import save_random_checkpoint

    d = save_random_checkpoint("micro", tmp_path_factory.mktemp("base") / "mm-micro", multimodal=True, seed=0)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')  # an aux file to carry over
    return d


@pytest.fixture(scope="module")
def out_eager(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "eager"
    quantize_checkpoint(base, out, QuantRecipe(rounding="eager"))
    return out


@pytest.fixture(scope="module")
def out_fp32div(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "fp32div"
    assert main([str(base), "-o", str(out), "--no-progress"]) == 0
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_layout(base, out_fp32div):
    cfg = json.loads((out_fp32div / "config.json").read_text())
    q = cfg.pop("quantization_config")
    assert cfg == json.loads((base / "config.json").read_text())  # input config + quantization_config only
    assert q["format"] == "pack-quantized" and q["quantization_status"] == "compressed" and q["version"] == "0.19.0"
    assert q["config_groups"]["group_0"]["weights"]["group_size"] == 128
    tensors = _tensors(out_fp32div)
    packed = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    # micro: 6 text layers, last 2 KV-shared (q/o only): 4*7 + 2*5 + per_layer_model_projection = 39
    assert len(packed) == 39
    assert "model.language_model.per_layer_model_projection" in packed
    assert not any(k.endswith("weight_zero_point") or k.endswith("weight_g_idx") for k in tensors)
    for m in packed:
        n, k = tensors[f"{m}.weight_shape"].tolist()
        assert tensors[f"{m}.weight_packed"].dtype == torch.int32 and tensors[f"{m}.weight_packed"].shape == (n, k // 8)
        assert tensors[f"{m}.weight_scale"].dtype == torch.bfloat16 and tensors[f"{m}.weight_scale"].shape == (n, k // 128)
        assert f"{m}.weight" not in tensors
    assert not any(".layers.4.self_attn.k" in k or ".layers.5.self_attn.v_proj" in k for k in tensors)  # KV-shared
    assert "lm_head.weight" not in tensors  # tied
    assert {str(t.dtype) for t in tensors.values()} == {"torch.int64", "torch.int32", "torch.bfloat16"}
    # every ignored Linear keeps its bf16 weight, listed in the expanded ignore list, named_modules order
    assert q["ignore"][0] == "model.vision_tower.patch_embedder.input_proj" and q["ignore"][-1] == "lm_head"
    for name in q["ignore"][:-1]:
        assert tensors[f"{name}.weight"].dtype == torch.bfloat16
    # aux files and lineage
    assert (out_fp32div / "tokenizer_config.json").read_text() == '{"model_max_length": 4096}\n'
    assert (out_fp32div / "generation_config.json").is_file()
    recipe = json.loads((out_fp32div / "quant_recipe.json").read_text())
    steps = recipe["source_lineage"]
    assert [s["kind"] for s in steps] == ["base", "quant"] and steps[1]["from"] == "base"
    assert steps[1]["rounding_mode"] == "fp32div" and list(steps[1]["ignore"]) == list(DEFAULT_IGNORE)
    assert set(steps[1]["output_sha256"]) == {"model.safetensors"} and set(steps[1]["input_sha256"]) == {"model.safetensors"}
    import hashlib
    assert steps[1]["output_sha256"]["model.safetensors"] == hashlib.sha256(
        (out_fp32div / "model.safetensors").read_bytes()).hexdigest()
    assert steps[1]["input_sha256"]["model.safetensors"] == hashlib.sha256(
        (base / "model.safetensors").read_bytes()).hexdigest()


def test_passthrough_unchanged(base, out_eager):
    src, out = _tensors(base), _tensors(out_eager)
    kept = [k for k in out if not k.rsplit(".", 1)[-1].startswith("weight_")]
    assert len(kept) == 148
    for k in kept:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
    # dropped: what transformers does not load either: the KV-shared layers' k_norm (pdqkit's bf16 writer adds
    # them for vLLM) and, if the input stored it, the tied lm_head
    dropped = set(src) - set(out) - {k.replace("_packed", "") for k in out if k.endswith("_packed")}
    k_norms = {"model.language_model.layers.4.self_attn.k_norm.weight",
               "model.language_model.layers.5.self_attn.k_norm.weight"}
    assert k_norms <= dropped <= k_norms | {"lm_head.weight"}


def test_rounding_modes_differ_only_in_codes(out_eager, out_fp32div):
    a, b = _tensors(out_eager), _tensors(out_fp32div)
    assert a.keys() == b.keys()
    diff = 0
    for k in a:
        if k.endswith("weight_packed"):
            n, kk = a[k.replace("packed", "shape")].tolist()
            ca, cb = unpack_int4(a[k], kk), unpack_int4(b[k], kk)
            assert int((ca.int() - cb.int()).abs().max()) <= 1
            diff += int((ca != cb).sum())
        else:
            assert torch.equal(a[k], b[k]), k
    assert diff > 0


@pytest.mark.parametrize("mode", ["eager", "fp32div"])
def test_every_packed_linear_holds_the_observers_codes(base, out_eager, out_fp32div, mode):
    """End to end, both rounding modes: each written Linear's codes and scales are the observer's on that input
    weight (pack.observer.quantize_weight, checked against a group-by-group spec reference in test_observer.py), so
    a misplaced row block, a wrong tensor or a wrong mode in the streaming writer cannot pass."""
    from pack.observer import QuantScheme, quantize_weight

    src, out = _tensors(base), _tensors(out_eager if mode == "eager" else out_fp32div)
    packed = sorted(k for k in out if k.endswith(".weight_packed"))
    assert len(packed) == 39
    for key in packed:
        m = key.removesuffix(".weight_packed")
        n, k = out[f"{m}.weight_shape"].tolist()
        codes, scale = quantize_weight(src[f"{m}.weight"], QuantScheme(rounding=mode))
        assert torch.equal(unpack_int4(out[key], k), codes.to(unpack_int4(out[key], k).dtype)), m
        assert torch.equal(out[f"{m}.weight_scale"], scale), m


def test_row_blocks_of_eight_rows_write_the_same_bytes(base, out_eager, tmp_path, monkeypatch):
    """On CPU each Linear is quantized in row blocks (pack.pipeline.row_blocks, ~4 MB each: one block per Linear of
    this tiny model). With 8-row blocks every Linear spans many: each block's codes and scales must land at its own
    rows, so the files equal the one-block run's byte for byte (which the test above checks against the observer)."""
    import pack.pipeline

    monkeypatch.setattr(pack.pipeline, "BLOCK_BYTES", 1)  # the minimum: 8 rows per block
    assert len(pack.pipeline.row_blocks(64, 256, "cpu")) == 8
    small = tmp_path / "small-blocks"
    quantize_checkpoint(base, small, QuantRecipe(rounding="eager"), plan_cache=False)
    assert _files(small) == _files(out_eager)


def test_deterministic(base, out_eager, tmp_path):
    again = tmp_path / "again"
    quantize_checkpoint(base, again, QuantRecipe(rounding="eager"))
    assert _files(again) == _files(out_eager)


def test_hf_loads_with_our_weights(base, out_eager):
    from transformers import Gemma4ForConditionalGeneration

    qmodel, info = Gemma4ForConditionalGeneration.from_pretrained(out_eager, dtype=torch.bfloat16,
                                                                  output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    q_proj = qmodel.model.language_model.layers[0].self_attn.q_proj
    assert {n for n, _ in q_proj.named_parameters()} == {"weight_packed", "weight_scale", "weight_shape"}

    ref = Gemma4ForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    tensors = _tensors(out_eager)
    for k in [k for k in tensors if k.endswith(".weight_packed")]:
        m = k[: -len(".weight_packed")]
        w = dequantize(tensors[k], tensors[f"{m}.weight_scale"], tensors[f"{m}.weight_shape"])
        ref.get_submodule(m).weight.data.copy_(w)
    assert_same_model(qmodel, ref)


def assert_same_model(qmodel, ref):
    """``qmodel`` (loaded from a packed checkpoint) gives the logits of ``ref`` (bf16, holding the dequantized
    weights) bit for bit and, after the decompress-on-first-forward hook, holds every tensor of it: nothing
    random-initialised."""
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lq, lr = qmodel(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(lq, lr)
    sq, sr = qmodel.state_dict(), ref.state_dict()
    for k, v in sr.items():
        assert torch.equal(sq[k], v), k


def test_sharded_output(base, out_eager, tmp_path):
    out = tmp_path / "sharded"
    quantize_checkpoint(base, out, QuantRecipe(rounding="eager"), max_shard_size="2MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    single, sharded = _tensors(out_eager), _tensors(out)
    assert single.keys() == sharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for k, f in index["weight_map"].items():  # a quantized module's three tensors share a shard
        if k.endswith("weight_packed"):
            assert index["weight_map"][k.replace("packed", "scale")] == f == index["weight_map"][k.replace("packed", "shape")]


def test_vllm_config_and_card(out_fp32div):
    from transformers import AutoConfig

    cfg = yaml.safe_load((out_fp32div / "vllm_config.yaml").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["language-model-only"] is True and cfg["max-model-len"] == 4096
    fix = cfg["hf-overrides"]
    assert fix == {"text_config": {"allow_global_per_layer_attribute_access": True, "global_head_dim": 256}}
    hf = AutoConfig.from_pretrained(out_fp32div)
    with pytest.raises(Exception, match="per-layer attribute"):
        _ = hf.text_config.head_dim
    for k, v in fix["text_config"].items():  # what vLLM 0.26.0's _apply_dict_overrides does for a sub-config
        setattr(hf.text_config, k, v)
    assert hf.text_config.head_dim == 128 and hf.text_config.global_head_dim == 256
    card = (out_fp32div / "README.md").read_text()
    for needle in ("Gemma4ForConditionalGeneration.from_pretrained", "vllm serve PATH --config PATH/vllm_config.yaml",
                   "PDQKIT_VLLM_KERNEL=fast", "PDQKIT_VLLM_KERNEL=exact", "`base`", "`quant`", "39 Linear layers"):
        assert needle in card, needle


def test_demo_and_help(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--demo", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("pdqkit quantize: 39 Linears quantized (117 tensors), 148 tensors kept") and "GB/s" in line
    assert "peak RSS" in line
    assert (tmp_path / "out" / "demo-micro-mm-w4a16" / "config.json").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert exc.value.code == 0 and "--rounding" in help_text and "--group-size" in help_text


def test_llmcompressor_never_imported():
    """pdqkit must not depend on llmcompressor at run time: not importable in its venv, never imported."""
    assert importlib.util.find_spec("llmcompressor") is None
    for mod in list(sys.modules):
        assert not mod.startswith("llmcompressor"), mod
    for f in (REPO / "pack").glob("*.py"):
        assert "import llmcompressor" not in f.read_text() and "from llmcompressor" not in f.read_text(), f


@pytest.mark.gpu
def test_cuda_device_same_bytes(base, out_fp32div, tmp_path):
    out = tmp_path / "cuda"
    quantize_checkpoint(base, out, QuantRecipe(), device="cuda")
    assert _files(out) == _files(out_fp32div)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names synced descriptors through /proc/self/fd")
@pytest.mark.parametrize("shards", ["one file", "sharded"])
def test_output_is_synced_before_the_rename(base, out_fp32div, tmp_path, monkeypatch, shards):
    """Durable output: every file of the output (each shard, the metadata, the aux files) is fdatasync'ed and the
    temp dir fsynced before it is renamed into place, the parent dir after; the shards' writeback was started
    while they were written. --no-fsync syncs nothing and writes the same bytes."""
    import os

    import pack.stio

    events: list[tuple[str, str]] = []
    started: list[tuple[str, int, int]] = []

    def spy(kind, real):
        def call(fd):
            events.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
            return real(fd)
        return call

    real_replace, real_rename, real_start = os.replace, os.rename, pack.stio.start_writeback

    def replace(src, dst, **kw):
        events.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst, **kw)

    def rename(src, dst, **kw):   # the commit without --force (never replaces an output another run wrote)
        events.append(("replace", f"{src} -> {dst}"))
        return real_rename(src, dst, **kw)

    def start(fd, off, n):
        started.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))
        return real_start(fd, off, n)

    monkeypatch.setattr(os, "fsync", spy("fsync", os.fsync))
    monkeypatch.setattr(os, "fdatasync", spy("fdatasync", os.fdatasync))
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(pack.stio, "start_writeback", start)
    extra = ["--max-shard-size", "2MB"] if shards == "sharded" else []
    out = tmp_path / "synced"
    assert main([str(base), "-o", str(out), "--no-progress", "--no-plan-cache", *extra]) == 0
    (rename,) = [i for i, (k, what) in enumerate(events) if k == "replace" and what.endswith(f" -> {out}")]
    tmp = events[rename][1].split(" -> ")[0]
    names = sorted(p.name for p in out.iterdir())
    assert (len([n for n in names if n.endswith(".safetensors")]) > 1) is (shards == "sharded")
    before, after = events[:rename], events[rename + 1:]
    assert {f"{tmp}/{n}" for n in names} <= {p for k, p in before if k == "fdatasync"}  # every file's data
    assert ("fsync", tmp) in before  # its directory entries
    assert ("fsync", str(tmp_path)) in after  # the rename
    for n in names:
        if n.endswith(".safetensors"):  # writeback started on the way: the whole file, in order, no gap
            ranges = [(o, k) for p, o, k in started if p == f"{tmp}/{n}"]
            assert len(ranges) >= 1 and ranges[0][0] == 0
            assert all(a + m == b for (a, m), (b, _) in zip(ranges, ranges[1:]))
            assert ranges[-1][0] + ranges[-1][1] == (out / n).stat().st_size
    # --no-fsync: nothing synced, no writeback started, the same bytes
    events.clear()
    started.clear()
    unsynced = tmp_path / "unsynced"
    assert main([str(base), "-o", str(unsynced), "--no-progress", "--no-plan-cache", "--no-fsync", *extra]) == 0
    assert not [e for e in events if e[0] != "replace"] and not started
    assert _files(unsynced) == _files(out)
    if shards == "one file":
        assert _files(out) == _files(out_fp32div)  # the same bytes as a run with the default options
