"""Mutation audit of pack.targets (which modules are targeted/ignored, saved keys, config/architecture guards),
pack.qconfig (QuantRecipe validation, the quantization_config block), the fused-set/tied rules the writer applies to
a plan, and pack.quantize's CLI (every option parsed and passed through, defaults, exit codes, one-line messages,
--demo). Each test checks behaviour against the spec (pack-quantized.md, cited), pack/README.md, or an independent
computation (own matcher over the meta model's modules); the CLI tests replace the writer with a recorder, so they
run in milliseconds and nothing is written (the conftest points the plan/hash caches at temp dirs)."""
from __future__ import annotations

import errno
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from pack.errors import QuantizeError
from pack.qconfig import DEFAULT_IGNORE, QuantRecipe

# spec pack-quantized.md §6 (the quant step of quant_recipe.json): recipe R's ignore list, method, config_groups
SPEC_R_IGNORE = ("re:.*vision_tower.*", "re:.*audio_tower.*", "re:.*per_layer_input_gate.*",
                 "re:.*per_layer_projection.*", "re:.*embed_vision.*", "re:.*embed_audio.*", "lm_head")
SPEC_R_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                  "observer": "minmax", "actorder": None, "dynamic": False}
# spec §3.1: the quantization_config block LLMC 0.14.0.1 / CT 0.19.0 writes for R (ignore checked separately)
SPEC_BLOCK = {
    "config_groups": {"group_0": {
        "format": "pack-quantized", "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 128, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "scale_dtype": None, "strategy": "group",
                    "symmetric": True, "type": "int", "zp_dtype": None}}},
    "format": "pack-quantized", "global_compression_ratio": None, "kv_cache_scheme": None,
    "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
    "transform_config": {}, "version": "0.19.0"}
# spec §1.5: the Linears recipe R quantizes in transformers' Gemma4
SPEC_QUANTIZED = re.compile(r"model\.language_model\.(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
                            r"|per_layer_model_projection)")
MICRO = dict(L=6, shared=2, V=1, A=1)   # bench/factory.py micro: 6 text layers (2 KV-shared), 1 vision, 1 audio


def _ct_match(name: str, pat: str) -> bool:
    """compressed-tensors' name rule (spec §1.5/§3.4): ``re:`` + re.match (anchored at the start), else exact."""
    return re.match(pat[3:], name) is not None if pat.startswith("re:") else name == pat


def _is_linear(m: torch.nn.Module) -> bool:
    """compressed-tensors' class rule for target ``Linear``: a class named Linear anywhere in the MRO."""
    return any(c.__name__ == "Linear" for c in type(m).__mro__)


def _write_config(d: Path, cfg: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _tiny(kind: str, **kw) -> dict:
    """config.json of a tiny Llama / Mixtral (transformers' own config classes, serialised)."""
    import transformers

    cls, arch = {"llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
                 "mixtral": (transformers.MixtralConfig, "MixtralForCausalLM")}[kind]
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128)
    if kind == "mixtral":
        base["num_local_experts"] = 2
    cfg = cls(**{**base, **kw}).to_dict()
    cfg.update(architectures=[arch], dtype="bfloat16")
    return cfg


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory) -> Path:
    """config.json only of the multimodal micro Gemma-4 (planning needs no weights)."""
    from bench.factory import model_config

    cfg = model_config("micro", multimodal=True).to_dict()
    cfg.update(architectures=["Gemma4ForConditionalGeneration"], dtype="bfloat16")
    return _write_config(tmp_path_factory.mktemp("mm") / "micro-mm", cfg)


@pytest.fixture(scope="module")
def mm_plan(mm_dir):
    from pack.targets import plan_model

    return plan_model(mm_dir, QuantRecipe())


@pytest.fixture(scope="module")
def mm_meta(mm_dir):
    """The same model built independently: transformers' AutoConfig reading the file, on the meta device."""
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    with torch.device("meta"):
        return Gemma4ForConditionalGeneration(AutoConfig.from_pretrained(str(mm_dir))).eval()


# ------------------------------------------------------------------------------------------ pack.targets


def test_default_ignore_is_recipe_r():
    """DEFAULT_IGNORE (the CLI's --ignore default) is recipe R's regex list, spec §6, in that order."""
    assert DEFAULT_IGNORE == SPEC_R_IGNORE and QuantRecipe().ignore == SPEC_R_IGNORE
    assert QuantRecipe().targets == ("Linear",)


def test_default_recipe_targets_exactly_the_spec_linears(mm_plan, mm_meta):
    """Recipe R targets exactly spec §1.5's Linears (q/k/v/o, gate/up/down of every text layer, KV-shared layers
    without k/v, and per_layer_model_projection), in named_modules() order; nothing of the towers, PLE gate and
    projection, embedders or lm_head. Protects DEFAULT_IGNORE's patterns and the default targets."""
    linears = [n for n, m in mm_meta.named_modules() if _is_linear(m)]
    want = tuple(n for n in linears if SPEC_QUANTIZED.fullmatch(n))
    assert mm_plan.targeted == want
    # the count the spec predicts: 7 per full layer, 5 per KV-shared layer (no k/v), + per_layer_model_projection
    assert len(want) == 7 * (MICRO["L"] - MICRO["shared"]) + 5 * MICRO["shared"] + 1
    # and the same set our own re.match / exact-name matcher gives for R's list
    assert mm_plan.targeted == tuple(n for n in linears if not any(_ct_match(n, p) for p in SPEC_R_IGNORE))
    assert mm_plan.architecture == "Gemma4ForConditionalGeneration"


