"""bench.factory: every scale's config builds in transformers with the E4B topology; save/load round trip."""
from __future__ import annotations

import json

import pytest
import torch

from bench.factory import (SCALES, build_model, model_config, num_params, save_random_checkpoint,
                           save_random_checkpoint_streamed, text_config)


def _head_dims(tc) -> dict:
    """{layer type: head dim} (transformers 5.17 keeps head_dim per layer: ``per_layer_config``)."""
    return {t: tc.per_layer_config[i].head_dim for i, t in enumerate(tc.layer_types)}


def _check_topology(tc):
    """What makes a config E4B-shaped (bench/factory.py docstring)."""
    n = tc.num_hidden_layers
    assert tc.layer_types[-1] == "full_attention"  # the shared tail covers both attention kinds
    assert "sliding_attention" in tc.layer_types and "full_attention" in tc.layer_types
    assert 0 < tc.num_kv_shared_layers < n
    assert "full_attention" in tc.layer_types[: n - tc.num_kv_shared_layers]  # a full layer to share from
    dims = _head_dims(tc)
    assert dims["full_attention"] == 2 * dims["sliding_attention"]
    assert tc.hidden_size_per_layer_input > 0 and tc.vocab_size_per_layer_input == tc.vocab_size
    assert tc.final_logit_softcapping == 30.0 and tc.tie_word_embeddings
    assert tc.hidden_size % 128 == 0 and tc.intermediate_size % 640 == 0  # 20% prune -> multiple of 128
    assert (tc.pad_token_id, tc.eos_token_id, tc.bos_token_id) == (0, 1, 2)  # bench tokenizer agrees


@pytest.mark.parametrize("scale", SCALES)
def test_configs_have_e4b_topology(scale):
    _check_topology(text_config(scale))


def test_e4b_matches_published_text_dims_on_meta_device():
    tc = text_config("e4b")
    assert (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads,
            tc.num_kv_shared_layers, tc.vocab_size) == (2560, 10240, 42, 8, 18, 262144)
    assert _head_dims(tc) == {"sliding_attention": 256, "full_attention": 512}
    assert {tc.per_layer_config[i].num_key_value_heads for i in range(42)} == {2}
    model = build_model("e4b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    mlp = model.model.layers[0].mlp
    assert (mlp.gate_proj.weight.shape, mlp.down_proj.weight.shape) == ((10240, 2560), (2560, 10240))
    assert model.model.layers[5].self_attn.q_proj.weight.shape == (8 * 512, 2560)  # full layer: global head dim
    assert 4e9 < num_params(model) < 9e9


def test_e4b_multimodal_on_meta_device():
    cfg = model_config("e4b", multimodal=True)
    assert cfg.vision_config is not None and cfg.audio_config is not None
    model = build_model("e4b", multimodal=True, device="meta")
    names = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("model.")}
    assert {"language_model", "vision_tower", "audio_tower", "embed_vision", "embed_audio"} <= names


def test_small_is_a_50_to_150m_model():
    model = build_model("small", dtype=torch.float32)
    assert 50e6 <= num_params(model) <= 150e6
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.isfinite(model(input_ids=x).logits).all()


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "mm"])
def test_micro_save_load_round_trip(tmp_path, multimodal):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    out = save_random_checkpoint("micro", tmp_path / "ckpt", multimodal=multimodal, seed=3)
    lineage = json.loads((out / "pdqkit_lineage.json").read_text())["source_lineage"]
    assert lineage[0]["kind"] == "base" and lineage[0]["seed"] == 3
    ref = build_model("micro", multimodal=multimodal, seed=3)
    cls = Gemma4ForConditionalGeneration if multimodal else Gemma4ForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)) is cls
    loaded = cls.from_pretrained(out, dtype=torch.bfloat16).eval()
    skip = {"dtype", "architectures", "transformers_version", "_name_or_path"}

    def fields(c):
        return {k: v for k, v in c.get_text_config().to_dict().items() if k not in skip}

    assert fields(AutoConfig.from_pretrained(out)) == fields(model_config("micro", multimodal))
    sd, ref_sd = loaded.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    # the buffers the state dict leaves out (RoPE inv_freq, the audio tower's inv_timescales) too: computed in fp32
    # by from_pretrained and by build_model alike, then stored in their own dtype
    bufs, ref_bufs = dict(loaded.named_buffers()), dict(ref.named_buffers())
    assert bufs.keys() == ref_bufs.keys()
    for k in bufs:
        assert bufs[k].dtype == ref_bufs[k].dtype and torch.equal(bufs[k], ref_bufs[k]), k
    on_disk = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in on_disk.values() if v.is_floating_point())
    x = torch.randint(0, 2048, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, ref(input_ids=x).logits)


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = (build_model("micro", seed=s).state_dict() for s in (0, 0, 1))
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])


def _entries(d):
    """{tensor: pack.stio.TensorEntry} over every safetensors file of checkpoint ``d`` (headers only)."""
    from pack.stio import read_header

    return {k: e for f in sorted(d.glob("*.safetensors")) for k, e in read_header(f).items()}


def _layout(d):
    """{tensor: (shape, dtype)} of checkpoint ``d``."""
    return {k: (tuple(e.shape), e.dtype) for k, e in _entries(d).items()}


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "mm"])
def test_streamed_checkpoint_has_save_pretrained_layout(tmp_path, multimodal):
    """The streamed stand-in (meta model, one shard in memory) must look like what save_pretrained writes: same
    tensor names (tied lm_head once, the KV-shared k_norm added), shapes, dtypes, the same config.json, and
    pack.quantize must quantize exactly the same Linears in it; sharded, its index must list every tensor; the
    same seed writes the same bytes."""
    from pack.checkpoint import INDEX_NAME, KNORM_SHARD
    from pack.quantize import main as quantize

    ref = save_random_checkpoint("micro", tmp_path / "ref", multimodal=multimodal)
    one = save_random_checkpoint_streamed("micro", tmp_path / "one", multimodal=multimodal, seed=5)
    assert _layout(one) == _layout(ref)
    for f in ("config.json", "generation_config.json"):
        assert json.loads((one / f).read_text()) == json.loads((ref / f).read_text())

    small = 256 << 10  # several shards: the index must name every tensor once, with the right total
    a = save_random_checkpoint_streamed("micro", tmp_path / "a", multimodal=multimodal, seed=5, shard_bytes=small)
    b = save_random_checkpoint_streamed("micro", tmp_path / "b", multimodal=multimodal, seed=5, shard_bytes=small)
    index = json.loads((a / INDEX_NAME).read_text())
    files = sorted(f.name for f in a.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    knorm = [k for k, f in index["weight_map"].items() if f == KNORM_SHARD]
    assert len(knorm) == 2 and all(k.endswith("self_attn.k_norm.weight") for k in knorm)  # micro: 2 KV-shared
    assert _layout(a) == _layout(ref) and set(index["weight_map"]) == set(_layout(ref))
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in _entries(a).values())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    for d in (ref, a):
        assert quantize([str(d), "-o", str(d) + "-q", "--no-progress"]) == 0
    qa, qr = (json.loads((tmp_path / f"{n}-q" / "config.json").read_text())["quantization_config"]
              for n in ("a", "ref"))
    assert qa["ignore"] == qr["ignore"]
    packed = {k for k in _layout(tmp_path / "a-q") if k.endswith(".weight_packed")}
    assert packed and packed == {k for k in _layout(tmp_path / "ref-q") if k.endswith(".weight_packed")}
