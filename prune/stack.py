"""The language stack of a supported model, and layer-by-layer calibration over it.

Calibration never runs the whole model at once. :func:`collect_mlp_stats`:

1. moves the decoder's non-layer modules (embeddings, PLE tables, rotary) to the device, turns every batch of
   calibration ids into layer-0 inputs (hidden states + per-batch context) and moves those modules back;
2. for each decoder layer in turn: moves the layer to the device, runs it on every cached batch with a forward
   pre-hook on ``mlp.down_proj`` (whose input IS the MLP intermediate ``act_fn(gate(x)) * up(x)``, ``[B, S, I]``)
   that accumulates per-channel statistics, replaces the cache with the layer's outputs, moves the layer back,
   and hands the layer's statistics to an optional ``on_layer`` callback (which may slice the layer now: the
   layers after it read only the cached outputs, computed with the unpruned weights).

With ``gram=True`` the same hook also accumulates the layer's Gram matrix ``C = sum_t a_t a_t^T`` (float64
``[I, I]``, on the calibration device) for the down_proj refit (:mod:`prune.refit`). That is ``8 * I^2`` bytes
per layer (E4B, I = 10240: 0.84 GB; a double-wide layer, I = 20480: 3.4 GB), plus a per-batch float64 copy of
the intermediate (``8 * tokens * I``). With ``on_layer`` the Gram is dropped right after the callback, so only
one layer's Gram is alive at a time.

Device memory therefore holds one decoder layer plus the activation cache: hidden states ``N*S*H`` (bf16) and,
for Gemma-4, the KV-shared states ``N*S*kv_heads*head_dim*2`` per attention type. Gemma-4's per-layer inputs
(``N*S*L*ple_dim``, 4x the hidden cache on E4B) stay in CPU memory and go to the device one layer slice at a time.

Gemma-4 specifics (transformers 5.17 ``Gemma4TextModel.forward``, reproduced per batch by :class:`Gemma4Stack`):
each layer gets the per-layer input slice ``ple[:, :, i]``, the rotary embeddings and the mask of ITS attention
type (sliding or full), and a per-batch ``shared_kv_states`` dict: the last non-shared layer of each type stores
its K/V there and the KV-shared layers read it, so the dict of each batch lives as long as the cache does.
Llama-style models (:class:`UniformStack`) give every layer the same keyword arguments: they are captured at
layer 0 by a pre-hook that stops the forward there.
"""
from __future__ import annotations

from collections import UserDict
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["SUPPORTED_MODEL_TYPES", "SUPPORTED_ARCHITECTURES", "check_supported", "language_stack", "ChannelStats",
           "collect_mlp_stats"]

# model_type of the checkpoint's config -> the stack class that runs its decoder layer by layer
SUPPORTED_MODEL_TYPES = ("gemma4", "gemma4_text", "llama")
# the classes with a language-model head whose stack prune runs (taylor needs the head's loss)
SUPPORTED_ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM", "LlamaForCausalLM")