def test_expanded_ignore_is_every_unquantized_linear_in_order(mm_plan, mm_meta):
    """config.json's ignore is the EXPANDED list (spec §3.2): every module whose class is exactly Linear and is not
    quantized, named_modules() order, count 1 + 7V + 2L + 1 + 11A + 1 + 3 (36 for the tiny oracle's shape)."""
    targeted = set(mm_plan.targeted)
    want = [n for n, m in mm_meta.named_modules() if type(m).__name__ == "Linear" and n not in targeted]
    got = mm_plan.quantization_config["ignore"]
    assert got == want
    V, L, A = MICRO["V"], MICRO["L"], MICRO["A"]
    assert len(got) == 1 + 7 * V + 2 * L + 1 + 11 * A + 1 + 3 == 36
    assert got[0] == "model.vision_tower.patch_embedder.input_proj" and got[-1] == "lm_head"


def test_quantization_config_block_is_spec_3_1(mm_plan):
    """Everything of the block but the ignore list is spec §3.1's verified CT 0.19.0 form, key for key (version
    0.19.0, status compressed, the full weights dict with its null defaults)."""
    block = dict(mm_plan.quantization_config)
    assert isinstance(block.pop("ignore"), list)
    assert block == SPEC_BLOCK


def test_saved_keys_are_the_state_dict_minus_the_tied_lm_head(mm_plan, mm_meta):
    """The keys written (spec §2.2): the model's state_dict() in its order, shapes included, less the tied
    lm_head.weight; KV-shared layers have no k_proj/v_proj/k_norm."""
    sd = mm_meta.state_dict()
    assert "lm_head.weight" in sd and "lm_head.weight" not in mm_plan.saved
    assert list(mm_plan.saved) == [k for k in sd if k != "lm_head.weight"]
    assert mm_plan.saved == {k: tuple(v.shape) for k, v in sd.items() if k != "lm_head.weight"}
    first_shared = MICRO["L"] - MICRO["shared"]
    for i in range(MICRO["L"]):
        p = f"model.language_model.layers.{i}.self_attn."
        has = [f"{p}{x}.weight" in mm_plan.saved for x in ("k_proj", "v_proj", "k_norm")]
        assert has == [i < first_shared] * 3, (i, has)


def test_plan_is_built_from_the_config_dict_passed(tmp_path):
    """plan_model(ckpt, recipe, config=dict) plans the dict it is given, not a second read of config.json."""
    from pack.targets import plan_model

    d = _write_config(tmp_path / "llama", _tiny("llama", num_hidden_layers=1))
    cfg = _tiny("llama", num_hidden_layers=2)
    plan = plan_model(d, QuantRecipe(), config=cfg)
    assert plan.config is cfg and "model.layers.1.mlp.down_proj" in plan.targeted
    assert "model.layers.1.mlp.down_proj" not in plan_model(d, QuantRecipe()).targeted


def test_llama_is_supported_and_all_its_linears_but_lm_head_are_targeted(tmp_path):
    """An architecture stored as-is (Llama, untied lm_head): every decoder Linear is targeted; R's exact
    ``lm_head`` entry keeps the head out (the module docstring's "e.g. Gemma-4, Llama, Qwen")."""
    from transformers import AutoConfig, LlamaForCausalLM

    from pack.targets import plan_model

    d = _write_config(tmp_path / "llama", _tiny("llama", num_hidden_layers=2))
    plan = plan_model(d, QuantRecipe())
    with torch.device("meta"):
        meta = LlamaForCausalLM(AutoConfig.from_pretrained(str(d)))
    assert plan.targeted == tuple(n for n, m in meta.named_modules() if _is_linear(m) and n != "lm_head")
    assert len(plan.targeted) == 2 * 7 and "lm_head.weight" in plan.saved  # untied: written as-is


def test_converting_architecture_is_refused(tmp_path):
    """An architecture whose tensors transformers renames/converts on load (Mixtral's experts) is refused with one
    line naming config.json and the architecture (the streaming writer copies tensors as stored)."""
    from pack.targets import plan_model

    d = _write_config(tmp_path / "mixtral", _tiny("mixtral"))
    with pytest.raises(QuantizeError, match=r"config\.json: transformers renames or converts MixtralForCausalLM's"):
        plan_model(d, QuantRecipe())


