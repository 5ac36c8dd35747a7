"""Distillation losses: forward KL and generalized JSD on logits, normalised hidden-state MSE.

Logit losses never materialise ``[tokens x vocab]`` for the whole batch (Gemma-4's vocabulary is 262,144: one
fp32 row of logits is 1 MiB, so 16k tokens of both models would be 32 GiB before any softmax).
:func:`chunked_logit_loss` takes the *final hidden states* of both models and their ``lm_head`` weights and
walks the tokens ``chunk`` rows at a time: for each chunk it computes both models' logits exactly as Gemma-4
does (``lm_head`` matmul, then ``final_logit_softcapping``: ``tanh(z / c) * c``), the per-token loss, and —
in the same pass — the gradient of that chunk's loss with respect to the student's hidden rows (and
``lm_head`` weight when it is trained): the logits' gradient by a local ``torch.autograd.grad`` (or written
out by hand), then the ``lm_head`` matmul's backward. Only those gradients
(``[tokens x hidden]``) are kept for backward, so neither model's logits survive the chunk, and nothing is
recomputed in backward (3 vocab-sized matmuls per token: teacher forward, student forward, student dgrad).

Conventions (all per token, summed over the vocabulary; reductions are the caller's ``weights``):

* ``forward_kl``: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` — Hinton's temperature with the ``T^2`` factor
  that keeps gradient magnitudes independent of ``T``.
* ``generalized_jsd``: TRL's ``GKDTrainer.generalized_jsd_loss`` (huggingface/trl, trl/experimental/gkd):
  logits divided by ``temperature`` (no ``T^2`` factor); ``beta == 0`` is exactly forward
  ``KL(teacher || student)``, ``beta == 1`` exactly reverse ``KL(student || teacher)``; otherwise with the
  mixture ``m = beta * teacher + (1 - beta) * student`` the loss is
  ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)`` (which tends to 0, not to a KL, as beta -> 0 or 1:
  hence the special cases).
* data cross-entropy (optional, phase 1's ``--ce-weight``): ``-log softmax(z_s)[label]`` at temperature 1 on
  the data's next token, added in the same chunk pass with its own per-row weights (0 where a row has no label).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import LOSS_IMPLS

__all__ = [
    "softcap", "lm_logits", "forward_kl", "generalized_jsd", "data_ce", "per_token_loss_fn", "chunked_logit_loss",
    "hidden_state_loss",
]


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's ``final_logit_softcapping``: ``tanh(logits / cap) * cap`` (same op order as transformers)."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logits of a Gemma-4 ``lm_head``: ``softcap(hidden @ weight.T)``, computed in fp32 after the matmul.

    ``hidden`` [..., d], ``weight`` [V, d] (both in the matmul dtype) -> fp32 [..., V]. With fp32 inputs this is
    bit-identical to ``Gemma4ForCausalLM.forward(...).logits``; with bf16 inputs it differs from transformers'
    bf16 path only in that the softcap runs in fp32 instead of on bf16-rounded logits.
    """
    return softcap((hidden @ weight.T).float(), cap)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token ``T^2 * KL(p_teacher || q_student)`` at temperature ``T``: [..., V] fp32 logits -> [...]."""
    t = float(temperature)
    s_logp = F.log_softmax(student_logits / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits / t, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1) * (t * t)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token generalized JSD with TRL's convention (see module docstring): [..., V] fp32 logits -> [...]."""
    t = float(temperature)
    s_logp = F.log_softmax(student_logits / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits / t, dim=-1)
    if beta == 0:
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # KL(teacher || student)
    if beta == 1:
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)  # KL(student || teacher)
    # log m = logsumexp(log(1-beta) + log q, log(beta) + log p), stable for tiny probabilities
    m_logp = torch.logaddexp(s_logp + math.log1p(-beta), t_logp + math.log(beta))
    kl_teacher = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
    kl_student = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def per_token_loss_fn(kind: str, *, temperature: float = 1.0, beta: float = 0.5) -> Callable:
    """``fn(student_logits, teacher_logits) -> per-token loss`` for ``kind`` in {"forward_kl", "gjsd"}."""
    if kind == "forward_kl":
        fn = lambda s, t: forward_kl(s, t, temperature)  # noqa: E731
    elif kind == "gjsd":
        fn = lambda s, t: generalized_jsd(s, t, beta, temperature)  # noqa: E731
    else:
        raise ValueError(f"unknown logit loss {kind!r}; choose forward_kl or gjsd")
    fn.kind, fn.temperature, fn.beta = kind, float(temperature), float(beta)  # read by the "fused" path
    return fn


