"""Which tensors of a checkpoint are quantized, the way llmcompressor decides it (spec pack-quantized.md §1.5, §2.2).

llmcompressor loads the model with transformers, matches ``targets``/``ignore`` against the model's own module
tree, and saves ``model.state_dict()``. pdqkit does the same without loading a single weight: the model is
built from ``config.json`` on the **meta device** (transformers' own architecture class), and

* targeted modules = compressed-tensors' ``match_named_modules(model, targets, ignore)`` (class name anywhere
  in the MRO, exact names, ``re:`` + ``re.match``; same helper in compressed-tensors 0.17.0 and 0.19.0);
* the tensors written = the model's ``state_dict()`` keys minus tied aliases (transformers'
  ``remove_tied_weights_from_state_dict``): so KV-shared Gemma-4 layers get no ``k_proj``/``v_proj``/
  ``k_norm``, a tied ``lm_head`` is not written, non-persistent buffers are absent.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import QuantizeError

__all__ = ["ModelPlan", "load_config", "hf_config", "build_meta_model", "plan_model"]

_QUANT_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx",
                   ".weight_global_scale", ".qweight", ".qzeros", ".scales")


@dataclass(frozen=True)
class ModelPlan:
    """What the writer needs to know about a checkpoint's model for one recipe, derived from the meta-device model.

    Model-free and JSON-able (except ``config``, which is config.json as read): pack.plancache keeps it across runs.
    """

    config: dict                                # config.json as read
    architecture: str                           # e.g. "Gemma4ForConditionalGeneration"
    targeted: tuple[str, ...]                   # module names of the targeted Linears, named_modules() order
    saved: dict[str, tuple[int, ...]]           # state_dict key save_pretrained writes -> shape, state_dict order
    keep_fp32: tuple[str, ...]                  # module-name fragments transformers keeps in fp32
    quantization_config: dict                   # config.json's quantization_config block for the recipe
    serving: dict                               # pack.card.serving_facts of the model's config
    # transformers modules whose classes make up the model and its configs (bases included): what else the plan
    # was derived from, for pack.plancache to check on a hit; provenance, not part of the plan's value
    sources: tuple[str, ...] = field(default=(), compare=False)


def load_config(ckpt: Path) -> dict:
    """``config.json`` of ``ckpt`` as a dict; a clear error when it is missing, garbled or already quantized."""
    f = Path(ckpt) / "config.json"
    if not Path(ckpt).is_dir():
        raise QuantizeError(f"{ckpt}: no such checkpoint directory")
    if not f.is_file():
        raise QuantizeError(f"{f}: missing; pass a Hugging Face checkpoint directory (config.json + safetensors)")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantizeError(f"{f}: not valid JSON ({e}); restore the checkpoint's original config.json") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise QuantizeError(f"{f}: not a transformers model config (no model_type); restore the original config.json")
    if cfg.get("quantization_config") or any(
            isinstance(v, dict) and v.get("quantization_config") for v in cfg.values()):
        method = (cfg.get("quantization_config") or {}).get("quant_method", "?")
        raise QuantizeError(f"{f}: the checkpoint is already quantized (quantization_config, quant_method "
                            f"{method!r}); pass the original bf16 checkpoint")
    return cfg


def _check_dtype(cfg: dict, f: Path) -> None:
    # the language stack's dtype (what the quantized Linears hold); tower sub-configs are not checked
    for where, c in (("", cfg), ("text_config.", cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {})):
        for key in ("dtype", "torch_dtype"):
            d = c.get(key)
            if d is not None and d != "bfloat16":
                raise QuantizeError(
                    f"{f}: {where}{key} is {d!r}; pdqkit writes W4A16 from bf16 checkpoints: convert it first, "
                    f"e.g. model.to(torch.bfloat16).save_pretrained(dir) (sets dtype bfloat16)")


def hf_config(ckpt: Path, cfg: dict):
    """The transformers config object that ``AutoConfig.from_pretrained(ckpt)`` builds, built from ``cfg``, the
    dict this run read from config.json, instead of from a second read of the file: a file rewritten between two
    reads would give a plan of other bytes than those read, checked and keyed (pack.plancache).

    The steps are transformers 5.x's own (``AutoConfig.from_pretrained`` -> ``PreTrainedConfig.get_config_dict`` ->
    ``from_dict``): special floats decoded, the hub snapshot's commit hash (an attribute in 5.17; 5.24 drops the key),
    its ``mistral`` + ``layer_types`` -> ``ministral`` rule, the class of ``model_type``, ``name_or_path``. A config
    whose ``auto_map`` names an ``AutoConfig`` but whose model_type transformers lacks is refused with transformers'
    message, without its interactive prompt (pdqkit never runs a checkpoint's code). A config listing
    ``configuration_files`` (which transformers may take from a versioned ``config.X.json``) goes through
    ``from_pretrained`` itself, and so does every config with a transformers that lacks the internals used here (the
    second read is then back).
    """
    from transformers import AutoConfig

    try:  # transformers internals (5.16, 5.17 and 5.24 have them): a version without them reads the file again
        from transformers.configuration_utils import PreTrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.utils.hub import extract_commit_hash

        decode = PreTrainedConfig._decode_special_floats
    except (ImportError, AttributeError):
        return AutoConfig.from_pretrained(str(ckpt))
    if "configuration_files" in cfg:
        return AutoConfig.from_pretrained(str(ckpt))
    d = decode(copy.deepcopy(cfg))
    d["_commit_hash"] = extract_commit_hash(os.path.join(str(ckpt), "config.json"), None)
    model_type = d["model_type"]
    if model_type == "mistral" and "layer_types" in d:
        d["model_type"] = model_type = "ministral"
    if model_type not in CONFIG_MAPPING:
        auto_map = d.get("auto_map")
        if isinstance(auto_map, dict) and "AutoConfig" in auto_map:
            raise ValueError(f"The repository {ckpt} contains custom code which must be executed to correctly load "
                             f"the model. You can inspect the repository content at {os.path.abspath(ckpt)} .")
        raise ValueError(f"The checkpoint you are trying to load has model type `{model_type}` but Transformers "
                         f"does not recognize this architecture. This could be because of an issue with the "
                         f"checkpoint, or because your version of Transformers is out of date.")
    return CONFIG_MAPPING[model_type].from_dict(d, name_or_path=str(ckpt))


def build_meta_model(ckpt: Path, cfg: dict) -> tuple[str, torch.nn.Module]:
    """Instantiate the checkpoint's architecture from its config dict ``cfg`` on the meta device (no weights)."""
    import transformers

    f = Path(ckpt) / "config.json"
    _check_dtype(cfg, f)
    try:
        config = hf_config(ckpt, cfg)
    except Exception as e:  # noqa: BLE001 - unknown model_type (ValueError/KeyError) or inconsistent config
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise QuantizeError(f"{f}: transformers {transformers.__version__} cannot read this config "
                            f"(model_type {cfg.get('model_type')!r}: {msg}); use an architecture transformers "
                            f"supports natively (no trust_remote_code)") from None
    archs = cfg.get("architectures") or []
    if not archs:
        raise QuantizeError(f"{f}: no 'architectures' entry; add the model class, e.g. "
                            f"\"architectures\": [\"Gemma4ForConditionalGeneration\"]")
    arch = archs[0]
    cls = getattr(transformers, arch, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise QuantizeError(f"{f}: unknown architecture {arch!r}: transformers {transformers.__version__} has no "
                            f"such model class; pass a checkpoint of an architecture transformers supports")
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - any inconsistency of the config surfaces here
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise QuantizeError(f"{f}: transformers cannot build {arch} from this config ({type(e).__name__}: "
                            f"{msg}); restore the checkpoint's original config.json") from None
    return arch, model.eval()


def _saved_keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """state_dict keys ``save_pretrained`` would write (tied aliases removed), with meta shapes."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    return {k: tuple(v.shape) for k, v in sd.items()}


def _class_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """The transformers modules that define the classes of ``model``'s modules and of its config and sub-configs,
    their base classes included (a sub-config left out of config.json takes its class's default, which may live
    in another model package than any model_type config.json names)."""
    from transformers.configuration_utils import PreTrainedConfig

    found: set[str] = set()

    def add(obj) -> None:
        found.update(c.__module__ for c in type(obj).__mro__ if c.__module__.startswith("transformers."))

    for m in model.modules():
        add(m)
    configs, seen = [model.config], set()
    while configs:
        c = configs.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        add(c)
        configs += [v for v in vars(c).values() if isinstance(v, PreTrainedConfig)]
    return tuple(sorted(found))


def plan_model(ckpt: Path, recipe, config: dict | None = None) -> ModelPlan:
    """Config -> meta model -> targeted Linears, the tensor keys to write, the quantization_config block.

    ``recipe``: a pack.qconfig.QuantRecipe. ``config``: ``ckpt``'s config.json as :func:`load_config` returned it,
    if the caller has it (the model is then built from that dict: config.json is not read again); else it is read
    here. Imports transformers and compressed-tensors (~1.5 s of a CPU run): pack.plancache.cached_plan keeps the
    result for the next run with the same inputs."""
    from compressed_tensors.utils.match import match_named_modules
    from transformers.conversion_mapping import get_model_conversion_mapping

    from .card import serving_facts
    from .qconfig import quantization_config

    cfg = load_config(ckpt) if config is None else config
    arch, model = build_meta_model(ckpt, cfg)
    if get_model_conversion_mapping(model, add_legacy=False):
        raise QuantizeError(f"{Path(ckpt) / 'config.json'}: transformers renames or converts {arch}'s checkpoint "
                            f"tensors on load; pdqkit's streaming writer supports architectures stored as-is "
                            f"(e.g. Gemma-4, Llama, Qwen)")
    targeted = dict(match_named_modules(model, list(recipe.targets), list(recipe.ignore)))
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    qcfg = quantization_config(model, targeted, recipe)
    return ModelPlan(cfg, arch, tuple(targeted), _saved_keys(model), keep, qcfg, serving_facts(model.config),
                     _class_modules(model))


def looks_quantized(name: str) -> bool:
    return name.endswith(_QUANT_SUFFIXES)