def check_supported(config, where: str = "checkpoint") -> None:
    """Raise ``ValueError`` unless ``config`` (an HF config) is a model prune knows how to run and slice."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        arch = ",".join(getattr(config, "architectures", None) or ["?"])
        raise ValueError(f"{where}: architecture {arch} (model_type {mt}) is not supported; prune handles Gemma-4 "
                         f"(gemma4, gemma4_text) and Llama (gate/up/down MLP) language stacks")
    archs = getattr(config, "architectures", None) or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: architecture {','.join(archs) or '(none in config.json)'} is not supported; prune "
                         f"handles {', '.join(SUPPORTED_ARCHITECTURES)} (a language model with its head)")
    tc = config.get_text_config()
    if getattr(tc, "enable_moe_block", False):
        raise ValueError(f"{where}: Gemma-4 MoE models (enable_moe_block) are not supported; only dense MLPs")


@dataclass
class ChannelStats:
    """Per-channel statistics of one MLP's intermediate activations ``a = act_fn(gate(x)) * up(x)``, float64:
    ``sum_abs[j] = sum_t |a_tj|``, ``sum_sq[j] = sum_t a_tj^2`` over ``tokens`` calibration tokens.

    With ``gram_device`` set, also ``gram = sum_t a_t a_t^T`` (float64 ``[I, I]`` on that device): the normal
    matrix of the down_proj refit. It is formed in float64 from the (bf16) intermediate, whose products are
    exact in float64, so it does not depend on TF32 settings or, in practice, on the batch split."""

    width: int
    sum_abs: torch.Tensor = field(init=False)
    sum_sq: torch.Tensor = field(init=False)
    tokens: int = 0
    gram_device: torch.device | str | None = None
    gram: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self):
        self.sum_abs = torch.zeros(self.width, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.width, dtype=torch.float64)
        if self.gram_device is not None:
            self.gram = torch.zeros(self.width, self.width, dtype=torch.float64, device=self.gram_device)

    def hook(self, module, args):
        """Forward pre-hook for ``down_proj``: ``args[0]`` is the intermediate ``[B, S, I]``."""
        a = args[0].detach().float().reshape(-1, self.width)
        # per-batch sums in fp32 on the device (<= a few thousand tokens each), accumulated in fp64 on the CPU
        self.sum_abs += a.abs().sum(0).cpu().double()
        self.sum_sq += a.square().sum(0).cpu().double()
        self.tokens += a.shape[0]
        if self.gram is not None:
            a64 = a.to(self.gram.device, torch.float64)
            self.gram.addmm_(a64.T, a64)

    def l2(self) -> torch.Tensor:
        return self.sum_sq.sqrt()

    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.tokens, 1)


class _Stack:
    """A decoder (``model.get_decoder()``) whose layers are run one at a time."""

    def __init__(self, model):
        self.decoder = model.get_decoder()
        self.layers = self.decoder.layers
        self.device = None

    def outer_modules(self) -> list[nn.Module]:
        """Everything of the decoder but its layers (embeddings, rotary, final norm)."""
        return [m for name, m in self.decoder.named_children() if name != "layers"]

    def begin(self, input_ids: torch.Tensor):
        """``(hidden, ctx)``: layer-0 input of one batch and what the layers need besides it."""
        raise NotImplementedError

    def run_layer(self, i: int, hidden: torch.Tensor, ctx) -> torch.Tensor:
        raise NotImplementedError


class Gemma4Stack(_Stack):
    """Gemma-4 text decoder (``Gemma4TextModel``, also inside ``Gemma4ForConditionalGeneration``)."""

    def __init__(self, model):
        super().__init__(model)
        self.config = self.decoder.config
        self._shape_ctx = {}  # (B, S) -> {layer_type: (position_embeddings, mask)}: they depend on shape only
        # the multimodal model's forward reads image / video / audio placeholder ids as the pad token (embedding
        # and per-layer inputs): a calibration text that spells a placeholder must be read the same way
        outer = model.config if hasattr(model.config, "text_config") else None
        ids = [getattr(outer, f"{m}_token_id", None) for m in ("image", "video", "audio")] if outer else []
        self.placeholders = [i for i in ids if i is not None]

    def begin(self, input_ids):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        from pack.hfcompat import cache_kwarg

        d = self.decoder
        mask = None
        if self.placeholders:
            mask = torch.isin(input_ids, torch.tensor(self.placeholders, device=input_ids.device))
            input_ids = torch.where(mask, self.config.pad_token_id, input_ids)
        embeds = d.embed_tokens(input_ids)
        ple = None
        if d.hidden_size_per_layer_input:  # [B, S, L, ple_dim], kept on the CPU (see module docstring)
            ple_embeds = embeds
            if mask is not None:   # as Gemma4Model.forward: the raw pad row where a placeholder was
                pad = d.embed_tokens.weight[self.config.pad_token_id].view(1, 1, -1)
                ple_embeds = torch.where(mask[..., None], pad, embeds)
            ple = d.project_per_layer_inputs(embeds, d.get_per_layer_inputs(input_ids, ple_embeds)).cpu()
        pos = torch.arange(input_ids.shape[1], device=embeds.device).unsqueeze(0)
        key = tuple(input_ids.shape)
        if key not in self._shape_ctx:
            mk = {"config": self.config, "inputs_embeds": embeds, "attention_mask": None,
                  cache_kwarg(create_causal_mask): None, "position_ids": pos}
            masks = {"full_attention": create_causal_mask(**mk),
                     "sliding_attention": create_sliding_window_causal_mask(**mk)}
            self._shape_ctx[key] = {t: (d.rotary_emb(embeds, pos, t), masks[t]) for t in set(self.config.layer_types)}
        return embeds, {"ple": ple, "pos": pos, "kv": UserDict(), "shape": key}

    def run_layer(self, i, hidden, ctx):
        layer_type = self.config.layer_types[i]
        pos_emb, mask = self._shape_ctx[ctx["shape"]][layer_type]
        ple = ctx["ple"][:, :, i, :].to(hidden.device) if ctx["ple"] is not None else None
        return self.layers[i](hidden, ple, shared_kv_states=ctx["kv"], position_embeddings=pos_emb,
                              attention_mask=mask, position_ids=ctx["pos"])


class _Caught(Exception):
    pass


class UniformStack(_Stack):
    """Decoders whose layers all take the same keyword arguments (Llama): captured at layer 0."""

    def begin(self, input_ids):
        seen = {}

        def catch(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            raise _Caught

        handle = self.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.decoder(input_ids=input_ids, use_cache=False)
        except _Caught:
            pass
        finally:
            handle.remove()
        kwargs = dict(seen["kwargs"])
        hidden = seen["args"][0] if seen["args"] else kwargs.pop("hidden_states")
        return hidden, kwargs

    def run_layer(self, i, hidden, ctx):
        out = self.layers[i](hidden, **ctx)
        return out[0] if isinstance(out, tuple) else out


def language_stack(model) -> _Stack:
    """The layer-by-layer runner of ``model``'s language decoder (see :data:`SUPPORTED_MODEL_TYPES`)."""
    check_supported(model.config)
    return (UniformStack if model.config.model_type == "llama" else Gemma4Stack)(model)