def data_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``-log softmax(z)[label]``: [..., V] fp32 logits, [...] int64 labels -> [...]."""
    z = student_logits
    return torch.logsumexp(z, dim=-1) - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _chunk_loss_autograd_part(loss_fn, cap, with_ce: bool = False):
    """``(y_s, y_t, w[, labels, w_ce]) -> (sum(w * loss_fn(softcap(y_s), softcap(y_t))), sum(w_ce * CE))`` on raw
    (pre-softcap) chunk logits: the element-wise part of a chunk that the "autograd" path differentiates (and that
    ``compile`` hands to ``torch.compile``, whose AOTAutograd backward then fuses the vocab-sized passes too).
    Without ``with_ce`` the CE value is a constant 0."""
    def part(y_s, y_t, w, labels=None, w_ce=None):
        z_s = softcap(y_s.float(), cap)
        kl = (loss_fn(z_s, softcap(y_t.float(), cap)) * w).sum()
        ce = (data_ce(z_s, labels) * w_ce).sum() if with_ce else torch.zeros((), device=y_s.device)
        return kl, ce
    return part


def _forward_kl_value_and_grad(y_s: torch.Tensor, y_t: torch.Tensor, w: torch.Tensor, cap: float | None,
                               temperature: float, labels: torch.Tensor | None = None,
                               w_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward KL (plus, with ``labels``, the data CE) of one chunk with its gradient written out by hand.

    y_s, y_t: [n, V] raw logits (``hidden @ lm_head.T``, matmul dtype); w: [n] fp32 row weights; labels: [n]
    int64 data tokens and w_ce: [n] fp32 their weights (0 for rows without a label), or both None.
    Returns ``(sum_i w_i * T^2 KL_i, sum_i w_ce_i * CE_i (0-dim fp32 each), dL/dy_s [n, V] in y_s.dtype)``:
    with ``t = tanh(y/c)``, ``z = c t``, ``q = softmax(z_s/T)``, ``p = softmax(z_t/T)``:
    ``dL/dz_s = w T (q - p) + w_ce (softmax(z_s) - onehot(label))`` and ``dL/dy_s = dL/dz_s * (1 - t_s^2)`` — the
    same chain autograd walks (``.float()``, ``/c``, tanh, ``*c``, ``/T``, log_softmax), in one element-wise pass
    instead of ~12, and no ``[n, V]`` fp32 tensor kept for a backward. Equal to the autograd path to fp32 rounding.
    """
    t = float(temperature)
    ys = y_s.float()
    z_t = softcap(y_t.float(), cap)
    if cap is not None:
        th = torch.tanh(ys / cap)  # kept for the chain rule below
        z_s = th * cap
    else:
        z_s = ys
    s_logp = F.log_softmax(z_s / t, dim=-1)
    t_logp = F.log_softmax(z_t / t, dim=-1)
    p = t_logp.exp()
    loss = ((p * (t_logp - s_logp)).sum(-1) * (t * t) * w).sum()
    g = (s_logp.exp() - p) * (w * t)[:, None]
    ce = torch.zeros((), dtype=torch.float32, device=y_s.device)
    if labels is not None:  # + w_ce (softmax(z_s) - onehot), in place: no further [n, V] tensor at T == 1
        logp1 = s_logp if t == 1.0 else F.log_softmax(z_s, dim=-1)
        ce = -(logp1.gather(-1, labels[:, None]).squeeze(-1) * w_ce).sum()
        g.addcmul_(logp1.exp_(), w_ce[:, None])  # logp1 (s_logp at T == 1) is not read again
        g.scatter_add_(-1, labels[:, None], -w_ce[:, None])
    if cap is not None:
        g = g * (1.0 - th * th)
    return loss, ce, g.to(y_s.dtype)


