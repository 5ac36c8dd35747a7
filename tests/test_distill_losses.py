"""distill.losses / distill.sample against direct reference implementations (CPU, fast)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (chunked_logit_loss, forward_kl, generalized_jsd, hidden_state_loss, lm_logits,
                            per_token_loss_fn, softcap)
from distill.sample import (continuation_mask, gumbel_sample, on_policy_step, row_seed, sample_continuations)
from pack.hfcompat import cache_kwarg

torch.set_num_threads(1)


# ---------------------------------------------------------------- references (float64, explicit probabilities)
def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from probabilities (float64)."""
    return (p * (p.log() - q.log())).sum(-1)


def ref_forward_kl(s, t, T):
    p = torch.softmax(t.double() / T, -1)
    q = torch.softmax(s.double() / T, -1)
    return T * T * ref_kl(p, q)


def ref_gjsd(s, t, beta, T):
    """Generalized JSD, Agarwal et al. 2024 eq. (1) as TRL implements it: beta weights the teacher."""
    p = torch.softmax(t.double() / T, -1)  # teacher
    q = torch.softmax(s.double() / T, -1)  # student
    if beta == 0:
        return ref_kl(p, q)
    if beta == 1:
        return ref_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def trl_generalized_jsd_loss(student_logits, teacher_logits, beta, temperature):
    """TRL GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py), reduction='none'."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log1p(-b), teacher_log_probs + torch.log(b)]),
                                  dim=0)
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum(-1)


def _logits(n=6, v=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


# ---------------------------------------------------------------- logit path
@pytest.mark.parametrize("multimodal", [False, True])
def test_lm_logits_matches_gemma4_forward_exactly(multimodal):
    from bench.factory import build_model

    model = build_model("micro", multimodal=multimodal, dtype=torch.float32)
    ids = torch.randint(0, 2048, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        h = model.get_decoder()(input_ids=ids).last_hidden_state
        ours = lm_logits(h, model.get_output_embeddings().weight, 30.0)
    assert ref.abs().max() > 1.0  # non-trivial logits, capped below 30
    assert torch.equal(ours, ref)


def test_softcap_bounds_and_identity():
    x = torch.linspace(-500, 500, 101)
    y = softcap(x, 30.0)
    assert y.abs().max() <= 30.0 and torch.all(y[1:] >= y[:-1])
    torch.testing.assert_close(y.double(), 30.0 * torch.tanh(x.double() / 30.0), rtol=1e-6, atol=1e-5)
    assert torch.equal(softcap(x, None), x)


# ---------------------------------------------------------------- per-token losses
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_forward_kl_matches_reference(T):
    s, t = _logits()
    got = forward_kl(s, t, T)
    torch.testing.assert_close(got.double(), ref_forward_kl(s, t, T), rtol=1e-5, atol=1e-6)
    # F.kl_div form (input = student log-probs, target = teacher probs), T^2 scaled
    kd = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1) * T * T
    torch.testing.assert_close(got, kd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_forward_kl_gradient_is_T_times_q_minus_p(T):
    s, t = _logits()
    s.requires_grad_(True)
    forward_kl(s, t, T).sum().backward()
    expect = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
    torch.testing.assert_close(s.grad, expect, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 0.9])
def test_generalized_jsd_matches_reference_and_trl(beta, T):
    s, t = _logits(seed=3)
    got = generalized_jsd(s, t, beta, T)
    torch.testing.assert_close(got.double(), ref_gjsd(s, t, beta, T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, trl_generalized_jsd_loss(s, t, beta, T), rtol=1e-5, atol=1e-6)


def test_generalized_jsd_limits():
    s, t = _logits(seed=4)
    fkl = ref_kl(torch.softmax(t.double(), -1), torch.softmax(s.double(), -1))
    rkl = ref_kl(torch.softmax(s.double(), -1), torch.softmax(t.double(), -1))
    assert not torch.allclose(fkl, rkl, rtol=1e-2)  # the two limits are distinguishable
    torch.testing.assert_close(generalized_jsd(s, t, 0.0).double(), fkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0).double(), rkl, rtol=1e-5, atol=1e-6)
    # the mixture formula itself vanishes as beta -> 0 or 1: that is why TRL special-cases the endpoints
    assert generalized_jsd(s, t, 1e-4).max() < 1e-2 * fkl.min()
    assert generalized_jsd(s, t, 1 - 1e-4).max() < 1e-2 * rkl.min()
    # symmetric JSD at beta = 0.5, zero for identical inputs, no T^2 factor
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5), rtol=1e-5, atol=1e-7)
    assert generalized_jsd(s, s, 0.5).abs().max() < 1e-6
    torch.testing.assert_close(generalized_jsd(2 * s, 2 * t, 0.0, temperature=2.0), generalized_jsd(s, t, 0.0))


def test_generalized_jsd_gradient_matches_reference():
    s, t = _logits(seed=5)
    s64 = s.double().requires_grad_(True)
    p = torch.softmax(t.double(), -1)
    q = torch.softmax(s64, -1)
    m = 0.3 * p + 0.7 * q
    (0.3 * ref_kl(p, m) + 0.7 * ref_kl(q, m)).sum().backward()
    s32 = s.clone().requires_grad_(True)
    generalized_jsd(s32, t, 0.3).sum().backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- chunked vs unchunked
def _chunk_case(n=37, d=16, v=300, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d, generator=g, dtype=dtype)
    w_s = torch.randn(v, d, generator=g, dtype=dtype) * 2
    h_t = torch.randn(n, d, generator=g, dtype=dtype)
    w_t = torch.randn(v, d, generator=g, dtype=dtype) * 2
    weights = torch.rand(n, generator=g) / n
    return h_s, w_s, h_t, w_t, weights


def _unchunked(h_s, w_s, h_t, w_t, weights, fn, cap, compute_dtype=torch.float32):
    z_s = softcap((h_s.to(compute_dtype) @ w_s.to(compute_dtype).T).float(), cap)
    z_t = softcap((h_t.to(compute_dtype) @ w_t.to(compute_dtype).T).float(), cap)
    return (fn(z_s, z_t) * weights).sum()


@pytest.mark.parametrize("kind,kw", [("forward_kl", dict(temperature=1.0)), ("forward_kl", dict(temperature=2.0)),
                                     ("gjsd", dict(beta=0.5)), ("gjsd", dict(beta=0.0)), ("gjsd", dict(beta=1.0))])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_equals_unchunked_values_and_grads(kind, kw, chunk, train_head):
    fn = per_token_loss_fn(kind, **kw)
    h_s, w_s, h_t, w_t, weights = _chunk_case()
    a_h, a_w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(train_head)
    b_h, b_w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(train_head)
    ref = _unchunked(a_h, a_w, h_t, w_t, weights, fn, 30.0)
    got = chunked_logit_loss(b_h, b_w, h_t, w_t, weights, fn, cap=30.0, chunk=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    (ref * 1.7).backward()
    (got * 1.7).backward()
    # fp32 matmuls of different shapes round differently: compare against the gradient's scale
    torch.testing.assert_close(b_h.grad, a_h.grad, rtol=1e-4, atol=1e-5 * float(a_h.grad.abs().max()))
    if train_head:
        torch.testing.assert_close(b_w.grad, a_w.grad, rtol=1e-4, atol=1e-5 * float(a_w.grad.abs().max()))
    else:
        assert b_w.grad is None


def test_chunked_bf16_compute_matches_unchunked_bf16():
    fn = per_token_loss_fn("forward_kl")
    h_s, w_s, h_t, w_t, weights = _chunk_case(seed=2)
    a_h, b_h = h_s.clone().requires_grad_(True), h_s.clone().requires_grad_(True)
    ref = _unchunked(a_h, w_s, h_t, w_t, weights, fn, 30.0, torch.bfloat16)
    got = chunked_logit_loss(b_h, w_s, h_t, w_t, weights, fn, cap=30.0, chunk=5, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    ref.backward()
    got.backward()
    torch.testing.assert_close(b_h.grad, a_h.grad, rtol=2e-2, atol=1e-4)  # bf16 dgrad rounding per chunk


def test_chunked_keeps_no_vocab_sized_tensor_for_backward():
    fn = per_token_loss_fn("gjsd", beta=0.5)
    h_s, w_s, h_t, w_t, weights = _chunk_case(n=40, d=8, v=4096)
    h = h_s.clone().requires_grad_(True)
    loss = chunked_logit_loss(h, w_s, h_t, w_t, weights, fn, cap=30.0, chunk=8)
    saved = loss.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) == h.numel()  # only the [N, d] gradient, no [N, V] logits


def test_chunked_without_grad_returns_value_only():
    fn = per_token_loss_fn("forward_kl")
    h_s, w_s, h_t, w_t, weights = _chunk_case()
    with torch.no_grad():
        got = chunked_logit_loss(h_s, w_s, h_t, w_t, weights, fn, cap=None, chunk=7)
    torch.testing.assert_close(got, _unchunked(h_s, w_s, h_t, w_t, weights, fn, None), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="shapes"):
        chunked_logit_loss(h_s, w_s, h_t[:-1], w_t, weights, fn, cap=None)


# ---------------------------------------------------------------- hidden states
def test_hidden_state_loss_matches_formula_and_grad():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3)]
    ht = [torch.randn(2, 5, 8, generator=g) * (i + 1) for i in range(3)]
    w = [0.5, 0.25, 0.25]
    total, parts = hidden_state_loss(hs, ht, w)
    ref_parts = [(((a.double() - b.double()) ** 2).sum(-1) / ((b.double() ** 2).sum(-1) + 1e-6)).mean()
                 for a, b in zip(hs, ht)]
    ref = sum(wi * p for wi, p in zip(w, ref_parts))
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-7)
    for p, r in zip(parts, ref_parts):
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-7)
    total.backward()
    ref_hs = [h.detach().double().requires_grad_(True) for h in hs]
    sum(wi * (((a - b.double()) ** 2).sum(-1) / ((b.double() ** 2).sum(-1) + 1e-6)).mean()
        for wi, a, b in zip(w, ref_hs, ht)).backward()
    for a, b in zip(hs, ref_hs):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-8)
    assert hidden_state_loss([ht[0]], [ht[0]], [1.0])[0] == 0


# ---------------------------------------------------------------- sampling
def test_gumbel_sampling_draws_float64_uniforms():
    """Each row's draw is Gumbel-max over float64 uniforms from its own generator (reference built here from
    -log(-log(u))): fp32 uniforms lie on a 2^-24 grid, which caps the noise and cuts off the tail (docstring)."""
    g = torch.Generator().manual_seed(11)
    b, v, T = 6, 50_000, 0.8
    logits = 3 * torch.randn(b, v, generator=g)
    seeds = [row_seed(7, 3, r) for r in range(b)]
    got = gumbel_sample(logits, T, [torch.Generator().manual_seed(s) for s in seeds])
    want = []
    for r, s in enumerate(seeds):
        u = torch.rand(v, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        want.append(int(torch.argmax(logits[r].double() / T - torch.log(-torch.log(u)))))
    assert got.tolist() == want


def test_gumbel_sampling_follows_softmax_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    T, n = 0.9, 6000
    gens = [torch.Generator().manual_seed(row_seed(0, 0, i)) for i in range(n)]
    draws = torch.cat([gumbel_sample(logits, T, [g]) for g in gens])
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.softmax(logits[0].double() / T, -1)
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / n)


def test_sampling_with_kv_cache_matches_full_recompute():
    """Cached decoding (sliding + full + KV-shared layers) draws the same tokens as re-running the whole
    sequence each step with the same per-row generators."""
    from transformers import DynamicCache

    from bench.factory import build_model

    model = build_model("micro", dtype=torch.float32)
    W, dec = model.get_output_embeddings().weight, model.get_decoder()
    prompts = torch.randint(4, 2048, (2, 70), generator=torch.Generator().manual_seed(0))  # past the 64 window
    seeds = [row_seed(1, 2, r) for r in range(2)]

    def decode(ids, cache):
        h = dec(input_ids=ids, use_cache=True, **{cache_kwarg(type(dec).forward): cache}).last_hidden_state[:, -1]
        return lm_logits(h, W, 30.0)

    with torch.no_grad():
        got = sample_continuations(decode, prompts, 8, 0.9, seeds, lambda: DynamicCache(config=model.config))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        seq = prompts
        for _ in range(8):
            logits = lm_logits(dec(input_ids=seq, use_cache=False).last_hidden_state[:, -1], W, 30.0)
            seq = torch.cat([seq, gumbel_sample(logits, 0.9, gens)[:, None]], 1)
    assert torch.equal(got, seq[:, 70:])
    # a row's tokens do not depend on its batch neighbours
    with torch.no_grad():
        alone = sample_continuations(decode, prompts[1:], 8, 0.9, seeds[1:], lambda: DynamicCache(config=model.config))
    assert torch.equal(alone[0], got[1])


def test_continuation_mask_and_lambda():
    toks = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 5, 5, 5]])
    m = continuation_mask(toks, [1])
    assert m.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert continuation_mask(toks, []).all()
    frac = sum(on_policy_step(0, s, 0.5) for s in range(4000)) / 4000
    assert abs(frac - 0.5) < 0.04
    assert not any(on_policy_step(0, s, 0.0) for s in range(100))
    assert all(on_policy_step(0, s, 1.0) for s in range(100))