def test_keep_fp32_lists_both_transformers_attributes(tmp_path, monkeypatch):
    """plan.keep_fp32 = the model's _keep_in_fp32_modules followed by _keep_in_fp32_modules_strict (both read)."""
    import pack.targets as targets
    from transformers import AutoConfig, LlamaForCausalLM

    d = _write_config(tmp_path / "llama", _tiny("llama"))
    with torch.device("meta"):
        meta = LlamaForCausalLM(AutoConfig.from_pretrained(str(d))).eval()
    meta._keep_in_fp32_modules, meta._keep_in_fp32_modules_strict = ["norm_a"], ["norm_b"]
    monkeypatch.setattr(targets, "build_meta_model", lambda ckpt, cfg: ("LlamaForCausalLM", meta))
    assert targets.plan_model(d, QuantRecipe()).keep_fp32 == ("norm_a", "norm_b")


@pytest.mark.parametrize("case, needle", [
    ("no dir", "no such checkpoint directory"),
    ("no config", "config.json: missing"),
    ("garbled", "not valid JSON"),
    ("not utf-8", "not valid JSON"),
    ("a list", "not a transformers model config (no model_type)"),
    ("a list holding model_type", "not a transformers model config (no model_type)"),
    ("no model_type", "not a transformers model config (no model_type)"),
    ("quantized", "already quantized (quantization_config, quant_method 'gptq')"),
    ("quantized text_config", "already quantized (quantization_config, quant_method '?')"),
])
def test_load_config_refusals(tmp_path, case, needle):
    """Every refusal of load_config is a one-line QuantizeError naming the problem, including a quantization_config
    nested in a sub-config, a non-UTF-8 file and JSON that is not an object."""
    from pack.targets import load_config

    d = tmp_path / "c"
    if case != "no dir":
        d.mkdir()
    content = {"garbled": b"{bad", "not utf-8": b'{"model_type": "\xff"}', "a list": b"[1]",
               "a list holding model_type": b'["model_type"]',
               "no model_type": b'{"architectures": []}',
               "quantized": b'{"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}',
               "quantized text_config": b'{"model_type": "gemma4", "text_config": {"quantization_config": {"a": 1}}}',
               }.get(case)
    if content is not None:
        (d / "config.json").write_bytes(content)
    with pytest.raises(QuantizeError) as e:
        load_config(d)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_load_config_accepts_an_empty_quantization_config(tmp_path):
    """An empty/null quantization_config is not a quantized checkpoint (the check is on a non-empty block)."""
    from pack.targets import load_config

    cfg = {"model_type": "llama", "quantization_config": {}, "text_config": {"quantization_config": None}}
    _write_config(tmp_path / "c", cfg)
    assert load_config(tmp_path / "c") == cfg


@pytest.mark.parametrize("cfg, needle", [
    ({"dtype": "float32"}, "config.json: dtype is 'float32'"),
    ({"torch_dtype": "float16"}, "config.json: torch_dtype is 'float16'"),
    ({"text_config": {"dtype": "float32"}}, "config.json: text_config.dtype is 'float32'"),
    ({"text_config": {"torch_dtype": "float16"}}, "config.json: text_config.torch_dtype is 'float16'"),
    ({"dtype": "bfloat16", "text_config": {"dtype": "bfloat16"}, "vision_config": {"dtype": "float32"}}, None),
    ({"text_config": None}, None),
])
def test_dtype_guard_checks_the_language_stack_only(tmp_path, cfg, needle):
    """The dtype guard (run by build_meta_model before transformers) refuses a non-bf16 dtype/torch_dtype at the top
    level or in text_config, naming which; tower sub-configs are not checked, a missing text_config is fine."""
    from pack.targets import _check_dtype, build_meta_model

    f = tmp_path / "config.json"
    if needle is None:
        _check_dtype(cfg, f)
        return
    with pytest.raises(QuantizeError, match=re.escape(needle)):
        _check_dtype(cfg, f)
    with pytest.raises(QuantizeError, match=re.escape(needle)):   # and build_meta_model runs the guard
        build_meta_model(tmp_path, {**_tiny("llama"), **cfg})


@pytest.mark.parametrize("archs, needle", [
    (None, "no 'architectures' entry"),
    ([], "no 'architectures' entry"),
    (["PretrainedConfig"], "unknown architecture 'PretrainedConfig'"),   # a transformers class, not a model
    (["pipeline"], "unknown architecture 'pipeline'"),                   # a transformers function
])
def test_architecture_must_name_a_transformers_model_class(tmp_path, archs, needle):
    """architectures must be present and its first entry a PreTrainedModel subclass of transformers."""
    from pack.targets import build_meta_model

    cfg = _tiny("llama")
    cfg.pop("architectures")
    if archs is not None:
        cfg["architectures"] = archs
    with pytest.raises(QuantizeError, match=re.escape(needle)):
        build_meta_model(tmp_path, cfg)


def test_the_first_architecture_is_built(tmp_path):
    """architectures[0] is the class built (a later, unknown entry is not looked at)."""
    from pack.targets import build_meta_model

    cfg = {**_tiny("llama"), "architectures": ["LlamaForCausalLM", "NoSuchModelForAnything"]}
    arch, model = build_meta_model(tmp_path, cfg)
    assert arch == "LlamaForCausalLM" and type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).device.type == "meta"