_COMPILED: dict = {}


def _compiled(fn, key):
    """``torch.compile(fn)`` once per ``key`` (static shapes: a run has at most two chunk sizes)."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


class _ChunkedLogitLoss(torch.autograd.Function):
    """Forward computes loss and its gradients chunk by chunk; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, weights, loss_fn, cap, chunk, compute_dtype, impl, compile_, labels,
                ce_weights, stats):
        need_w = ctx.needs_input_grad[1]
        with_ce = labels is not None
        grad_h = torch.empty_like(h_s)
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        total_ce = torch.zeros((), dtype=torch.float32, device=h_s.device)
        with torch.no_grad():  # one cast per call, not per chunk
            w_t_c = w_t.to(compute_dtype)
            w_s_c = w_s.to(compute_dtype)
        if impl == "fused":
            fused = _forward_kl_value_and_grad
            if compile_:
                fused = _compiled(_forward_kl_value_and_grad, ("fused", cap, loss_fn.temperature, with_ce))

            def chunk_fn(y_s, y_t, w, lab, w_ce):  # dL/dy_s written out by hand
                return fused(y_s, y_t, w, cap, loss_fn.temperature, lab, w_ce)
        else:
            part = _chunk_loss_autograd_part(loss_fn, cap, with_ce)
            if compile_ and getattr(loss_fn, "kind", None) is not None:
                part = _compiled(part, ("autograd", loss_fn.kind, loss_fn.temperature, loss_fn.beta, cap, with_ce))

            def chunk_fn(y_s, y_t, w, lab, w_ce):  # dL/dy_s by autograd through the element-wise part only
                with torch.enable_grad():
                    y = y_s.detach().requires_grad_()
                    loss, ce = part(y, y_t, w, lab, w_ce)
                    (g,) = torch.autograd.grad(loss + ce if with_ce else loss, y)
                return loss.detach(), ce.detach(), g
        with torch.autocast(h_s.device.type, enabled=False), torch.no_grad():
            for i in range(0, h_s.shape[0], chunk):
                h_c = h_s[i:i + chunk].to(compute_dtype)
                y_s = h_c @ w_s_c.T
                y_t = h_t[i:i + chunk].to(compute_dtype) @ w_t_c.T
                lab, w_ce = (labels[i:i + chunk], ce_weights[i:i + chunk]) if with_ce else (None, None)
                loss, ce, g = chunk_fn(y_s, y_t, weights[i:i + chunk], lab, w_ce)  # g = dL/dy_s [n, V]
                del y_s, y_t
                # the matmul backward by hand, in the matmul dtype like autograd's (the copy into grad_h
                # rounds to h_s.dtype exactly as autograd's backward of ``.to(compute_dtype)`` does)
                grad_h[i:i + chunk] = g @ w_s_c
                if need_w:
                    grad_w += g.T @ h_c
                total += loss
                total_ce += ce
                del g, loss, ce
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w = need_w
        ctx.w_dtype = w_s.dtype
        if stats is not None:
            stats.update(logit=total.detach().clone(), ce=total_ce.detach().clone())
        return total + total_ce

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.need_w else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None, None


@torch.no_grad()
def _chunked_loss_value(h_s, w_s, h_t, w_t, weights, loss_fn, cap, chunk, compute_dtype, labels, ce_weights,
                        stats):
    w_s_c, w_t_c = w_s.to(compute_dtype), w_t.to(compute_dtype)
    total = torch.zeros((), dtype=torch.float32, device=h_s.device)
    total_ce = torch.zeros((), dtype=torch.float32, device=h_s.device)
    with torch.autocast(h_s.device.type, enabled=False):
        for i in range(0, h_s.shape[0], chunk):
            z_s = lm_logits(h_s[i:i + chunk].to(compute_dtype), w_s_c, cap)
            z_t = lm_logits(h_t[i:i + chunk].to(compute_dtype), w_t_c, cap)
            total += (loss_fn(z_s, z_t) * weights[i:i + chunk]).sum()
            if labels is not None:
                total_ce += (data_ce(z_s, labels[i:i + chunk]) * ce_weights[i:i + chunk]).sum()
    if stats is not None:
        stats.update(logit=total.clone(), ce=total_ce.clone())
    return total + total_ce


