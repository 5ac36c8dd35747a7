"""Model factory of the evaluation bed: Gemma-4 configs at three scales, all with the E4B topology.

Every scale keeps what makes E4B E4B: sliding/full attention interleave (5 sliding then 1 full), a larger
``global_head_dim`` on full layers, per-layer embeddings (PLE), KV-shared last layers, tied embeddings,
final-logit softcapping; optionally the vision and audio towers (``multimodal=True`` builds
``Gemma4ForConditionalGeneration``, else ``Gemma4ForCausalLM``). Every quantized K is a multiple of 128 and
every MLP width is a multiple of 640 so that a 20% prune lands on a multiple of 128.

=========  =======  ======  ======  =====  ===========  =========  ==================================
scale      hidden   MLP     layers  heads  head_dim     kv-shared  use
=========  =======  ======  ======  =====  ===========  =========  ==================================
micro      256      640     6       2/1    128 / 256    2          CPU tests (seconds)
small      512      2560    12      4/1    128 / 256    4          quality subject (~60M params + emb)
e4b        2560     10240   42      8/2    256 / 512    18         published E4B text dims, speed only
=========  =======  ======  ======  =====  ===========  =========  ==================================
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

SCALES = ("micro", "small", "e4b")

_TEXT = {
    "micro": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, global_head_dim=256, num_kv_shared_layers=2,
                  hidden_size_per_layer_input=64, vocab_size=2048, sliding_window=64,
                  max_position_embeddings=4096),
    "small": dict(hidden_size=512, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=128, global_head_dim=256, num_kv_shared_layers=4,
                  hidden_size_per_layer_input=64, vocab_size=8192, sliding_window=256,
                  max_position_embeddings=8192),
    "e4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
                num_key_value_heads=2, head_dim=256, global_head_dim=512, num_kv_shared_layers=18,
                hidden_size_per_layer_input=256, vocab_size=262144, sliding_window=512,
                max_position_embeddings=131072),
}
# Tiny towers for micro/small (spec pack-quantized.md §5); e4b uses transformers' defaults (E4B's towers).
_VISION_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=64, position_embedding_size=64)
_AUDIO_TINY = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                   subsampling_conv_channels=[32, 16], output_proj_dims=128)


def _layer_types(n: int) -> list[str]:
    # E4B: full attention at layers 5, 11, ..., i.e. every 6th layer; micro (6 layers) gets 2 full layers so
    # that KV sharing covers both kinds, like E4B's shared tail does.
    period = 3 if n <= 6 else 6
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]


def text_config(scale: str, **overrides):
    """``Gemma4TextConfig`` of ``scale`` (``overrides`` replace any field, e.g. ``vocab_size``)."""
    from transformers import Gemma4TextConfig

    if scale not in _TEXT:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    kw = dict(_TEXT[scale])
    kw.update(final_logit_softcapping=30.0, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
    kw.update(overrides)
    kw.setdefault("vocab_size_per_layer_input", kw["vocab_size"])
    kw.setdefault("layer_types", _layer_types(kw["num_hidden_layers"]))
    return Gemma4TextConfig(**kw)


def model_config(scale: str, multimodal: bool = False, **overrides):
    """Config of the whole model: ``Gemma4Config`` (text + vision + audio) if ``multimodal`` else the text config."""
    tc = text_config(scale, **overrides)
    if not multimodal:
        return tc
    from transformers import Gemma4Config

    # e4b: transformers' default tower configs (E4B's); an empty dict selects them (None would mean no tower)
    towers = dict(vision_config={}, audio_config={}) if scale == "e4b" else dict(vision_config=_VISION_TINY,
                                                                                    audio_config=_AUDIO_TINY)
    return Gemma4Config(text_config=tc.to_dict(), tie_word_embeddings=True, **towers)


def build_model(scale: str, multimodal: bool = False, seed: int = 0, dtype=torch.bfloat16, device="cpu",
                **overrides):
    """A randomly initialised model of ``scale`` (deterministic in ``seed``), cast to ``dtype``.

    The weights are drawn in fp32 and rounded to ``dtype``; the module is then laid out the way
    ``from_pretrained(dtype=...)`` lays out a loaded one (built under ``dtype`` as default dtype, so its
    computed buffers, e.g. RoPE ``inv_freq`` in fp32, match), so that the model computes exactly like its
    checkpoint once loaded (a plain ``model.to(bf16)`` would round the RoPE frequencies to bf16)."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    cfg = model_config(scale, multimodal, **overrides)
    cls = Gemma4ForConditionalGeneration if multimodal else Gemma4ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg)
    if dtype == torch.float32 or str(device) == "meta":
        return model.to(dtype).eval()
    try:  # skip the second random init (only a speed-up: every weight is overwritten below)
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        import contextlib

        no_init_weights = contextlib.nullcontext
    with torch.device(device), no_init_weights():
        laid_out = cls._from_config(cfg, dtype=dtype)
    laid_out.load_state_dict(model.state_dict())
    with torch.no_grad():  # the buffers the state dict leaves out (RoPE inv_freq, the audio tower's inv_timescales):
        for name, b in model.named_buffers():  # computed in fp32 like from_pretrained does, stored in their dtype
            laid_out.get_buffer(name).copy_(b)
    laid_out.tie_weights()  # load_state_dict copies lm_head into its own tensor: re-tie it as from_pretrained does
    return laid_out.eval()


