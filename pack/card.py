"""The human-facing files of a pdqkit W4A16 checkpoint: model card ``README.md`` and ``vllm_config.yaml``.

``vllm_config.yaml`` is for ``vllm serve OUT --config OUT/vllm_config.yaml`` (vLLM 0.26.0). What was checked
against vLLM 0.26.0's source (``vllm/utils/argparse_utils.py::FlexibleArgumentParser.load_config_file``,
``vllm/engine/arg_utils.py``, ``vllm/config/model.py``):

* a YAML mapping value becomes ``--key '<json>'``; ``--hf-overrides`` parses JSON into a dict (a callable
  cannot be given from a file);
* a dict ``hf_overrides`` entry whose value is a dict and names a sub-config (``text_config``) is applied by
  ``ModelConfig._apply_dict_overrides`` with ``setattr`` on that sub-config right after the HF config is
  loaded, before vLLM reads ``head_dim``; flat entries go through ``PretrainedConfig.update``;
* setting ``allow_global_per_layer_attribute_access`` then ``global_head_dim`` on the text config gives the
  same config as the callable head-dim fix of shared/gpu/README.md (checked on CPU with transformers 5.17:
  equal ``to_dict()``); transformers >= 5.14 otherwise raises ``AmbiguousGlobalPerLayerAttributeError`` when
  vLLM reads ``config.head_dim`` of a Gemma-4 config whose full-attention layers have a larger head dim.

On the GPU machine ``bench/gpu/pack_vllm_check.py`` parses this file with vLLM's own argument parser and builds
engines from it, and with ``--serve`` runs ``vllm serve OUT --config OUT/vllm_config.yaml`` itself and queries it
over HTTP (test settings added on the command line); not on CPU.
"""
from __future__ import annotations

import json
from pathlib import PurePath

__all__ = ["serving_facts", "vllm_settings", "vllm_config_yaml", "model_card"]


def serving_facts(config) -> dict:
    """What vLLM needs to know about a model, from its transformers config (``PretrainedConfig``): JSON-able, so
    the plan cache (pack.plancache) can keep it. Keys: ``max_position_embeddings`` (as configured, or None),
    ``multimodal`` (the language model is a sub-config), ``head_dim_fix`` (dict or None, see
    :func:`_head_dim_fix`), ``head_dims`` (the attention head dims of the language model's layers, sorted, or None
    where the config does not tell; what the ``attention-backend`` comment of ``vllm_config.yaml`` cites).
    Readers take ``head_dims`` with ``.get``: a plan built before it existed has none."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"max_position_embeddings": getattr(tc, "max_position_embeddings", None), "multimodal": tc is not config,
            "head_dim_fix": _head_dim_fix(config, tc), "head_dims": _head_dims(tc)}


def _per_layer_head_dims(tc) -> set | None:
    """The head dims of the text config's layers where transformers keeps them per layer (``per_layer_config``,
    transformers >= 5.14); None where it does not (or an odd config)."""
    per_layer = getattr(tc, "per_layer_config", None)
    if per_layer is None:
        return None
    try:
        return {per_layer[i].head_dim for i in range(tc.num_hidden_layers)}
    except Exception:  # noqa: BLE001 - not a heterogeneous config
        return None


def _head_dims(tc) -> list[int] | None:
    """The distinct head dims of the text config's layers, sorted: per layer where transformers keeps them there
    (every architecture), else ``head_dim``; hidden size / heads where a config leaves ``head_dim`` unset (None)."""
    try:
        dims = _per_layer_head_dims(tc) or set()
        if not dims or None in dims:
            dims = {getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads}
        return sorted(int(d) for d in dims)
    except Exception:  # noqa: BLE001 - a config without attention heads (or an odd one): say nothing
        return None


def _head_dim_fix(cfg, tc) -> dict | None:
    """Gemma-4 head-dim override (dict form of the callable in shared/gpu/README.md), or None if not needed."""
    dims = _per_layer_head_dims(tc)
    if dims is None or len(dims) < 2:
        return None
    fix = {"allow_global_per_layer_attribute_access": True, "global_head_dim": max(dims)}
    return {"text_config": fix} if tc is not cfg else fix


# vLLM's FlashAttention kernels take head dims up to 256; Gemma-4's full-attention layers have wider heads (E4B:
# 512), which its Triton attention backend takes (it takes any width). Every pdqkit vLLM run used that backend
# (shared/gpu/README.md), so every vllm_config.yaml names it: for a model whose heads FlashAttention takes too it
# is harmless (the same attention, another kernel), and the comment there says it may go.
FLASH_ATTN_MAX_HEAD_DIM = 256


def _is_gemma4(plan) -> bool:
    """Whether the plan's model is a Gemma-4 (text-only or multimodal): only then does Gemma-4 text appear."""
    return plan.architecture.startswith("Gemma4")