def chunked_logit_loss(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                       weights: torch.Tensor, loss_fn: Callable, *, cap: float | None, chunk: int = 1024,
                       compute_dtype: torch.dtype | None = None, impl: str = "autograd",
                       compile: bool = False, labels: torch.Tensor | None = None,
                       ce_weights: torch.Tensor | None = None, stats: dict | None = None) -> torch.Tensor:
    """``sum_i weights[i] * loss_fn(student_logits_i, teacher_logits_i)`` without materialising full logits.

    h_s: [N, d_s] student final hidden states (post final norm), any float dtype, may require grad.
    w_s: [V, d_s] student ``lm_head`` weight (grad computed only if it requires grad).
    h_t: [N, d_t], w_t: [V, d_t]: teacher's, never differentiated.
    weights: [N] fp32 per-token weights (mask / normaliser, e.g. ``1/N`` for a mean).
    loss_fn: per-token loss on fp32 logits ``[n, V] x [n, V] -> [n]`` (see :func:`per_token_loss_fn`).
    cap: ``final_logit_softcapping`` (None: none). chunk: rows per chunk (peak memory ~ a few ``chunk x V`` fp32).
    compute_dtype: matmul dtype (default ``h_s.dtype``); logits and losses are always fp32.
    impl: how a chunk's gradient is made — "autograd" (``torch.autograd.grad`` through the loss; any loss_fn)
    or "fused" (forward KL only: the gradient written out by hand, one element-wise pass, see
    :func:`_forward_kl_value_and_grad`). compile: ``torch.compile`` the chunk's element-wise part (either impl).
    labels: [N] int64 data tokens in [0, V) with ce_weights: [N] fp32 (0 where a row has no label): adds
    ``sum_i ce_weights[i] * CE(student_logits_i, labels[i])`` (:func:`data_ce`, temperature 1) in the same pass.
    stats: if given, receives ``{"logit": the loss_fn sum, "ce": the CE sum}`` (detached 0-dim fp32).
    Returns a 0-dim fp32 tensor (the sum of both terms). Gradients equal those of the unchunked computation.
    """
    if h_s.dim() != 2 or h_t.dim() != 2 or h_s.shape[0] != h_t.shape[0] or weights.shape != (h_s.shape[0],):
        raise ValueError(f"chunked_logit_loss: shapes h_s {tuple(h_s.shape)}, h_t {tuple(h_t.shape)}, "
                         f"weights {tuple(weights.shape)} do not agree ([N, d], [N, d], [N])")
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"chunked_logit_loss: student vocab {w_s.shape[0]} != teacher vocab {w_t.shape[0]}")
    if chunk < 1:
        raise ValueError(f"chunked_logit_loss: chunk must be >= 1, got {chunk}")
    if impl not in LOSS_IMPLS:
        raise ValueError(f"chunked_logit_loss: impl {impl!r}; choose one of {LOSS_IMPLS}")
    if impl == "fused" and getattr(loss_fn, "kind", None) != "forward_kl":
        raise ValueError("chunked_logit_loss: impl 'fused' is written for forward KL only (per_token_loss_fn("
                         "'forward_kl')); use impl 'autograd' for other losses")
    if (labels is None) != (ce_weights is None):
        raise ValueError("chunked_logit_loss: give labels and ce_weights together (or neither)")
    if labels is not None:
        if labels.shape != (h_s.shape[0],) or ce_weights.shape != (h_s.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"chunked_logit_loss: labels {tuple(labels.shape)} {labels.dtype} / ce_weights "
                             f"{tuple(ce_weights.shape)}: need int64 [N] and [N] with N = {h_s.shape[0]}")
        ce_weights = ce_weights.float()
    if not (torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad)):
        return _chunked_loss_value(h_s, w_s, h_t, w_t, weights.float(), loss_fn, cap, int(chunk),
                                   compute_dtype or h_s.dtype, labels, ce_weights, stats)
    return _ChunkedLogitLoss.apply(h_s, w_s, h_t, w_t, weights.float(), loss_fn, cap, int(chunk),
                                   compute_dtype or h_s.dtype, impl, bool(compile), labels, ce_weights, stats)