@torch.no_grad()  # not inference_mode: parameters moved to the device and back must stay normal tensors
def collect_mlp_stats(model, input_ids: torch.Tensor, *, batch_size: int = 8, device="cpu",
                      progress=None, gram: bool = False, on_layer=None) -> list[ChannelStats]:
    """Per-layer :class:`ChannelStats` of the language stack's MLPs over calibration ``input_ids``
    (int64 ``[N, S]``), computed layer by layer on ``device`` (the model itself stays where it is, e.g. CPU).

    ``progress``: optional tqdm-like object, advanced once per batch and per (layer, batch).
    ``gram``: also accumulate each layer's Gram matrix on ``device`` (:class:`ChannelStats`).
    ``on_layer(i, stats)``: called once per layer, in order, as soon as layer ``i`` has seen every batch and is
    back home; every layer's inputs come from the unpruned layers before it even if the callback slices them.
    With a callback the returned stats carry no Gram (each is dropped after its callback)."""
    stack = language_stack(model)
    device = torch.device(device)
    home = next(model.parameters()).device
    batches = input_ids.split(batch_size)
    outer = stack.outer_modules()
    for m in outer:
        m.to(device)
    try:
        cache = [list(stack.begin(b.to(device))) for b in batches]
        if progress is not None:
            progress.update(len(batches))
    finally:
        for m in outer:
            m.to(home)
    stats = []
    for i, layer in enumerate(stack.layers):
        mlp = layer.mlp
        st = ChannelStats(mlp.down_proj.in_features, gram_device=device if gram else None)
        handle = mlp.down_proj.register_forward_pre_hook(st.hook)
        layer.to(device)
        try:
            last = i == len(stack.layers) - 1
            for entry in cache:
                out = stack.run_layer(i, entry[0], entry[1])
                entry[0] = None if last else out  # the last layer's outputs are not needed
                if progress is not None:
                    progress.update(1)
        finally:
            handle.remove()
            layer.to(home)
        if on_layer is not None:
            on_layer(i, st)
            st.gram = None
        stats.append(st)
    return stats
