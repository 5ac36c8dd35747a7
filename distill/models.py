"""Teacher/student loading and the student-side training module.

A checkpoint is loaded with the class its ``config.json`` names (``Gemma4ForCausalLM`` or the multimodal
``Gemma4ForConditionalGeneration``). Distillation only ever runs the *language stack*: ``get_decoder()``
(``Gemma4TextModel``, the same module in both classes) on token ids, then the tied ``lm_head``. Vision/audio
towers and their embedders are frozen and never touched, so the written checkpoint carries them bit-identical
(bf16 -> fp32 master -> bf16 is exact; under ``--precision bf16-master`` they simply stay bf16).

:class:`DistillModule` wraps the student so that one ``forward`` is one loss (or one decode step): under
FSDP2 it is the root module, which makes the root-owned parameters (embeddings, tied ``lm_head``, final norm)
unsharded exactly while the loss and the sampling run.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from pack.hfcompat import cache_kwarg
from pack.hfload import check_weight_dtypes, from_pretrained_checked, read_config, weight_files

from .losses import chunked_logit_loss, hidden_state_loss, lm_logits, per_token_loss_fn

__all__ = [
    "load_model", "text_config", "decoder_layers", "check_pair", "set_trainable", "matmul_params",
    "capture_layer_outputs", "DistillModule", "limit_checkpointing", "compile_decoder_layers", "to_bf16_layout",
    "MasterWeights",
]

# language-stack parameters that are embedding tables (frozen unless train_embeddings): the tied lm_head is
# embed_tokens; the per-layer-embedding table is E4B's largest tensor (262144 x 10752)
EMBEDDING_PARAMS = ("embed_tokens.weight", "embed_tokens_per_layer.weight")


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
               attn_implementation: str = "sdpa") -> nn.Module:
    """Load the checkpoint dir ``path`` with the class its config names, in ``dtype``, on ``device``, eval mode."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    config = read_config(path, QUANTIZED_FIX)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    if attn_implementation == "pdq_hybrid":
        from .attention import register

        register()
    attn = attn_implementation
    if "text_config" in (getattr(config, "sub_configs", None) or {}):
        # a composite model (Gemma-4 with its towers): only the language model runs here (the data is text), so the
        # towers keep transformers' own choice, which takes what each supports (transformers 5.24's audio tower has
        # no SDPA, and a plain "sdpa" for the whole model is refused there)
        attn = {"": attn_implementation, "text_config": attn_implementation}
    # a tensor the files lack (left randomly initialised: the run would distil from, or train, noise), weights that
    # do not match config.json, an unreadable file: one line each (pack/hfload.py)
    model = from_pretrained_checked(cls, path, cls.__name__, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


QUANTIZED_FIX = ("distill takes bf16 checkpoints (the unpruned teacher, the pruned student) and pack.quantize runs "
                 "on its output")


def check_checkpoint(path: str | Path, role: str) -> None:
    """What can be checked of checkpoint dir ``path`` (``role``: --teacher or --student) before it loads: its
    config (readable, not a quantized model's), its weight files (present, their index valid), their dtypes
    (floating point)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{role} {path}: no such checkpoint directory")
    read_config(path, QUANTIZED_FIX)
    check_weight_dtypes(path, weight_files(path), "distill", QUANTIZED_FIX)


def config_vocab_size(path: str | Path) -> int:
    """The vocabulary size the checkpoint dir ``path``'s config.json gives its language model (no weights read)."""
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face checkpoint directory")
    config = transformers.AutoConfig.from_pretrained(path)
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def check_pair(teacher: nn.Module, student: nn.Module, teacher_path, student_path) -> None:
    """Teacher and student must share tokenizer-facing and residual-stream shapes (layer-to-layer matching)."""
    tc, sc = text_config(teacher), text_config(student)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "final_logit_softcapping"):
        a, b = getattr(tc, field, None), getattr(sc, field, None)
        if a != b:
            raise ValueError(f"{student_path}: student {field}={b} differs from teacher {teacher_path} {field}={a}; "
                             "distillation needs the same vocabulary, hidden size and depth")