def test_custom_code_config_is_refused_without_running_it(tmp_path):
    """A model_type transformers lacks whose config has an auto_map AutoConfig entry is refused with transformers'
    custom-code message (never executed); without auto_map, transformers' unknown-architecture message."""
    from pack.targets import build_meta_model

    cfg = {"model_type": "pdqkit_custom", "architectures": ["LlamaForCausalLM"],
           "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}
    with pytest.raises(QuantizeError, match="cannot read this config .*contains custom code"):
        build_meta_model(tmp_path, cfg)
    cfg.pop("auto_map")
    with pytest.raises(QuantizeError, match="cannot read this config .*does not recognize this architecture"):
        build_meta_model(tmp_path, cfg)


@pytest.mark.parametrize("text, first", [("first line\nsecond line", "first line"), ("", "ValueError")])
def test_transformers_errors_become_one_line(tmp_path, monkeypatch, text, first):
    """Whatever transformers raises while reading the config or building the model is cut to its first line (its
    type name when it has no text), so the CLI's error stays one line."""
    import pack.targets as targets
    import transformers

    class Broken(transformers.LlamaForCausalLM):
        def __init__(self, config):
            raise ValueError(text)

    cfg = {**_tiny("llama"), "architectures": ["PdqkitBrokenForCausalLM"]}
    # the module build_meta_model's own import finds (transformers' lazy module may replace itself on first use)
    monkeypatch.setattr(sys.modules["transformers"], "PdqkitBrokenForCausalLM", Broken, raising=False)
    with pytest.raises(QuantizeError) as e:
        targets.build_meta_model(tmp_path, cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"cannot build PdqkitBrokenForCausalLM from this config (ValueError: {first})" in msg

    def bad_config(*a):
        raise ValueError(text)

    monkeypatch.setattr(targets, "hf_config", bad_config)
    with pytest.raises(QuantizeError) as e:
        targets.build_meta_model(tmp_path, cfg)
    assert "\n" not in str(e.value) and f"cannot read this config (model_type 'llama': {first})" in str(e.value)


def test_configuration_files_config_goes_through_from_pretrained(tmp_path):
    """A config listing configuration_files is read by AutoConfig.from_pretrained itself (which may pick a versioned
    config.X.json): the file's values, not the dict's."""
    from pack.targets import hf_config

    on_disk = {**_tiny("llama", num_hidden_layers=3), "configuration_files": ["config.json"]}
    _write_config(tmp_path / "c", on_disk)
    assert hf_config(tmp_path / "c", {**on_disk, "num_hidden_layers": 5}).num_hidden_layers == 3
    plain = _tiny("llama", num_hidden_layers=3)   # without it: the dict read is what is built
    _write_config(tmp_path / "d", plain)
    assert hf_config(tmp_path / "d", {**plain, "num_hidden_layers": 5}).num_hidden_layers == 5


@pytest.mark.parametrize("suffix", ["weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                    "weight_g_idx", "weight_global_scale", "qweight", "qzeros", "scales"])
def test_looks_quantized_knows_every_quantized_tensor_name(suffix):
    """compressed-tensors' packed names (spec §2.1) and GPTQ/AWQ's qweight/qzeros/scales mark a quantized input;
    only as the last name component; a plain weight, bias or norm does not."""
    from pack.targets import looks_quantized

    assert looks_quantized(f"model.layers.0.mlp.down_proj.{suffix}")
    assert not looks_quantized(f"model.layers.0.mlp.{suffix}.weight")
    for plain in ("model.layers.0.mlp.down_proj.weight", "model.norm.weight", "x.bias", "x.weight_scalex",
                  "x.relative_scales", "x.my_qweight"):
        assert not looks_quantized(plain), plain


# ------------------------------------------------------------------------- fused sets and tied weights


def _toy_plan(targeted: list[str], modules: list[str]):
    from pack.targets import ModelPlan

    return ModelPlan({}, "Toy", tuple(targeted), {f"{m}.weight": (8, 8) for m in modules}, (), {}, {})


_LAYER = [f"layers.0.self_attn.{x}" for x in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"layers.0.mlp.{x}" for x in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("ignored", ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
def test_any_single_member_of_a_fused_set_ignored_is_refused(ignored):
    """vLLM fuses q/k/v and gate/up (spec §4.1): ignoring any one member while a sibling is quantized is refused,
    naming the ignored one and the full set to ignore."""
    from pack.writer import _check_fused_sets, _check_inputs

    name = next(m for m in _LAYER if m.endswith(ignored))
    siblings = ("q_proj", "k_proj", "v_proj") if "attn" in name else ("gate_proj", "up_proj")
    with pytest.raises(QuantizeError) as e:
        _check_fused_sets(_toy_plan([m for m in _LAYER if m != name], _LAYER), types.SimpleNamespace(dir="ck"))
    assert f"{name} is ignored but " in str(e.value), str(e.value)
    assert f"ignore all of {', '.join(siblings)} there, or none" in str(e.value)
    # and the writer's input check runs it (before any tensor is looked at)
    with pytest.raises(QuantizeError, match=re.escape(f"ck: {name} is ignored but ")):
        _check_inputs(_toy_plan([m for m in _LAYER if m != name], _LAYER),
                      types.SimpleNamespace(dir="ck", tensors={}), QuantRecipe())


def test_a_targeted_tied_module_is_refused():
    """A targeted module whose weight is not among the saved keys (a tied alias, Gemma-4's lm_head) is refused
    with the --extra-ignore fix, before anything is read."""
    from pack.writer import _check_inputs

    plan = _toy_plan([*_LAYER, "lm_head"], _LAYER)
    with pytest.raises(QuantizeError, match=r"ck: lm_head is targeted but its weight is tied .* lm_head$"):
        _check_inputs(plan, types.SimpleNamespace(dir="ck", tensors={}), QuantRecipe())


@pytest.mark.parametrize("ignored", [[], ["o_proj"], ["down_proj"], ["q_proj", "k_proj", "v_proj"],
                                     ["gate_proj", "up_proj"],
                                     ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]])
def test_unfused_or_whole_sets_may_be_ignored(ignored):
    """o_proj and down_proj are not fused with anything; a whole set ignored (or none) is fine."""
    from pack.writer import _check_fused_sets

    kept = [m for m in _LAYER if m.rpartition(".")[2] not in ignored]
    _check_fused_sets(_toy_plan(kept, _LAYER), types.SimpleNamespace(dir="ck"))


def test_kv_shared_layer_without_k_v_is_not_a_partial_set():
    """A KV-shared Gemma-4 layer has q_proj but no k_proj/v_proj modules: members absent from the model do not count
    as ignored."""
    from pack.writer import _check_fused_sets

    shared = [m for m in _LAYER if "k_proj" not in m and "v_proj" not in m]
    _check_fused_sets(_toy_plan(shared, shared), types.SimpleNamespace(dir="ck"))


def test_fused_sets_are_checked_on_the_real_plan_names(mm_plan):
    """On the real micro plan every targeted q/k/v (gate/up) has all its present siblings targeted, so the default
    run passes; removing one sibling from the plan's targets is refused."""
    from pack.writer import _check_fused_sets

    src = types.SimpleNamespace(dir="ck")
    _check_fused_sets(mm_plan, src)
    victim = "model.language_model.layers.0.self_attn.v_proj"
    plan = _toy_plan([m for m in mm_plan.targeted if m != victim], [k[:-7] for k in mm_plan.saved
                                                                      if k.endswith(".weight")])
    with pytest.raises(QuantizeError, match=re.escape(f"{victim} is ignored")):
        _check_fused_sets(plan, src)


# ------------------------------------------------------------------------------------------ pack.qconfig


def test_recipe_needs_targets():
    """An empty targets list would quantize nothing: refused; an empty ignore list is allowed."""
    with pytest.raises(QuantizeError, match="targets is empty"):
        QuantRecipe(targets=())
    assert QuantRecipe(ignore=()).ignore == ()


@pytest.mark.parametrize("kw, bad", [(dict(targets=("re:[",)), "re:["), (dict(ignore=("lm_head", "re:(")), "re:(")])
def test_invalid_regex_is_refused_in_targets_and_ignore(kw, bad):
    """A ``re:`` pattern that does not compile, in targets or ignore, is a one-line error quoting it."""
    with pytest.raises(QuantizeError, match=re.escape(f"{bad!r}: not a valid regular expression")):
        QuantRecipe(**kw)


def test_only_re_prefixed_patterns_are_compiled():
    """Exact names are not regexes (``foo(`` is a valid exact name); a valid ``re:`` pattern is compiled without
    its prefix (``re:(a)`` is fine)."""
    r = QuantRecipe(ignore=("foo(", "re:(a)", "re:.*x[0-9]+$"))
    assert r.ignore == ("foo(", "re:(a)", "re:.*x[0-9]+$")


def test_rounding_must_be_a_known_mode():
    """--rounding: fp32div and eager (spec §1.3), anything else refused naming the modes."""
    for mode in ("fp32div", "eager"):
        assert QuantRecipe(rounding=mode).rounding == mode
    with pytest.raises(QuantizeError, match=r"--rounding must be one of \('fp32div', 'eager'\), got 'round'"):
        QuantRecipe(rounding="round")


@pytest.mark.parametrize("g, ok", [(-1, True), (8, True), (32, True), (128, True), (0, False), (-2, False),
                                   (-128, False), (4, False), (100, False), (130, False)])
def test_group_size_boundaries(g, ok):
    """--group-size: -1 (channelwise) or a positive multiple of 8 (the int32 packing); anything else is a
    QuantizeError prefixed --group-size."""
    if ok:
        assert QuantRecipe(group_size=g).group_size == g
    else:
        with pytest.raises(QuantizeError, match=r"^--group-size: "):
            QuantRecipe(group_size=g)


def test_recipe_normalises_lists_to_tuples():
    """targets/ignore given as lists become tuples: the recipe is hashable and equal to its tuple spelling (the plan
    cache and the CLI rely on it)."""
    a = QuantRecipe(targets=["Linear"], ignore=["lm_head"])
    b = QuantRecipe(targets=("Linear",), ignore=("lm_head",))
    assert a == b and hash(a) == hash(b) and isinstance(a.targets, tuple) and isinstance(a.ignore, tuple)


def test_recipe_weights_method_and_groups_follow_spec_6():
    """weights_dict / config_groups / method of recipe R are spec §6's quant step; channelwise has strategy channel
    and no group_size; the compressed-tensors scheme carries format pack-quantized."""
    r = QuantRecipe()
    assert r.weights_dict() == SPEC_R_WEIGHTS and r.method == "w4a16_g128_sym_minmax"
    assert r.config_groups() == {"group_0": {"targets": ["Linear"], "weights": SPEC_R_WEIGHTS,
                                             "input_activations": None, "output_activations": None}}
    ch = QuantRecipe(group_size=-1)
    assert ch.weights_dict() == {k: v for k, v in {**SPEC_R_WEIGHTS, "strategy": "channel"}.items()
                                 if k != "group_size"}
    assert ch.method == "w4a16_channel_sym_minmax" and QuantRecipe(group_size=64).method == "w4a16_g64_sym_minmax"
    s = r.ct_scheme()
    assert s.format == "pack-quantized" and s.targets == ["Linear"] and s.weights.group_size == 128
    assert s.input_activations is None and s.output_activations is None


def test_quantization_config_cleans_up_and_refuses_an_empty_match(mm_meta, monkeypatch):
    """quantization_config attaches the scheme only for the duration of the call (also when compressed-tensors
    fails), and no module matched is a one-line QuantizeError."""
    from compressed_tensors.quantization import QuantizationConfig

    from pack.qconfig import quantization_config

    lin = dict(list((n, m) for n, m in mm_meta.named_modules() if _is_linear(m))[:3])
    block = quantization_config(mm_meta, lin, QuantRecipe())
    assert block["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert not any(hasattr(m, "quantization_scheme") or hasattr(m, "quantization_status")
                   for m in mm_meta.modules())
    with pytest.raises(QuantizeError, match="no module matches the recipe's targets minus ignore"):
        quantization_config(mm_meta, {}, QuantRecipe())

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(QuantizationConfig, "from_pretrained", boom)
    with pytest.raises(RuntimeError):
        quantization_config(mm_meta, lin, QuantRecipe())
    assert not any(hasattr(m, "quantization_scheme") for m in mm_meta.modules())


def test_ct019_form_normalises_other_compressed_tensors_dumps():
    """_ct019_form turns a CT 0.20-style dump (null weight args dropped, moe_sparsity_config added) into spec §3.1's
    0.19.0 key set, filling only the missing defaults (a value that is set is kept); null weights stay null."""
    from pack.qconfig import _ct019_form

    w020 = {"dynamic": False, "group_size": 128, "num_bits": 4, "observer": "minmax", "strategy": "group",
            "symmetric": True, "type": "int", "actorder": "group"}
    d = {**{k: v for k, v in SPEC_BLOCK.items() if k != "config_groups"}, "ignore": ["lm_head"],
         "moe_sparsity_config": None,
         "config_groups": {"group_0": {**SPEC_BLOCK["config_groups"]["group_0"], "weights": w020},
                           "group_1": {"targets": ["Embedding"], "weights": None}}}
    got = _ct019_form(d)
    assert set(got) == set(SPEC_BLOCK) | {"ignore"} and got["ignore"] == ["lm_head"]
    assert got["config_groups"]["group_0"]["weights"] == {
        **SPEC_BLOCK["config_groups"]["group_0"]["weights"], "actorder": "group"}
    assert got["config_groups"]["group_1"]["weights"] is None


# ------------------------------------------------------------------------------------------ pack.quantize CLI


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    """A real text-only micro checkpoint (config.json + model.safetensors): the early hasher starts on it."""
    from bench.factory import save_random_checkpoint

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("txt") / "micro")


class _Recorder:
    """Stands in for pack.writer.quantize_checkpoint: records its arguments, or raises ``error``."""

    def __init__(self, error: BaseException | None = None):
        self.calls, self.error = [], error

    def __call__(self, ckpt, out, recipe, **kw):
        self.calls.append(dict(ckpt=ckpt, out=out, recipe=recipe, **kw))
        if self.error is not None:
            raise self.error
        return types.SimpleNamespace(summary=lambda: "pdqkit quantize: SUMMARY")


@pytest.fixture
def recorder(monkeypatch):
    import pack.writer

    rec = _Recorder()
    monkeypatch.setattr(pack.writer, "quantize_checkpoint", rec)
    return rec


def test_cli_defaults_are_the_documented_ones(text_ckpt, recorder, capsys):
    """No options: recipe R (group 128, fp32div, DEFAULT_IGNORE), output CKPT-w4a16 next to CKPT, --device cpu,
    --max-shard-size 20GB, no --force, progress bar, plan and hash caches, fsync (pack/README.md); the early hasher
    is handed over with the cache on; the summary is the one line on stdout, exit 0."""
    from pack.checkpoint import FileHasher
    from pack.quantize import main

    assert main([str(text_ckpt)]) == 0
    (call,) = recorder.calls
    assert call["recipe"] == QuantRecipe(ignore=SPEC_R_IGNORE, group_size=128, rounding="fp32div")
    assert call["out"] == text_ckpt.resolve().parent / f"{text_ckpt.name}-w4a16" and call["ckpt"] == text_ckpt
    assert {k: call[k] for k in ("device", "force", "max_shard_size", "progress", "plan_cache", "hash_cache",
                                 "fsync")} == dict(device="cpu", force=False, max_shard_size="20GB", progress=True,
                                                   plan_cache=True, hash_cache=True, fsync=True)
    assert isinstance(call["input_hasher"], FileHasher) and call["input_hasher"].use_cache is True
    assert [p.name for p in call["input_hasher"].files] == ["model.safetensors"]
    out = capsys.readouterr().out
    assert out == "pdqkit quantize: SUMMARY\n"


def test_cli_default_output_is_named_after_the_resolved_checkpoint(text_ckpt, recorder, monkeypatch):
    """CKPT spelled ``.`` (run inside it): the default output is NAME-w4a16 next to the real directory, not
    ``-w4a16`` in the current one."""
    from pack.quantize import main

    monkeypatch.chdir(text_ckpt)
    assert main([".", "--no-hash-cache"]) == 0
    assert recorder.calls[-1]["out"] == text_ckpt.resolve().parent / f"{text_ckpt.name}-w4a16"


def test_cli_passes_every_option_through(text_ckpt, recorder, tmp_path):
    """Every option, set away from its default, reaches quantize_checkpoint: --ignore replaces the list and
    --extra-ignore is appended after it, --group-size, --rounding, --device, --max-shard-size, --force,
    --no-progress, --no-plan-cache, --no-hash-cache (also the early hasher's cache), --no-fsync, -o."""
    from pack.quantize import main

    out = tmp_path / "o"
    assert main([str(text_ckpt), "-o", str(out), "--group-size", "64", "--ignore", "a", "re:b.*", "--extra-ignore",
                 "c", "d", "--rounding", "eager", "--device", "cuda", "--max-shard-size", "5MB", "--force",
                 "--no-progress", "--no-plan-cache", "--no-hash-cache", "--no-fsync"]) == 0
    (call,) = recorder.calls
    assert call["recipe"] == QuantRecipe(ignore=("a", "re:b.*", "c", "d"), group_size=64, rounding="eager")
    assert call["out"] == out
    assert {k: call[k] for k in ("device", "force", "max_shard_size", "progress", "plan_cache", "hash_cache",
                                 "fsync")} == dict(device="cuda", force=True, max_shard_size="5MB", progress=False,
                                                   plan_cache=False, hash_cache=False, fsync=False)
    assert call["input_hasher"].use_cache is False


def test_cli_extra_ignore_adds_to_the_default_list(text_ckpt, recorder, tmp_path):
    """--extra-ignore alone keeps the default list and appends to it."""
    from pack.quantize import main

    assert main([str(text_ckpt), "-o", str(tmp_path / "o"), "--extra-ignore", "model.norm"]) == 0
    assert recorder.calls[0]["recipe"].ignore == (*SPEC_R_IGNORE, "model.norm")


def test_cli_no_hasher_for_a_dir_that_is_not_a_checkpoint(text_ckpt, tmp_path, recorder):
    """The early hasher starts only on a dir with config.json and safetensors; otherwise none is handed over and
    the writer's own checks report the problem (no exception escapes from the prefetch)."""
    from pack.quantize import main

    cfg_only = _write_config(tmp_path / "cfg-only", _tiny("llama"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights-only").mkdir()
    shutil.copy(text_ckpt / "model.safetensors", tmp_path / "weights-only")
    for d in (cfg_only, tmp_path / "empty", tmp_path / "weights-only", tmp_path / "missing"):
        assert main([str(d), "-o", str(tmp_path / "o")]) == 0
        assert recorder.calls[-1]["input_hasher"] is None


def _exit_cases():
    from pack.checkpoint import InterruptedAfterCommit, OutputAppeared, UnsyncedAfterCommit

    done = InterruptedAfterCommit(Path("/x/out"), None, just_committed=True)
    unsynced = UnsyncedAfterCommit(Path("/x/out"), OSError(errno.EIO, "Input/output error"))
    appeared = OutputAppeared(errno.EEXIST, "/x/out appeared while this run wrote it; kept")
    return [
        ("QuantizeError", QuantizeError("cfg.json: bad thing; fix it"), 2, "error: cfg.json: bad thing; fix it"),
        ("OSError", OSError(errno.ENOSPC, "No space left on device"), 1,
         "error: [Errno 28] No space left on device; nothing was written"),
        ("PermissionError", PermissionError(errno.EACCES, "Permission denied"), 1,
         "error: [Errno 13] Permission denied; nothing was written"),
        ("KeyboardInterrupt", KeyboardInterrupt(), 130, "error: interrupted; nothing was written"),
        ("InterruptedAfterCommit", done, 130, f"error: interrupted: {done}"),
        ("UnsyncedAfterCommit", unsynced, 1, f"error: {unsynced.strerror}"),
        ("OutputAppeared", appeared, 2, "error: /x/out appeared while this run wrote it; kept"),
    ]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _exit_cases()])
def test_cli_exit_codes_and_one_line_messages(text_ckpt, monkeypatch, capsys, tmp_path, case):
    """Exit status by what went wrong (pack/errors.py, README): bad input 2 (QuantizeError; an output another run
    put in place, OutputAppeared, although an OSError), the machine 1 ("nothing was written"), interrupted 130;
    after the commit the message says the output was written (130 / 1). Always exactly one 'error:' line."""
    import pack.writer
    from pack.quantize import main

    _, error, rc, line = _exit_cases()[case]
    monkeypatch.setattr(pack.writer, "quantize_checkpoint", _Recorder(error))
    capsys.readouterr()
    assert main([str(text_ckpt), "-o", str(tmp_path / "o"), "--no-hash-cache"]) == rc
    cap = capsys.readouterr()
    assert cap.err == line + "\n" and cap.out == ""


def test_cli_unexpected_exception_keeps_its_traceback(text_ckpt, monkeypatch, tmp_path):
    """Anything else is a bug: it propagates (traceback) instead of being turned into an exit status."""
    import pack.writer
    from pack.quantize import main

    monkeypatch.setattr(pack.writer, "quantize_checkpoint", _Recorder(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main([str(text_ckpt), "-o", str(tmp_path / "o"), "--no-hash-cache"])


def test_cli_without_ckpt(tmp_path, recorder, capsys, monkeypatch):
    """No CKPT: exit 2, one line; the swap hint only when an --ignore/--extra-ignore argument is a checkpoint dir
    (here: swallowed by --ignore), never for a plain pattern or a dir without config.json."""
    from pack.quantize import main

    monkeypatch.chdir(tmp_path)
    ck = _write_config(tmp_path / "ck", _tiny("llama"))
    (tmp_path / "notck").mkdir()
    base = "error: no input checkpoint: pass CKPT (a Hugging Face checkpoint dir) or --demo"
    for argv, hint in ((["-o", "o"], ""), (["-o", "o", "--ignore", "re:x", "notck"], ""),
                       (["-o", "o", "--ignore", "lm_head", str(ck)],
                        f"; {ck} was read as an --ignore pattern: put CKPT before --ignore/--extra-ignore")):
        capsys.readouterr()
        assert main(argv) == 2
        assert capsys.readouterr().err == base + hint + "\n"
    assert recorder.calls == []


def test_cli_demo(tmp_path, recorder, monkeypatch, capsys):
    """--demo [micro|small]: builds out/demo-SCALE-mm-bf16 once (random multimodal Gemma-4, seed 0) and quantizes it
    to out/demo-SCALE-mm-w4a16, replacing it (force); with -o the output is that dir and --force is the user's;
    --demo with CKPT is a one-line error (exit 2); no early hasher for the demo."""
    import bench.factory
    from pack.quantize import main

    monkeypatch.chdir(tmp_path)
    built = []

    def fake_build(scale, out, **kw):
        built.append((scale, Path(out), kw))
        _write_config(Path(out), {"model_type": "gemma4"})
        return Path(out)

    monkeypatch.setattr(bench.factory, "save_random_checkpoint", fake_build)
    assert main(["--demo"]) == 0
    assert built == [("micro", Path("out/demo-micro-mm-bf16"), dict(multimodal=True, seed=0, force=True))]
    call = recorder.calls[-1]
    assert (call["ckpt"], call["out"], call["force"]) == (Path("out/demo-micro-mm-bf16"),
                                                          Path("out/demo-micro-mm-w4a16"), True)
    assert call["input_hasher"] is None
    assert main(["--demo"]) == 0 and len(built) == 1   # the base is reused
    assert main(["--demo", "small", "-o", "mine"]) == 0
    assert built[-1][:2] == ("small", Path("out/demo-small-mm-bf16"))
    call = recorder.calls[-1]
    assert (call["ckpt"], call["out"], call["force"]) == (Path("out/demo-small-mm-bf16"), Path("mine"), False)
    assert main(["--demo", "small", "-o", "mine", "--force"]) == 0 and recorder.calls[-1]["force"] is True
    capsys.readouterr()
    n = len(recorder.calls)
    import pack.quantize

    prefetched = []
    monkeypatch.setattr(pack.quantize, "_prefetch_hashes", lambda *a: prefetched.append(a))
    assert main([str(tmp_path), "--demo"]) == 2 and prefetched == []   # CKPT + --demo: nothing hashed
    assert capsys.readouterr().err == "error: --demo builds its own input checkpoint: drop CKPT or drop --demo\n"
    assert len(recorder.calls) == n


@pytest.mark.parametrize("argv", [["x", "--rounding", "nearest"], ["--demo", "huge"], ["x", "--group-size", "g"]])
def test_cli_argparse_rejects_bad_choices(argv, capsys):
    """--rounding and --demo take only their documented choices, --group-size an int: argparse's usage error,
    exit 2, before anything runs."""
    from pack.quantize import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "invalid" in capsys.readouterr().err