def vllm_settings(plan, max_model_len: int = 8192) -> dict:
    """vLLM engine arguments (CLI spelling) for this checkpoint: what ``vllm_config.yaml`` holds. The Triton
    attention backend for every model (see :data:`FLASH_ATTN_MAX_HEAD_DIM`); the head-dim override only where
    :func:`_head_dim_fix` found one (Gemma-4)."""
    facts = plan.serving
    max_pos = facts["max_position_embeddings"] or max_model_len
    s = {"dtype": "bfloat16", "max-model-len": int(min(max_model_len, max_pos)), "attention-backend": "TRITON_ATTN"}
    if facts["multimodal"]:
        s["language-model-only"] = True
    if facts["head_dim_fix"]:
        s["hf-overrides"] = facts["head_dim_fix"]
    return s


def _attention_note(plan) -> str:
    """The comment on ``attention-backend``: why Triton, from this model's head dims (``serving["head_dims"]``);
    Gemma-4's reason only for a Gemma-4."""
    dims = plan.serving.get("head_dims") or []
    widest = max(dims) if dims else None
    if _is_gemma4(plan):
        this = f"; this model's widest: {widest}" if widest else ""
        return ("Triton attention takes Gemma-4's full-attention heads, which can be wider than FlashAttention's "
                f"{FLASH_ATTN_MAX_HEAD_DIM} (E4B: 512{this})")
    if widest is None:
        return "Triton attention (takes any head width), the backend pdqkit's vLLM runs use"
    if widest > FLASH_ATTN_MAX_HEAD_DIM:
        return (f"Triton attention takes this model's {widest}-wide heads (FlashAttention takes at most "
                f"{FLASH_ATTN_MAX_HEAD_DIM})")
    width = f"at most {widest}" if len(dims) > 1 else str(widest)
    return (f"Triton attention, the backend pdqkit's vLLM runs use; optional here: this model's heads ({width} wide) "
            "fit FlashAttention too, so the line may go (vLLM then picks a backend)")


def vllm_config_yaml(plan, max_model_len: int = 8192) -> str:
    s = vllm_settings(plan, max_model_len)
    model = "Gemma-4 " if _is_gemma4(plan) else ""
    notes = {
        "dtype": "activations and unquantized layers in bf16 (W4A16)",
        "max-model-len": "raise up to the model's max_position_embeddings if the KV cache fits",
        "attention-backend": _attention_note(plan),
        "language-model-only": "text only: drop this line to serve images/audio too (not tested by pdqkit)",
        "hf-overrides": f"{model}head-dim fix for transformers >= 5.14, whose config keeps a head dim per layer: "
                        "vLLM 0.26.0 reads one, the full-attention layers' (global_head_dim)",
    }
    lines = ["# vLLM 0.26.0 settings for this pdqkit W4A16 checkpoint:",
             "#   vllm serve <this dir> --config <this dir>/vllm_config.yaml",
             "# pdqkit's own W4A16 kernels (pdqkit vLLM plugin): export PDQKIT_VLLM_KERNEL=fast or exact"]
    for k, v in s.items():
        val = json.dumps(v) if isinstance(v, (dict, bool)) else (f'"{v}"' if isinstance(v, str) else str(v))
        lines += [f"# {notes[k]}", f"{k}: {val}"]
    return "\n".join(lines) + "\n"


# What the card's Lineage section shows of a step, in this order, where the step has it (not None): what it started
# from (a base's model, with the hub revision of a hub snapshot), how it was made (method, rounding mode, init),
# and what tells one distill step from another (phase, steps, tokens seen, teacher); then the seed.
LINEAGE_KEYS = ("model", "revision", "method", "rounding_mode", "init", "phase", "steps", "tokens_seen", "teacher",
                "seed")


