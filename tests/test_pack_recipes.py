"""``python -m pack.quantize`` with NON-DEFAULT recipes, end to end on a tiny random TEXT-ONLY Gemma-4
(``Gemma4ForCausalLM``: PLE, KV-shared layers, 128/256 head dims): ``--rounding eager`` with ``--extra-ignore``,
and channelwise ``--group-size -1`` in both rounding modes.

Protected: what the lineage records is the recipe config.json carries (config_groups, ignore) and the one the
model card states; ignored Linears stay bf16, every other one is packed; channelwise output is what
compressed-tensors means by channelwise (``strategy: channel``, one bf16 scale per output row) and holds the
codes/scales of the spec's observer (the group-by-group reference of tests/test_observer.py), and HF transformers
loads it into the same logits as a bf16 model holding those dequantized weights; a text-only checkpoint's
vllm_config.yaml and card carry the Gemma-4 head-dim override at the top level (no ``text_config`` nesting).
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from pack.packing import unpack_int4
from pack.qconfig import DEFAULT_IGNORE
from pack.quantize import main
from tests.test_observer import ref_quantize  # the spec's observer, group by group (independent of pack.observer)
from tests.test_pack_quantize import _tensors, assert_same_model

# one exact module name and one regex (Python re.match on the module name); neither is in a fused q/k/v or
# gate/up set, so vLLM could still load the result
EXTRA_IGNORE = ("model.layers.1.self_attn.o_proj", r"re:.*layers\.2\.mlp\.down_proj")
ROWS_PER_LINEAR = 4  # rows checked against the (slow, per-element) reference in each packed Linear


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from bench.factory import save_random_checkpoint

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("base") / "text-micro", multimodal=False, seed=3)


def _quantize(base: Path, out: Path, *opts: str) -> Path:
    # no plan/hash cache: every run plans afresh (a cached plan would hide a change to the recipe code)
    assert main([str(base), "-o", str(out), "--no-progress", "--no-plan-cache", "--no-hash-cache", *opts]) == 0
    return out


@pytest.fixture(scope="module")
def eager_ignored(base, tmp_path_factory) -> Path:
    return _quantize(base, tmp_path_factory.mktemp("q") / "eager-ignored", "--rounding", "eager",
                     "--extra-ignore", *EXTRA_IGNORE)


@pytest.fixture(scope="module")
def channel_fp32div(base, tmp_path_factory) -> Path:
    return _quantize(base, tmp_path_factory.mktemp("q") / "channel-fp32div", "--group-size", "-1")


@pytest.fixture(scope="module")
def channel_eager(base, tmp_path_factory) -> Path:
    return _quantize(base, tmp_path_factory.mktemp("q") / "channel-eager", "--group-size", "-1",
                     "--rounding", "eager")


def _qconfig(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())["quantization_config"]


def _quant_step(d: Path) -> dict:
    steps = json.loads((d / "pdqkit_lineage.json").read_text())["source_lineage"]
    assert json.loads((d / "quant_recipe.json").read_text())["source_lineage"] == steps
    assert [s["kind"] for s in steps] == ["base", "quant"]
    return steps[-1]


def _linears(base: Path) -> list[str]:
    """Every nn.Linear of the model transformers builds from ``base``'s config, in named_modules() order."""
    from transformers import AutoConfig, Gemma4ForCausalLM

    with torch.device("meta"):
        model = Gemma4ForCausalLM(AutoConfig.from_pretrained(base))
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _matches(pattern: str, name: str) -> bool:
    """compressed-tensors' ignore rule (spec §1.5): exact name, or ``re:`` + re.match (anchored at the start)."""
    return re.match(pattern[3:], name) is not None if pattern.startswith("re:") else name == pattern


def _card_bullet(card: str, prefix: str) -> str:
    (line,) = [ln for ln in card.splitlines() if ln.startswith(prefix)]
    return line


def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kw)


# ------------------------------------------------------------------ 1. --rounding eager + --extra-ignore