def _normalised_mse(h_s: torch.Tensor, h_t: torch.Tensor, eps: float) -> torch.Tensor:
    hs, ht = h_s.float(), h_t.float()
    return ((hs - ht).pow(2).sum(-1) / (ht.pow(2).sum(-1) + eps)).mean()


def _normalised_mse_grad(h_s: torch.Tensor, h_t: torch.Tensor, eps: float, g: torch.Tensor) -> torch.Tensor:
    """``d/dh_s`` of :func:`_normalised_mse` times the upstream scalar ``g``: ``2 g (h_s - h_t) / (||h_t||^2 +
    eps) / n_tokens``, in ``h_s.dtype`` (one reduction and one element-wise pass)."""
    hs, ht = h_s.float(), h_t.float()
    n = math.prod(hs.shape[:-1])
    scale = (2.0 / n) * g.float() / (ht.pow(2).sum(-1, keepdim=True) + eps)
    return ((hs - ht) * scale).to(h_s.dtype)


class _FusedNormalisedMSE(torch.autograd.Function):
    """:func:`_normalised_mse` with its gradient written out (:func:`_normalised_mse_grad`), both compiled: two
    fused kernels per layer instead of the ~10 eager ones autograd runs forward, recomputes and differentiates.
    Keeps only ``h_s`` / ``h_t``, which the caller holds anyway (a layer output and the teacher's state)."""

    @staticmethod
    def forward(ctx, h_s, h_t, eps):
        ctx.save_for_backward(h_s, h_t)
        ctx.eps = eps
        return _compiled(_normalised_mse, ("hidden_value", eps))(h_s, h_t, eps)

    @staticmethod
    def backward(ctx, g):
        h_s, h_t = ctx.saved_tensors
        return _compiled(_normalised_mse_grad, ("hidden_grad", ctx.eps))(h_s, h_t, ctx.eps, g), None, None


def hidden_state_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                      layer_weights: list[float], eps: float = 1e-6,
                      compile: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted per-layer normalised MSE: ``sum_l w_l * mean_tokens(||h_s - h_t||^2 / (||h_t||^2 + eps))``.

    Each entry is a [..., d] hidden state (student may require grad; teacher is constant). The ratio is per
    token, so a few huge-norm tokens (Gemma's first position) do not dominate a layer. Each layer's term runs
    under activation checkpointing: the fp32 difference is recomputed in backward instead of kept. With
    ``compile`` the term and its hand-written gradient are compiled instead (:class:`_FusedNormalisedMSE`;
    equal to the default to fp32 rounding). Returns ``(total, [per-layer value, detached])``.
    """
    if not (len(student_hidden) == len(teacher_hidden) == len(layer_weights)):
        raise ValueError("hidden_state_loss: student/teacher/weight lists differ in length")
    total = None
    parts = []
    for hs, ht, w in zip(student_hidden, teacher_hidden, layer_weights):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden_state_loss: student hidden {tuple(hs.shape)} != teacher {tuple(ht.shape)}")
        if hs.requires_grad and compile:
            v = _FusedNormalisedMSE.apply(hs, ht.detach(), float(eps))
        elif hs.requires_grad:
            v = checkpoint(_normalised_mse, hs, ht.detach(), eps, use_reentrant=False)
        else:
            v = _normalised_mse(hs, ht, eps)
        parts.append(v.detach())
        total = w * v if total is None else total + w * v
    return total, parts