def _step_value(key: str, value):
    """A step field as the card shows it: a distill step's ``teacher`` record (path + sha256) by the teacher
    directory's name (a machine's path says nothing on another one); the rest as recorded."""
    if key == "teacher":
        path = value.get("path") if isinstance(value, dict) else value
        return (PurePath(str(path)).name or str(path)) if path else None
    return value


def _lineage_lines(lineage: list[dict]) -> list[str]:
    out = []
    for s in lineage:
        what = {k: v for k in LINEAGE_KEYS if (v := _step_value(k, s.get(k))) is not None}
        frm = f" (from `{s['from']}`)" if "from" in s else ""
        out.append(f"- `{s.get('id')}`: **{s.get('kind')}**{frm} " + ", ".join(f"{k}={v}" for k, v in what.items()))
    return out


def model_card(plan, recipe, lineage: list[dict], *, files: dict, total_bytes: int,
               max_model_len: int = 8192) -> str:
    arch = plan.architecture
    s = vllm_settings(plan, max_model_len)  # the same settings as vllm_config.yaml
    fix = s.get("hf-overrides")
    llm_kw = ['dtype="bfloat16"', f"max_model_len={s['max-model-len']}",
              f'attention_backend="{s["attention-backend"]}"']
    if s.get("language-model-only"):
        llm_kw.append("language_model_only=True")
    if fix:
        llm_kw.append(f"hf_overrides={fix!r}")  # a Python literal (True/False/None), as the snippet is Python
    equiv = ("llmcompressor 0.14.x / compressed-tensors 0.19 on CUDA (the default GPU run)"
             if recipe.rounding == "fp32div" else
             "llmcompressor on CPU, or with CT_ENFORCE_EAGER=1, or llmcompressor <= 0.12 (compressed-tensors 0.17)")
    w = recipe.weights_dict()
    n_ignored = len(plan.quantization_config["ignore"])
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pdqkit, compressed-tensors, w4a16, int4]",
        "---",
        f"# W4A16 {arch} (compressed-tensors `pack-quantized`)",
        "",
        "Written by pdqkit (`python -m pack.quantize`): int4 weights "
        f"({'channelwise' if recipe.group_size == -1 else f'group {recipe.group_size}'}, symmetric min-max, no "
        "calibration data), bf16 activations. Loads unmodified in HF Transformers (compressed-tensors) and vLLM.",
        "",
        "## What is quantized",
        "",
        f"- {len(plan.targeted)} Linear layers (targets `{list(recipe.targets)}`), stored as `weight_packed` (int32, "
        "8 codes per word), `weight_scale` (bf16), `weight_shape`.",
        f"- Not quantized (kept bf16): every module matching `{list(recipe.ignore)}` ({n_ignored} Linear modules "
        "listed in config.json `quantization_config.ignore`), embeddings, norms, buffers.",
        f"- Weights: `{json.dumps(w)}`.",
        f"- Rounding mode `{recipe.rounding}`: byte-identical to {equiv}.",
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        *[f"| `{f}` | `{h}` |" for f, h in files.items()],
        "",
        f"Tensor data: {total_bytes / 1e9:.3f} GB. Provenance: `quant_recipe.json` (lineage, recipe, input and "
        "output sha256), `pdqkit_lineage.json`.",
        "",
        "## Lineage",
        "",
        *_lineage_lines(lineage),
        "",
        "## Load in HF Transformers",
        "",
        "```python",
        "import torch, transformers",
        f"model = transformers.{arch}.from_pretrained(\"PATH\", dtype=torch.bfloat16)",
        "# needs compressed-tensors; weights are decompressed to bf16 on the first forward",
        "```",
        "",
        "## Serve with vLLM (0.26.0)",
        "",
        "```bash",
        "vllm serve PATH --config PATH/vllm_config.yaml",
        "```",
        "",
        "```python",
        "from vllm import LLM",
        f"llm = LLM(model=\"PATH\", {', '.join(llm_kw)})",
        "```",
        "",
        "vLLM picks its own W4A16 kernel (Machete on Hopper, Marlin elsewhere). With pdqkit installed next to "
        "vLLM, the pdqkit vLLM plugin can serve these layers with pdqkit's Triton kernels instead: "
        "`PDQKIT_VLLM_KERNEL=fast` (fastest) or `PDQKIT_VLLM_KERNEL=exact` (bit-identical to vLLM's Marlin).",
        "",
    ]
    return "\n".join(lines)