def save_random_checkpoint(scale: str, out, multimodal: bool = False, seed: int = 0, force: bool = False,
                           tokenizer=None, **overrides) -> Path:
    """Build a random ``scale`` model and save it as a bf16 checkpoint both HF and vLLM load (see
    :func:`pack.checkpoint.save_bf16_checkpoint`); records a ``base`` lineage step."""
    from pack.checkpoint import lineage_step, save_bf16_checkpoint

    model = build_model(scale, multimodal, seed, **overrides)
    step = lineage_step("base", model=f"pdqkit-bench/{scale}{'-mm' if multimodal else ''}", init="random",
                        seed=seed, overrides={k: v for k, v in sorted(overrides.items())})
    return save_bf16_checkpoint(model, out, step=step, tokenizer=tokenizer, force=force)


def save_random_checkpoint_streamed(scale: str, out, multimodal: bool = False, seed: int = 0, force: bool = False,
                                    shard_bytes: int = 5 * 10**9, std: float = 0.02, **overrides) -> Path:
    """A random bf16 checkpoint of ``scale`` written one shard at a time: the model exists only on the meta device,
    tensors are drawn straight into bf16 in 16M-element chunks, and at most one shard's tensors (``shard_bytes``,
    or one larger tensor) are in memory, so the full E4B with its towers (~8 B parameters;
    :func:`save_random_checkpoint` would need ~48 GB for its fp32 draw and bf16 copy) fits a 24 GiB machine.

    Tensor names, shapes, dtypes, config.json and generation_config.json are those :func:`save_random_checkpoint`
    writes (``save_pretrained``: tied weights once; the KV-shared ``k_norm`` tensors added, as ones, in a file of
    their own when sharded). The split into files is greedy in state-dict order, not huggingface_hub's, so shard
    names and boundaries can differ. Every other floating tensor, norms and buffers included, is N(0, ``std``):
    a stand-in for tools that stream checkpoints (``pack.quantize``, ``prune``), not a model that computes anything
    sensible. Same arguments -> same bytes."""
    from safetensors.torch import save_file
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    from pack.checkpoint import (INDEX_NAME, KNORM_SHARD, SINGLE_NAME, atomic_output_dir, json_dump,
                                 kv_shared_k_norm_tensors, lineage_step, usual_file_modes, write_lineage)

    cfg = model_config(scale, multimodal, **overrides)
    cls = Gemma4ForConditionalGeneration if multimodal else Gemma4ForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # save_pretrained writes only their source
    entries = [(name, tuple(t.shape), torch.bfloat16 if t.dtype.is_floating_point else t.dtype)
               for name, t in model.state_dict().items() if name not in tied]
    extra = kv_shared_k_norm_tensors(model)
    shards, size = [[]], 0  # greedy in state-dict order (huggingface_hub's split differs in detail)
    for e in entries:
        nbytes = math.prod(e[1]) * e[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if len(shards) > 1 and extra:  # where save_bf16_checkpoint puts them in a sharded checkpoint
        shards.append([])
        names.append(KNORM_SHARD)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    with atomic_output_dir(out, force=force) as tmp:
        cfg.architectures = [cls.__name__]
        for c in (cfg, *(getattr(cfg, k) for k in getattr(cfg, "sub_configs", {}))):
            c.dtype = torch.bfloat16  # what save_pretrained records for a bf16 model
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        for fname, shard in zip(names, shards):
            tensors = {}
            for name, shape, dtype in shard:
                tensors[name] = t = torch.zeros(shape, dtype=dtype)
                if dtype.is_floating_point:  # drawn in chunks: no fp32 copy of a 5 GB embedding in memory
                    flat = t.view(-1)
                    for i in range(0, flat.numel(), 1 << 24):
                        j = min(flat.numel(), i + (1 << 24))
                        flat[i:j] = torch.randn(j - i, generator=gen).mul_(std)
            if fname == names[-1]:
                tensors.update(extra)
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({k: fname for k in tensors})
            del tensors
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            json_dump(index, tmp / INDEX_NAME)
        step = lineage_step("base", model=f"pdqkit-bench/{scale}{'-mm' if multimodal else ''}",
                            init=f"random-streamed N(0, {std})", seed=seed,
                            overrides={k: v for k, v in sorted(overrides.items())})
        write_lineage(tmp, [], step)
        usual_file_modes(tmp)   # (save_file writes 0600)
    return Path(out)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