def test_lineage_records_the_recipe_config_json_carries(base, eager_ignored, channel_fp32div):
    """The lineage's quant step records the recipe that was run (rounding eager, the default ignore list plus the
    --extra-ignore patterns, group 128) and it is the recipe of config.json's quantization_config: the same
    config_groups (same targets; weights equal as compressed-tensors QuantizationArgs), and config.json's expanded
    ignore list is exactly the model's Linears that the recorded patterns match, in named_modules() order.
    ``equivalent_to`` names the CPU run for eager and the CUDA run for fp32div (spec §1.3)."""
    step, qc = _quant_step(eager_ignored), _qconfig(eager_ignored)
    assert step["rounding_mode"] == "eager"
    assert step["ignore"] == [*DEFAULT_IGNORE, *EXTRA_IGNORE]
    assert "g128" in step["method"] and "channel" not in step["method"]
    assert step["config_groups"].keys() == qc["config_groups"].keys() == {"group_0"}
    for name, group in step["config_groups"].items():
        written = qc["config_groups"][name]
        assert group["targets"] == written["targets"] == ["Linear"]
        assert _ct_args(**group["weights"]) == _ct_args(**written["weights"])
        assert group["input_activations"] is written["input_activations"] is None
        assert group["output_activations"] is written["output_activations"] is None
    # the recipe the CLI was given: W4A16 int, symmetric, group 128, minmax
    assert _ct_args(**qc["config_groups"]["group_0"]["weights"]) == _ct_args(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=128, observer="minmax")
    # the expanded ignore list, derived independently from the model's own modules and the recorded patterns
    expected = [n for n in _linears(base) if any(_matches(p, n) for p in step["ignore"])]
    assert qc["ignore"] == expected
    assert {"model.layers.1.self_attn.o_proj", "model.layers.2.mlp.down_proj"} <= set(expected)
    # equivalence claims follow the rounding mode (spec §1.3: eager = the CPU run, fp32div = the CUDA run)
    assert step["equivalent_to"]["device"] == "cpu"
    assert _quant_step(channel_fp32div)["equivalent_to"]["device"] == "cuda"


