"""The distill speed switches compute what the default path computes (CPU, fast): fused/compiled logit loss,
``pdq_hybrid`` attention, partial activation checkpointing, compiled decoder layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distill.losses as L
from bench.factory import build_model
from distill.attention import NAME, _window_bool_mask, hybrid_mask, register, sliding_block_mask
from distill.config import DistillConfig
from distill.losses import chunked_logit_loss, per_token_loss_fn
from distill.models import capture_layer_outputs, compile_decoder_layers, decoder_layers, limit_checkpointing
from pack.hfcompat import checkpointing_disable, checkpointing_enable
from tests.distill_fixtures import aot_eager_compile, recording_backend  # noqa: F401 (a fixture)

torch.set_num_threads(1)


def _loss_and_grads(impl, fn, compile=False, cap=30.0, need_w=True, chunk=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, d, V = 130, 32, 1000  # 130 rows: a short last chunk
    h_s = torch.randn(N, d, generator=g).requires_grad_(True)
    w_s = (0.5 * torch.randn(V, d, generator=g)).requires_grad_(need_w)
    h_t, w_t = torch.randn(N, d, generator=g), 0.5 * torch.randn(V, d, generator=g)
    wts = torch.rand(N, generator=g) / N
    loss = chunked_logit_loss(h_s, w_s, h_t, w_t, wts, fn, cap=cap, chunk=chunk, impl=impl, compile=compile)
    (3.0 * loss).backward()  # a non-unit upstream gradient goes through the stored gradients
    return loss.detach(), h_s.grad, w_s.grad


def _close(a, b, rtol=2e-6):
    assert a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-30)
    assert (a - b).abs().max() <= rtol * scale, ((a - b).abs().max() / scale).item()


@pytest.mark.parametrize("T,cap,need_w", [(1.0, 30.0, True), (2.0, 30.0, False), (0.7, None, True)])
def test_fused_forward_kl_equals_autograd(T, cap, need_w):
    fn = per_token_loss_fn("forward_kl", temperature=T)
    ref = _loss_and_grads("autograd", fn, cap=cap, need_w=need_w)
    got = _loss_and_grads("fused", fn, cap=cap, need_w=need_w)
    _close(got[0], ref[0], 1e-6)
    _close(got[1], ref[1])
    if need_w:
        _close(got[2], ref[2])
    else:
        assert got[2] is None and ref[2] is None


def test_fused_refuses_jsd_and_unknown_impl():
    with pytest.raises(ValueError, match="forward KL only"):
        _loss_and_grads("fused", per_token_loss_fn("gjsd", beta=0.5))
    with pytest.raises(ValueError, match="impl"):
        _loss_and_grads("fast", per_token_loss_fn("forward_kl"))
    with pytest.raises(ValueError, match="fused"):
        DistillConfig(teacher="t", student="s", out="o", phase=2, loss_impl="fused")


@pytest.mark.parametrize("impl,kind", [("fused", "forward_kl"), ("autograd", "gjsd")])
def test_compiled_chunk_equals_eager(aot_eager_compile, impl, kind):
    """compile=True goes through torch.compile (Dynamo captures the chunk function into a graph rather than
    falling back to eager) and gives the eager values."""
    calls, graphs = aot_eager_compile
    fn = per_token_loss_fn(kind, temperature=1.5, beta=0.3)
    ref = _loss_and_grads(impl, fn)
    assert not calls and not graphs  # the eager reference compiled nothing
    got = _loss_and_grads(impl, fn, compile=True)
    assert calls, "compile=True did not call torch.compile"
    assert graphs, "torch.compile captured no graph of the chunk function"
    for a, b in zip(got, ref):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("impl,kind", [("fused", "forward_kl"), ("autograd", "gjsd"), ("autograd", "forward_kl")])
def test_compiled_chunks_of_other_settings_in_one_process(aot_eager_compile, impl, kind):
    """Compiled chunk functions are kept per setting: after one temperature / beta, another in the same process
    gets its own (a cache keyed without them would return the first setting's loss)."""
    for t, beta in ((1.0, 0.5), (2.5, 0.1), (1.0, 0.9)):
        fn = per_token_loss_fn(kind, temperature=t, beta=beta)
        ref = _loss_and_grads(impl, fn)
        got = _loss_and_grads(impl, fn, compile=True)
        for a, b in zip(got, ref):
            _close(a, b, 1e-5)


def test_compiled_hidden_loss_equals_checkpointed(aot_eager_compile):
    """hidden_state_loss(compile=True) (hand-written gradient, compiled) gives the default path's value and
    gradients, bf16 and fp32 hidden states, two layers with different weights."""
    calls, graphs = aot_eager_compile
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        hs0 = [torch.randn(2, 7, 24, generator=g).to(dtype) for _ in range(2)]
        ht = [h.float() + 0.3 * torch.randn(2, 7, 24, generator=g) for h in hs0]
        ht = [t.to(dtype) for t in ht]
        out = []
        for compile in (False, True):
            hs = [h.clone().requires_grad_(True) for h in hs0]
            total, parts = L.hidden_state_loss(hs, ht, [0.25, 0.75], compile=compile)
            total.backward()
            out.append((total.detach(), parts, [h.grad.float() for h in hs]))
        (t0, p0, g0), (t1, p1, g1) = out
        _close(t1, t0, 1e-5)
        for a, b in zip(p1 + g1, p0 + g0):
            _close(a, b, 1e-5 if dtype == torch.float32 else 1e-2)
    assert calls and graphs, "compile=True did not compile"


# ------------------------------------------------------------------------------------------------ attention

def test_flex_sliding_window_equals_masked_sdpa():
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    g = torch.Generator().manual_seed(0)
    B, H, Hk, S, D, W = 2, 4, 2, 160, 32, 64
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, Hk, Hk))
    ref_mask = sdpa_mask(batch_size=B, q_length=S, kv_length=S,
                         mask_function=sliding_window_causal_mask_function(W), local_size=W)
    assert torch.equal(ref_mask, _window_bool_mask(S, W, "cpu").expand(B, 1, S, S))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask, enable_gqa=True, scale=1.0)
    out = flex_attention(q, k, v, block_mask=sliding_block_mask(S, W, "cpu"), scale=1.0, enable_gqa=True)
    _close(out, ref, 1e-5)


