"""The quantization recipe and the ``quantization_config`` block of config.json (spec pack-quantized.md §3).

The block is built with compressed-tensors' own config models, exactly the way llmcompressor builds it:
each targeted module of the meta-device model gets the ``QuantizationScheme`` attached, then
``QuantizationConfig.from_pretrained(model)`` derives ``config_groups`` and the **expanded** ``ignore`` list
(every non-quantized module whose class was quantized somewhere, in ``named_modules()`` order, §3.2), and
``ModelCompressor.update_config``'s layout adds ``version``/``quant_method``/``sparsity_config``/
``transform_config``. The result is the compressed-tensors 0.19.0 form with ``"version": "0.19.0"`` under
compressed-tensors 0.17.0 (vLLM 0.26.0's pin) and 0.19.0 alike (§3.1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import QuantizeError

if TYPE_CHECKING:  # torch-free import: the CLI builds its parser (DEFAULT_IGNORE) before importing torch
    import torch

    from .observer import QuantScheme

__all__ = ["DEFAULT_IGNORE", "CT_CONFIG_VERSION", "ROUNDING_MODES", "QuantRecipe", "quantization_config"]

# recipe R's ignore list (seed recipe): towers, per-layer-embedding gate/projection, embedders, lm_head
DEFAULT_IGNORE = ("re:.*vision_tower.*", "re:.*audio_tower.*", "re:.*per_layer_input_gate.*",
                  "re:.*per_layer_projection.*", "re:.*embed_vision.*", "re:.*embed_audio.*", "lm_head")
# the compressed-tensors release whose config.json form we emit (the one llmcompressor 0.14.0.1 writes)
CT_CONFIG_VERSION = "0.19.0"
# how codes are rounded (spec §1.3, pack.observer): defined here, torch-free, for the CLI's --rounding choices
ROUNDING_MODES = ("fp32div", "eager")
# llmcompressor/compressed-tensors releases whose output each rounding mode reproduces (spec §1.3)
EQUIVALENT_TO = {
    "fp32div": {"llmcompressor": "0.14.0.1", "compressed_tensors": "0.19.0", "device": "cuda"},
    "eager": {"llmcompressor": "0.14.0.1", "compressed_tensors": "0.19.0", "device": "cpu"},
}


@dataclass(frozen=True)
class QuantRecipe:
    """W4A16 symmetric min-max recipe: which modules (``targets`` minus ``ignore``) and how (group, rounding)."""

    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    group_size: int = 128
    rounding: str = "fp32div"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if not self.targets:
            raise QuantizeError("targets is empty: nothing would be quantized")
        for pat in (*self.targets, *self.ignore):
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise QuantizeError(f"targets/--ignore/--extra-ignore {pat!r}: not a valid regular "
                                        f"expression ({e})") from None
        if self.rounding not in ROUNDING_MODES:
            raise QuantizeError(f"--rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        try:
            self.observer_scheme()
        except ValueError as e:
            raise QuantizeError(f"--group-size: {e}") from None

    def observer_scheme(self) -> QuantScheme:
        from .observer import QuantScheme

        return QuantScheme(num_bits=4, group_size=self.group_size, symmetric=True, rounding=self.rounding)

    @property
    def method(self) -> str:
        g = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"w4a16_{g}_sym_minmax"

    def weights_dict(self) -> dict:
        """The recipe's ``weights`` args as a user writes them for llmcompressor (recipe R)."""
        strategy = "channel" if self.group_size == -1 else "group"
        w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": strategy}
        if strategy == "group":
            w["group_size"] = self.group_size
        w.update(observer="minmax", actorder=None, dynamic=False)
        return w

    def config_groups(self) -> dict:
        return {"group_0": {"targets": list(self.targets), "weights": self.weights_dict(),
                            "input_activations": None, "output_activations": None}}

    def ct_scheme(self):
        """compressed-tensors ``QuantizationScheme`` of this recipe (format pack-quantized)."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        return QuantizationScheme(targets=list(self.targets), weights=QuantizationArgs(**self.weights_dict()),
                                  input_activations=None, output_activations=None, format="pack-quantized")


def quantization_config(model: torch.nn.Module, targeted: dict[str, torch.nn.Module], recipe: QuantRecipe) -> dict:
    """The ``quantization_config`` dict llmcompressor writes for ``recipe`` on ``model`` (spec §3.1).

    ``model`` is the meta-device model, ``targeted`` its modules matched by the recipe; the scheme is
    attached to them for compressed-tensors' ``QuantizationConfig.from_pretrained`` and removed again.
    """
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    scheme = recipe.ct_scheme()
    try:
        for module in targeted.values():
            module.quantization_scheme = scheme
            module.quantization_status = QuantizationStatus.COMPRESSED
        qc = QuantizationConfig.from_pretrained(model, format="pack-quantized")
    finally:
        for module in targeted.values():
            for attr in ("quantization_scheme", "quantization_status"):
                if hasattr(module, attr):
                    delattr(module, attr)
    if qc is None:
        raise QuantizeError("no module matches the recipe's targets minus ignore: nothing to quantize")
    # the layout of compressed-tensors' ModelCompressor.update_config, pinned to the 0.19.0 version string
    d = {"version": CT_CONFIG_VERSION, "quant_method": "compressed-tensors", "sparsity_config": {},
         "transform_config": {}, **qc.model_dump(exclude=["quant_method"])}
    return _ct019_form(d)


# keys of the 0.19.0 form (spec §3.1); 0.17.x dumps exactly these, 0.20 drops null weight args and adds
# moe_sparsity_config: normalise so the file does not depend on the installed compressed-tensors
_CT019_TOP = ("config_groups", "format", "global_compression_ratio", "ignore", "kv_cache_scheme", "quant_method",
              "quantization_status", "sparsity_config", "transform_config", "version")
_CT019_WEIGHT_DEFAULTS = {"actorder": None, "block_structure": None, "dynamic": False, "observer_kwargs": {},
                          "scale_dtype": None, "zp_dtype": None}


def _ct019_form(d: dict) -> dict:
    d = {k: d.get(k) for k in _CT019_TOP}
    for group in d["config_groups"].values():
        w = group.get("weights")
        if isinstance(w, dict):
            for k, v in _CT019_WEIGHT_DEFAULTS.items():
                w.setdefault(k, v)
    return d