def test_extra_ignored_linears_stay_bf16_the_rest_are_packed(base, eager_ignored):
    """Every Linear config.json lists as ignored keeps its input bf16 ``weight`` unchanged (no ``weight_packed``);
    every other Linear is stored packed (``weight_packed``/``weight_scale`` [N, K/128]/``weight_shape``, no
    ``weight``): the --extra-ignore'd o_proj and down_proj in particular, while their neighbours are packed."""
    src, out, qc = _tensors(base), _tensors(eager_ignored), _qconfig(eager_ignored)
    ignored = set(qc["ignore"])
    linears = _linears(base)
    checked = {"ignored": 0, "packed": 0}
    for m in linears:
        if m in ignored:
            assert f"{m}.weight_packed" not in out and f"{m}.weight_scale" not in out, m
            if m == "lm_head":  # tied to the embeddings: not stored at all
                assert "lm_head.weight" not in out
                continue
            w = out[f"{m}.weight"]
            assert w.dtype == torch.bfloat16 and torch.equal(w, src[f"{m}.weight"]), m
            checked["ignored"] += 1
        else:
            n, k = src[f"{m}.weight"].shape
            assert f"{m}.weight" not in out, m
            assert out[f"{m}.weight_packed"].dtype == torch.int32 and out[f"{m}.weight_packed"].shape == (n, k // 8)
            scale = out[f"{m}.weight_scale"]
            assert scale.dtype == torch.bfloat16 and scale.shape == (n, k // 128), m
            assert out[f"{m}.weight_shape"].tolist() == [n, k]
            checked["packed"] += 1
    assert checked["ignored"] == len(ignored) - 1 and checked["packed"] == len(linears) - len(ignored)
    for m in ("model.layers.1.self_attn.o_proj", "model.layers.2.mlp.down_proj"):
        assert f"{m}.weight" in out
    for m in ("model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj", "model.layers.0.self_attn.o_proj"):
        assert f"{m}.weight_packed" in out


def test_card_states_the_recipe_used(eager_ignored):
    """The model card of an eager, extra-ignore run states that recipe: rounding mode eager and the CPU-run
    equivalence (not the CUDA one), the ignore patterns the lineage records (extra ones included) and the number
    of ignored/quantized Linears config.json and the weights show, group 128, the lineage's weights args."""
    card = (eager_ignored / "README.md").read_text()
    step, qc, out = _quant_step(eager_ignored), _qconfig(eager_ignored), _tensors(eager_ignored)
    rounding = _card_bullet(card, "- Rounding mode")
    assert step["rounding_mode"] == "eager" and "`eager`" in rounding
    assert "CPU" in rounding and "CUDA" not in rounding
    kept = _card_bullet(card, "- Not quantized")
    patterns = ast.literal_eval(re.search(r"every module matching `(\[.*?\])`", kept).group(1))
    assert patterns == step["ignore"]
    assert f"({len(qc['ignore'])} Linear modules listed" in kept
    n_packed = sum(k.endswith(".weight_packed") for k in out)
    assert f"- {n_packed} Linear layers (targets `{step['config_groups']['group_0']['targets']}`)" in card
    weights = _card_bullet(card, "- Weights:")
    assert json.loads(re.search(r"`(\{.*\})`", weights).group(1)) == step["config_groups"]["group_0"]["weights"]
    assert "(group 128," in card and "channelwise" not in card
    quant_line = _card_bullet(card, "- `quant`")
    assert f"method={step['method']}" in quant_line and "rounding_mode=eager" in quant_line


# ------------------------------------------------------------------ 2. channelwise --group-size -1


def test_channelwise_config_lineage_and_card(channel_fp32div, channel_eager):
    """``--group-size -1`` writes what compressed-tensors calls channelwise: config.json's weights parse to the
    QuantizationArgs of a channel strategy (group_size None), equal to the lineage's recorded args; every packed
    Linear has a bf16 ``weight_scale`` of shape [N, 1]; the lineage method and the model card say channelwise."""
    from compressed_tensors.quantization import QuantizationStrategy

    for d, mode in ((channel_fp32div, "fp32div"), (channel_eager, "eager")):
        qc, step = _qconfig(d), _quant_step(d)
        args = _ct_args(**qc["config_groups"]["group_0"]["weights"])
        assert args.strategy == QuantizationStrategy.CHANNEL and args.group_size is None
        assert args == _ct_args(num_bits=4, type="int", symmetric=True, strategy="channel", observer="minmax")
        assert args == _ct_args(**step["config_groups"]["group_0"]["weights"])
        assert step["rounding_mode"] == mode
        assert "channel" in step["method"] and "g-1" not in step["method"] and "g128" not in step["method"]
        out = _tensors(d)
        packed = [k.removesuffix(".weight_packed") for k in out if k.endswith(".weight_packed")]
        assert packed
        for m in packed:
            n, k = out[f"{m}.weight_shape"].tolist()
            assert out[f"{m}.weight_scale"].dtype == torch.bfloat16 and out[f"{m}.weight_scale"].shape == (n, 1), m
            assert out[f"{m}.weight_packed"].shape == (n, k // 8), m
        card = (d / "README.md").read_text()
        assert "int4 weights (channelwise," in card and "group -1" not in card and "group 128" not in card
        weights = json.loads(re.search(r"`(\{.*\})`", _card_bullet(card, "- Weights:")).group(1))
        assert weights["strategy"] == "channel" and "group_size" not in weights
        assert f"Rounding mode `{mode}`" in card


@pytest.mark.parametrize("fixture, group, mode", [("eager_ignored", 128, "eager"), ("channel_fp32div", -1, "fp32div"),
                                                  ("channel_eager", -1, "eager")])
def test_codes_and_scales_are_the_reference_observers(request, base, fixture, group, mode):
    """Each packed Linear's stored codes and scales (rows 0, last and two random ones) equal the spec's observer
    computed group by group by tests/test_observer.py's pure-torch reference, with the run's group size
    (channelwise: one group per row) and rounding mode: the CLI options reach the observer and the writer."""
    src, out = _tensors(base), _tensors(request.getfixturevalue(fixture))
    gen = torch.Generator().manual_seed(0)
    packed = sorted(k.removesuffix(".weight_packed") for k in out if k.endswith(".weight_packed"))
    assert len(packed) >= 30
    for m in packed:
        w = src[f"{m}.weight"]
        n, k = w.shape
        rows = sorted({0, n - 1, *torch.randint(1, n - 1, (ROWS_PER_LINEAR - 2,), generator=gen).tolist()})
        codes = unpack_int4(out[f"{m}.weight_packed"], k)[rows]
        ref_codes, ref_scale = ref_quantize(w[rows], group, mode)
        assert torch.equal(out[f"{m}.weight_scale"][rows], ref_scale), m
        assert torch.equal(codes.to(torch.int8), ref_codes), m


def test_channelwise_eager_is_compressed_tensors_own_cpu_quantization(base, channel_eager):
    """Every row of every Linear, against compressed-tensors itself (what an llmcompressor CPU run computes, spec
    §1.3): its calculate_qparams on each row's min/max with config.json's channel args gives the stored [N, 1]
    scales (zero point all zero: symmetric, not written), and its quantize() with them gives the stored codes."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**_qconfig(channel_eager)["config_groups"]["group_0"]["weights"])
    src, out = _tensors(base), _tensors(channel_eager)
    packed = sorted(k.removesuffix(".weight_packed") for k in out if k.endswith(".weight_packed"))
    assert len(packed) >= 30
    for m in packed:
        w = src[f"{m}.weight"]
        scale, zp = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
        assert not zp.any() and f"{m}.weight_zero_point" not in out
        assert torch.equal(out[f"{m}.weight_scale"], scale), m
        codes = quantize(x=w, scale=scale, zero_point=zp, args=args, dtype=torch.int8)
        assert torch.equal(unpack_int4(out[f"{m}.weight_packed"], w.shape[1]), codes), m


def test_channelwise_modes_differ_only_in_codes(channel_fp32div, channel_eager):
    """Spec §1.3: eager and fp32div store the same scales and differ by at most 1 in a few codes; so the
    channelwise --rounding option is not ignored."""
    a, b = _tensors(channel_fp32div), _tensors(channel_eager)
    assert a.keys() == b.keys()
    diff = 0
    for key in a:
        if key.endswith(".weight_packed"):
            k = int(a[key.replace("packed", "shape")][1])
            ca, cb = unpack_int4(a[key], k).int(), unpack_int4(b[key], k).int()
            assert int((ca - cb).abs().max()) <= 1, key
            diff += int((ca != cb).sum())
        else:
            assert torch.equal(a[key], b[key]), key
    assert diff > 0


def test_hf_loads_channelwise_with_our_weights(base, channel_fp32div):
    """HF transformers (compressed-tensors) loads the channelwise checkpoint with nothing missing or mismatched,
    and computes the same logits as the bf16 input model holding the stored codes times their per-row scales;
    after decompression every tensor equals that reference model's."""
    from transformers import Gemma4ForCausalLM

    qmodel, info = Gemma4ForCausalLM.from_pretrained(channel_fp32div, dtype=torch.bfloat16, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    q_proj = qmodel.model.layers[0].self_attn.q_proj
    assert {n for n, _ in q_proj.named_parameters()} == {"weight_packed", "weight_scale", "weight_shape"}

    ref = Gemma4ForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    tensors = _tensors(channel_fp32div)
    n_set = 0
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        m = key.removesuffix(".weight_packed")
        n, k = tensors[f"{m}.weight_shape"].tolist()
        codes = unpack_int4(tensors[key], k).float()
        w = (codes * tensors[f"{m}.weight_scale"].float()).to(torch.bfloat16)  # [N, K] * [N, 1]: per-row scale
        ref.get_submodule(m).weight.data.copy_(w)
        n_set += 1
    assert n_set >= 30
    assert_same_model(qmodel, ref)


# ------------------------------------------------------------------ 3. text-only head-dim override


def _readme_head_dim_fix(cfg):
    """The callable of shared/gpu/README.md ("transformers 5.17 and Gemma-4 head dims"), the reference fix."""
    tc = getattr(cfg, "text_config", cfg)
    dims = [tc.per_layer_config[i].head_dim for i in range(tc.num_hidden_layers)]
    tc.allow_global_per_layer_attribute_access = True
    tc.global_head_dim = max(dims)
    return cfg


def _apply_like_vllm(cfg, overrides: dict):
    """vLLM 0.26.0's ModelConfig._apply_dict_overrides: a key naming a sub-config is set attribute by attribute on
    it; any other key is set on the config itself."""
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        sub = getattr(cfg, key, None)
        if isinstance(sub, PretrainedConfig) and isinstance(value, dict):
            for k, v in value.items():
                setattr(sub, k, v)
        else:
            setattr(cfg, key, value)
    return cfg


def test_text_only_head_dim_fix(base, channel_fp32div):
    """For a text-only Gemma-4 (the text config IS the top-level config) vllm_config.yaml and the card's LLM(...)
    snippet carry the head-dim override flat at the top level, not under ``text_config``: applied the way vLLM
    applies a dict ``hf_overrides`` it gives the same config as shared/gpu/README.md's callable fix, and
    ``head_dim`` becomes readable (it raises before, transformers >= 5.14); global_head_dim is the largest
    per-layer head dim of the input config. No language-model-only switch for a text-only model."""
    from transformers import AutoConfig

    settings = yaml.safe_load((channel_fp32div / "vllm_config.yaml").read_text())
    fix = settings["hf-overrides"]
    assert "text_config" not in fix and "language-model-only" not in settings

    raw = json.loads((base / "config.json").read_text())
    assert "text_config" not in raw and raw["architectures"] == ["Gemma4ForCausalLM"]
    layer_dims = [raw.get("per_layer_config", {}).get(str(i), {}).get("head_dim", raw["head_dim"])
                  for i in range(raw["num_hidden_layers"])]
    assert len(set(layer_dims)) == 2 and fix["global_head_dim"] == max(layer_dims)

    hf = AutoConfig.from_pretrained(channel_fp32div)
    with pytest.raises(Exception, match="per-layer attribute"):
        _ = hf.head_dim
    ours = _apply_like_vllm(AutoConfig.from_pretrained(channel_fp32div), fix)
    reference = _readme_head_dim_fix(AutoConfig.from_pretrained(channel_fp32div))
    assert ours.to_dict() == reference.to_dict()
    assert ours.head_dim == raw["head_dim"] and ours.global_head_dim == max(layer_dims)

    card = (channel_fp32div / "README.md").read_text()
    (llm_line,) = [ln for ln in card.splitlines() if ln.startswith("llm = LLM(")]
    call = ast.parse(llm_line).body[0].value
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    assert kwargs["hf_overrides"] == fix and "language_model_only" not in kwargs
    assert "transformers.Gemma4ForCausalLM.from_pretrained" in card