def test_hybrid_mask_skips_only_the_plain_window():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(64)
    assert hybrid_mask(batch_size=2, q_length=160, kv_length=160, mask_function=fn, local_size=64) is None
    # decoding with a cache / padding: exactly sdpa_mask
    for kw in (dict(q_length=1, kv_length=100, q_offset=99), dict(q_length=160, kv_length=160,
                                                                  attention_mask=torch.ones(2, 160, dtype=torch.bool))):
        args = dict(batch_size=2, mask_function=fn, local_size=64, **kw)
        a, b = hybrid_mask(**args), sdpa_mask(**args)
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.fixture(scope="module")
def micro():
    register()
    return build_model("micro", seed=1, dtype=torch.float32)


def _forward_backward(model, ids, attn, capture=()):
    model.config._attn_implementation = attn
    model.zero_grad(set_to_none=True)
    with capture_layer_outputs(decoder_layers(model), list(capture)) as hs:
        h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        loss = h.pow(2).mean() + sum(v.float().pow(2).mean() for v in hs.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach(), grads, {i: v.detach() for i, v in hs.items()}


def test_hybrid_model_matches_sdpa(micro):
    """Sequence 160 > window 64: the sliding layers take the hybrid path. Without grad (teacher) that is
    flex_attention; with grad on CPU the dense-window fallback (flex has no CPU backward)."""
    import distill.attention as A

    ids = torch.randint(4, 2000, (2, 160), generator=torch.Generator().manual_seed(0))
    micro.train()
    ref = _forward_backward(micro, ids, "sdpa")
    got = _forward_backward(micro, ids, NAME)
    _close(got[0], ref[0], 1e-6)
    for n in ref[1]:
        _close(got[1][n], ref[1][n], 1e-5)
    calls = []
    real = A._flex
    A._flex = lambda dev: (calls.append(dev), real(dev))[1]
    try:
        with torch.no_grad():
            micro.config._attn_implementation = NAME
            out = micro.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        A._flex = real
        micro.config._attn_implementation = "sdpa"
    assert len(calls) == sum(t == "sliding_attention" for t in micro.config.layer_types)
    # fp32 through 6 random-init layers: sdpa itself is ~3e-4 (relative) from a float64 forward
    _close(out, ref[0], 2e-3)


def test_partial_checkpointing_same_gradients(micro):
    ids = torch.randint(4, 2000, (2, 96), generator=torch.Generator().manual_seed(1))
    micro.train()
    ref = _forward_backward(micro, ids, "sdpa", capture=(1, 4))
    checkpointing_enable(micro, {"use_reentrant": False})
    try:
        assert limit_checkpointing(micro, 3) == 3
        flags = [layer.gradient_checkpointing for layer in decoder_layers(micro)]
        assert flags == [True] * 3 + [False] * (len(flags) - 3)
        got = _forward_backward(micro, ids, "sdpa", capture=(1, 4))
    finally:
        checkpointing_disable(micro)
    _close(got[0], ref[0], 0)
    assert sorted(got[2]) == [1, 4]
    for n in ref[1]:
        _close(got[1][n], ref[1][n], 1e-6)


@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_layers_same_values_and_hooks(ckpt):
    """compile_decoder_layers gives the eager values and gradients, layer hooks still fire, and Dynamo really
    captured a graph for every kind of decoder layer (sliding / full attention, with own / shared KV). With
    activation checkpointing too (``ckpt``): transformers 5.24 checkpoints inside the compiled forward, where
    without pdqkit's Dynamo switch the KV-storing layers' dict write made Dynamo run the layers eagerly (a graph
    was captured for the first layer only)."""
    model = build_model("micro", seed=2, dtype=torch.float32).train()
    if ckpt:
        checkpointing_enable(model, {"use_reentrant": False})
    layers = decoder_layers(model)
    cfg = model.config
    first_shared = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    kinds = [(t, i >= first_shared) for i, t in enumerate(cfg.layer_types)]
    assert len(set(kinds)) == 4  # micro has all four kinds
    ids = torch.randint(4, 2000, (2, 96), generator=torch.Generator().manual_seed(2))
    ref = _forward_backward(model, ids, "sdpa", capture=(0, 5))
    # which layer's forward Dynamo is capturing when the backend gets a graph: a pre-hook (eager, outside the
    # compiled forward) notes the layer about to run; layers of one kind may share one compiled graph
    running = [None]
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: running.__setitem__(0, i))
               for i, layer in enumerate(layers)]
    captured = []
    torch._dynamo.reset()  # no compiled code or recompile limit left over from other tests
    try:
        compile_decoder_layers(model, backend=recording_backend(captured, lambda gm: running[0]))
        got = _forward_backward(model, ids, "sdpa", capture=(0, 5))
    finally:
        for h in handles:
            h.remove()
    assert {kinds[i] for i in captured} == set(kinds), f"graphs captured for layers {captured} only"
    again = _forward_backward(model, ids, "sdpa", capture=(2,))  # other hooks: still eager around forward
    _close(got[0], ref[0], 1e-5)
    for i in (0, 5):
        _close(got[2][i], ref[2][i], 1e-5)
    for n in ref[1]:
        _close(got[1][n], ref[1][n], 1e-4)
    assert sorted(again[2]) == [2]


def test_hybrid_mask_keeps_chunked_attention_masks():
    """transformers passes ``local_size`` for chunked attention too (Llama-4's attention_chunk_size): pdq_hybrid
    must build that mask (as sdpa does), not drop it as it may for a Gemma-style sliding window."""
    import transformers

    from distill.attention import register

    register()
    cfg = transformers.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        attention_chunk_size=4, num_local_experts=1, moe_layers=[], no_rope_layers=[1, 1],
                                        max_position_embeddings=64)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in ("sdpa", "pdq_hybrid"):
        torch.manual_seed(0)
        cfg._attn_implementation = impl
        with torch.no_grad():
            logits[impl] = transformers.Llama4ForCausalLM(cfg).eval()(ids).logits
    assert torch.equal(logits["sdpa"], logits["pdq_hybrid"])
