"""``--attn pdq_hybrid``: Gemma-4 training attention that keeps every layer on a fused kernel.

What transformers' ``sdpa`` does with Gemma-4 (E4B: 35 sliding layers, head_dim 256, window 512; 7 full layers,
head_dim 512; 8 query / 2 KV heads) on a training window of S > 512 tokens without padding:

* sliding layers: ``sdpa_mask`` cannot skip the mask (``kv_length >= sliding_window``), so each call gets a
  dense bool ``[B, 1, S, S]`` mask. A mask rules out the flash kernel (no ``attn_mask`` support) and makes
  transformers repeat K/V to all heads (``use_gqa_in_sdpa`` is False with a mask); the memory-efficient
  (CUTLASS) kernel then computes all ``S x S`` scores, adding the mask as a bias: 4x the work a 512-token
  window needs at S = 2048, plus the K/V copies;
* full layers: no mask, ``is_causal=True``, but head_dim 512 > 256 rules out flash and cuDNN (both
  <= 256 on sm_90), so these run the memory-efficient kernel's generic large-head-dim variant, again with K/V repeated
  (``use_gqa_in_sdpa`` requires head_dim <= 256).

Here the sliding layers run ``flex_attention`` with a block-sparse sliding-window ``BlockMask`` (only the
~S x (W + block) band is computed, GQA native); everything else — full layers, decoding with a cache, padding,
masks — goes to transformers' own ``sdpa_attention_forward`` unchanged. (CPU has no flex backward: there, a
sliding layer whose inputs require grad gets the equivalent dense window mask and sdpa.) The mask interface
returns no mask exactly where the attention function applies the window itself (a plain causal window: ``q_length ==
kv_length``, no offset, no padding), and transformers' ``sdpa_mask`` everywhere else.

Numerics: the same softmax(QK^T * scaling) V with the same keys allowed (``q - W < k <= q``, transformers'
``sliding_window_causal_mask_function``), computed by another fused kernel: equal to sdpa to the kernels'
rounding (fp32 on CPU: ~1e-6; tests/test_distill_speed.py).
"""
from __future__ import annotations

import functools

import torch

__all__ = ["NAME", "register", "hybrid_attention_forward", "hybrid_mask"]

NAME = "pdq_hybrid"
_BLOCK_MASKS: dict = {}
_WINDOW_MASKS: dict = {}


@functools.cache
def _flex(device_type: str):
    """flex_attention, compiled on CUDA (the fused Triton kernel); eager elsewhere (CPU tests: reference math).
    Cached per device type: one compiled wrapper per process."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)


def sliding_block_mask(seq_len: int, window: int, device):
    """``BlockMask`` of causal attention limited to the last ``window`` keys (``q - window < k <= q``); cached."""
    key = (int(seq_len), int(window), str(device))
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        def sliding_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

        _BLOCK_MASKS[key] = create_block_mask(sliding_causal, None, None, seq_len, seq_len, device=device)
    return _BLOCK_MASKS[key]


def _window_bool_mask(seq_len: int, window: int, device) -> torch.Tensor:
    """Dense bool [1, 1, S, S] of the same window (the fallback where flex cannot run, e.g. CPU training);
    cached and shared between calls: read it (``.expand()``), never write it."""
    key = (int(seq_len), int(window), str(device))
    if key not in _WINDOW_MASKS:
        i = torch.arange(seq_len, device=device)
        d = i[:, None] - i[None, :]
        _WINDOW_MASKS[key] = ((d >= 0) & (d < window))[None, None]
    return _WINDOW_MASKS[key]


def _uses_flex(query, key, dropout) -> bool:
    """Whether a plain sliding-window call (no mask, ``S_q == S_k > window``) can run on flex_attention."""
    if query.device.type == "cpu" and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return False  # flex_attention has no CPU backward
    return not dropout and query.shape[1] % key.shape[1] == 0


def hybrid_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers attention interface: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> ([B, S, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = (attention_mask is None and sliding_window is not None
              and query.shape[2] == key.shape[2] > sliding_window)  # a plain window: hybrid_mask gave None
    if not (window and _uses_flex(query, key, dropout)):
        if window:
            attention_mask = _window_bool_mask(query.shape[2], sliding_window, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    dev = query.device.type
    if torch.is_autocast_enabled(dev):  # SDPA is on autocast's cast-to-lower-precision list; flex is not
        dt = torch.get_autocast_dtype(dev)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    else:  # e.g. fp32 rotary q/k with a bf16 v: one dtype for the kernel
        query, key = query.to(value.dtype), key.to(value.dtype)
    block_mask = sliding_block_mask(query.shape[2], sliding_window, query.device)
    out = _flex(dev)(query, key, value, block_mask=block_mask, scale=scaling,
                     enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def hybrid_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, local_size: int | None = None, allow_is_causal_skip: bool = True, **kwargs):
    """transformers mask interface: ``None`` for a plain sliding causal window over a whole unpadded sequence
    (the attention function applies the window), else exactly ``sdpa_mask``."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    config = kwargs.get("config")
    # only Gemma-style sliding windows: transformers also passes local_size for chunked attention (Llama-4's
    # attention_chunk_size), whose mask the attention function does not apply
    sliding = local_size is not None and getattr(config, "attention_chunk_size", None) is None
    plain = (sliding and allow_is_causal_skip and attention_mask is None
             and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
             and q_length == kv_length and q_length > 1)
    if plain:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def register() -> str:
    """Register ``pdq_hybrid`` with transformers' attention and mask interfaces (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, hybrid_attention_forward)
    AttentionMaskInterface.register(NAME, hybrid_mask)
    return NAME