def set_trainable(model: nn.Module, train_embeddings: bool = False, trainable: str = "all") -> list[str]:
    """Freeze everything but the language stack (and its embedding tables, an untied ``lm_head`` included, unless
    ``train_embeddings``); with ``trainable="mlp"`` everything but the decoder layers' MLP weights
    (``layers.N.mlp.*``).

    Returns the names (as in ``model.named_parameters()``) of the trainable parameters."""
    decoder = model.get_decoder()
    if trainable == "mlp":
        keep = {id(p) for layer in decoder.layers for p in layer.mlp.parameters()}
    else:
        keep = {id(p) for n, p in decoder.named_parameters()
                if train_embeddings or not n.endswith(EMBEDDING_PARAMS)}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if train_embeddings and head is not None:   # an untied lm_head (Llama's) is an embedding table too; a tied
            keep.add(id(head.weight))               # one is embed_tokens, in already
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(id(p) in keep)
        if p.requires_grad:
            names.append(n)
    if not names:
        raise ValueError("no trainable parameters in the student's language stack")
    return names


def matmul_params(model: nn.Module) -> int:
    """Weights that take part in a matmul for every token: all ``nn.Linear`` of the language stack plus the
    (tied) ``lm_head``; embedding lookups, norms and the vision/audio towers are not counted (MFU's ``N``)."""
    decoder = model.get_decoder()
    n = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, nn.Linear))
    return n + model.get_output_embeddings().weight.numel()


def to_bf16_layout(model: nn.Module) -> nn.Module:
    """Cast ``model`` in place to the layout ``from_pretrained(dtype=torch.bfloat16)`` gives it: every floating
    parameter and buffer bf16 except the RoPE frequency buffers (``*inv_freq``), which transformers computes and
    keeps in fp32 (a plain ``model.to(torch.bfloat16)`` would round them). Parameters keep their identity (tied
    weights stay tied). A no-op on a model loaded in bf16; returns ``model``."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
        for mod in model.modules():
            for name, b in list(mod._buffers.items()):
                if (b is not None and b.is_floating_point() and b.dtype != torch.bfloat16
                        and not name.endswith("inv_freq")):
                    mod._buffers[name] = b.to(torch.bfloat16)
    return model


class MasterWeights(nn.Module):
    """fp32 master copies of a bf16 model's trainable parameters (``--precision bf16-master``).

    ``named_params``: ``(name, parameter)`` pairs (bf16, requiring grad), e.g. the trainable
    ``DistillModule.named_parameters()``. Each master is an fp32 ``nn.Parameter`` initialised to the exact value
    of its bf16 parameter and registered under the same dotted name (in a tree of empty modules mirroring the
    model's), so ``torch.distributed.checkpoint.state_dict.get_state_dict(masters, optimizer)`` names the masters
    and their AdamW state exactly as a bf16-mixed run names its fp32 weights. ``masters`` lists them in the
    order of ``named_params`` (the optimizer's order).

    One optimizer step: :meth:`grads_from_model` (``master.grad = param.grad.float()``; the bf16 grad is freed),
    clip and step the optimizer on ``masters``, :meth:`copy_to_model` (``param = bf16(master)``, round to nearest
    even). So the bf16 parameters are always the masters rounded, and the masters + optimizer state are the
    whole training state. Memory per trainable parameter: bf16 weight 2 + bf16 grad 2 + fp32 master 4 + AdamW
    moments 8 = 16 bytes, the same as bf16-mixed's fp32 weight 4 + fp32 grad 4 + moments 8 (during the optimizer
    step the fp32 master grads, 4, stand in for the freed bf16 grads, 2).
    """

    def __init__(self, named_params):
        super().__init__()
        masters, params = [], []
        for name, p in named_params:
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                child = mod._modules.get(part)
                if child is None:
                    child = nn.Module()
                    mod.add_module(part, child)
                mod = child
            m = nn.Parameter(p.detach().to(torch.float32, copy=True))
            mod.register_parameter(leaf, m)
            masters.append(m)
            params.append(p)
        if not masters:
            raise ValueError("MasterWeights: no parameters given")
        self.masters: list[nn.Parameter] = masters
        self._model_params: list[nn.Parameter] = params

    @torch.no_grad()
    def grads_from_model(self) -> None:
        """``master.grad = param.grad.float()`` (None stays None), then drop the model's bf16 grads."""
        for m, p in zip(self.masters, self._model_params):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the masters into the model's bf16 parameters (in place: ``param.copy_(master)``)."""
        torch._foreach_copy_(self._model_params, self.masters)


def limit_checkpointing(model: nn.Module, n_layers: int | None) -> int:
    """After :func:`pack.hfcompat.checkpointing_enable`: keep activation checkpointing on the first ``n_layers``
    decoder layers only (None: all). The others keep their activations (more memory, no recompute); values are the
    same either way. Returns the number of checkpointed layers."""
    layers = decoder_layers(model)
    n = len(layers) if n_layers is None else min(int(n_layers), len(layers))
    for layer in layers[max(n, 0):]:  # (n < 0: all off, as n = 0)
        layer.gradient_checkpointing = False
    return n


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` each decoder layer's ``forward`` (not ``__call__``: forward hooks such as
    :func:`capture_layer_outputs` stay in eager around it, so adding/removing hooks every step does not recompile).
    Layers of one kind share compiled code; the dynamo cache limit is raised to hold every (layer kind x grad mode)
    variant of both models.

    Activation checkpointing: transformers <= 5.17 applies it in ``__call__``, around the compiled forward;
    transformers 5.24 in a wrapper that is the layer class's ``forward``, so the checkpoint is traced inside the
    compiled code. There Dynamo refuses a checkpointed region that writes outside itself (Gemma-4's KV-sharing layers
    store their K/V in a dict the later layers read) and runs the layer eagerly, unless told not to replay such
    writes in the backward's recompute. Not replaying them is exact here: the recompute would store the same K/V
    again, and the layers that read them are recomputed before it (the backward runs from the last layer), reading
    the forward's. So the switch is set (where the installed torch has it)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    if hasattr(cfg, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        cfg.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 512)
    for layer in decoder_layers(model):
        if not getattr(layer, "_pdq_compiled", False):
            layer.forward = torch.compile(layer.forward, backend=backend, dynamic=False)
            layer._pdq_compiled = True


@contextlib.contextmanager
def capture_layer_outputs(layers: nn.ModuleList, indices: list[int]):
    """Collect the outputs (residual stream after the layer) of ``layers[i]`` for ``i`` in ``indices``.

    Hooks exist only inside the ``with`` block, so activation-checkpoint recomputation during backward does
    not record again. Yields a dict ``{layer index: tensor [B, S, d]}``."""
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i in indices:
        def hook(_m, _args, output, i=i):
            out[i] = output[0] if isinstance(output, tuple) else output
        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


class DistillModule(nn.Module):
    """Student wrapper: ``forward(input_ids, ...)`` -> (loss, {part: detached value}) or decode logits.

    Loss mode arguments (all on the student's device):
      input_ids [B, S] int64; teacher_last [B, S, d] (teacher final hidden, post norm); teacher_head [V, d]
      (teacher lm_head weight); teacher_hidden {layer: [B, S, d]} for hidden matching;
      rows [n] int64 flat indices into B*S of the positions whose logits are scored, row_weights [n] fp32
      (the logit loss is ``sum(row_weights * per_token_loss)``); the hidden term is a mean over all B*S tokens.
      With ``ce_weight`` > 0 the loss also holds ``ce_weight`` times the mean cross-entropy of the scored rows that
      have a next data token in ``input_ids`` (every position but each sequence's last) against that token
      (``logit_weight`` scales the whole logit path, this term included).
    Decode mode: ``forward(input_ids, cache=DynamicCache)`` -> fp32 softcapped logits of the last position [B, V].
    """

    def __init__(self, student: nn.Module, *, logit_loss: str, temperature: float, beta: float,
                 logit_weight: float, hidden_layers: list[int], hidden_weights: list[float],
                 chunk: int, compute_dtype: torch.dtype, loss_impl: str = "autograd",
                 compile_loss: bool = False, ce_weight: float = 0.0):
        super().__init__()
        self.student = student
        self.cap = getattr(text_config(student), "final_logit_softcapping", None)
        self.loss_fn = per_token_loss_fn(logit_loss, temperature=temperature, beta=beta)
        self.logit_loss = logit_loss
        self.logit_weight = float(logit_weight)
        self.hidden_layers = list(hidden_layers)
        self.hidden_weights = list(hidden_weights)
        self.chunk = int(chunk)
        self.compute_dtype = compute_dtype
        self.loss_impl = loss_impl
        self.compile_loss = bool(compile_loss)
        self.ce_weight = float(ce_weight)

    def _data_labels(self, input_ids: torch.Tensor, rows: torch.Tensor):
        """(labels [n] int64, ce weights [n] fp32) of the scored ``rows``: row ``b*S + s`` is labelled with
        ``input_ids[b, s+1]``; each sequence's last position has no label (weight 0, label 0). The weights are
        ``ce_weight / (labelled rows)``: a mean over this rank's labelled rows, as phase 1's KL is over its rows."""
        b, S = input_ids.shape
        nxt = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], 1).reshape(-1)
        has = (torch.arange(S, device=input_ids.device) < S - 1).expand(b, S).reshape(-1)
        labels, valid = nxt.index_select(0, rows), has.index_select(0, rows).float()
        return labels, valid * (self.ce_weight / valid.sum().clamp_min(1.0))

    def forward(self, input_ids, teacher_last=None, teacher_head=None, teacher_hidden=None, rows=None,
                row_weights=None, cache=None):
        decoder = self.student.get_decoder()
        head = self.student.get_output_embeddings().weight
        if cache is not None:
            kw = {cache_kwarg(type(decoder).forward): cache}
            h = decoder(input_ids=input_ids, use_cache=True, **kw).last_hidden_state[:, -1]
            return lm_logits(h.to(self.compute_dtype), head.to(self.compute_dtype), self.cap)

        match = self.hidden_layers if teacher_hidden is not None else []
        with capture_layer_outputs(decoder.layers, match) as hs:
            h_s = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        d = h_s.shape[-1]
        parts, stats = {}, {}
        labels, ce_w = self._data_labels(input_ids, rows) if self.ce_weight > 0 else (None, None)
        logit = chunked_logit_loss(h_s.reshape(-1, d).index_select(0, rows), head,
                                   teacher_last.reshape(-1, teacher_last.shape[-1]).index_select(0, rows),
                                   teacher_head, row_weights, self.loss_fn, cap=self.cap, chunk=self.chunk,
                                   compute_dtype=self.compute_dtype, impl=self.loss_impl,
                                   compile=self.compile_loss, labels=labels, ce_weights=ce_w, stats=stats)
        parts[self.logit_loss] = stats["logit"]
        if labels is not None:
            parts["data_ce"] = stats["ce"] / self.ce_weight  # the mean CE itself, not its weighted share
        total = self.logit_weight * logit
        if match:
            hidden, per_layer = hidden_state_loss([hs[i] for i in match], [teacher_hidden[i] for i in match],
                                                  self.hidden_weights, compile=self.compile_loss)
            parts["hidden_mse"] = hidden.detach()
            for i, v in zip(match, per_layer):
                parts[f"hidden_mse/{i}"] = v
            total = total + hidden
        return total, parts
