"""Least-squares refit of a pruned MLP's ``down_proj`` (:func:`refit_down_proj`).

Pruning channel set ``R`` of an MLP ``y = W h`` (``W = down_proj.weight`` ``[H, I]``, ``h`` the intermediate
``act_fn(gate(x)) * up(x)`` ``[I]``) and keeping ``S`` leaves ``W[:, S] h_S``: the error on token ``t`` is
``W[:, R] h_R,t``. Some of it is predictable from the kept channels (activations are correlated), so instead of
``W[:, S]`` keep the ``W'`` that best reproduces the unpruned output on the calibration tokens. Writing
``W' = W[:, S] + D`` and ``C = sum_t h_t h_t^T`` (the Gram matrix, :class:`prune.stack.ChannelStats`):

    E(D) = sum_t ||W h_t - W' h_S,t||^2 + lambda ||D||_F^2 = sum_t ||W[:, R] h_R,t - D h_S,t||^2 + lambda ||D||_F^2

is a ridge regression of the dropped part on the kept channels; setting its gradient to zero gives

    D (C[S,S] + lambda I) = W[:, R] C[R,S]    so    W' = W[:, S] + W[:, R] C[R,S] (C[S,S] + lambda I)^-1.

With ``lambda = 0`` this is the plain normal-equation solution ``W C[:, S] C[S,S]^-1`` (because
``W[:, S] C[S,S] C[S,S]^-1 = W[:, S]``); with ``lambda > 0`` the damping pulls ``W'`` towards plain slicing
``W[:, S]`` rather than towards 0, so a weakly determined direction keeps its original weight.
``lambda = damp * mean(diag C[S,S])`` (GPTQ's relative damping): scale-free, and it makes ``C[S,S] + lambda I``
positive definite even when channels are dead or collinear on the calibration set.

Solved in float64 with a Cholesky factorisation of ``C[S,S] + lambda I`` (``|S|^3 / 3`` flops;
``cholesky_solve`` of ``C[S,R] W[:, R]^T``, ``[|S|, H]``); the result is cast to the weight's dtype once.

The reconstruction error on the calibration tokens is reported without a pass over them: with ``B = W[:, R]
C[R,S]``, plain slicing leaves ``e0 = tr(W[:, R] C[R,R] W[:, R]^T)`` and the refit ``e0 - <D, B> - lambda
||D||^2`` (using ``D C[S,S] = B - lambda D``), which is strictly smaller whenever ``D != 0``.

Memory on the solving device: the float64 Gram ``8 I^2`` bytes (E4B: 0.84 GB; double-wide layers 3.4 GB) and,
while solving, its kept/removed blocks and the Cholesky factor: about 2.6 times the Gram at the peak (E4B about
2.2 GB, double-wide layers about 8.7 GB), plus the ``[I, H]``-sized right-hand sides. The Gram covers the layer's own width, so
Gemma-4's double-wide layers (``2 * intermediate_size`` channels, keep ``2 * kept``) line up with ``keep``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RefitResult", "refit_down_proj"]


@dataclass(frozen=True)
class RefitResult:
    """``weight``: the new kept ``down_proj`` columns ``[H, |S|]`` in the input weight's dtype and device.
    ``error_before`` / ``error_after``: the float64 solution's summed squared reconstruction error of the
    unpruned ``down_proj`` output over the calibration tokens, plain slicing vs refit."""

    weight: torch.Tensor
    error_before: float
    error_after: float


@torch.no_grad()
def refit_down_proj(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01,
                    where: str = "layer") -> RefitResult:
    """Least-squares kept columns of ``weight`` (``down_proj.weight``, ``[H, I]``, any float dtype) for kept
    channels ``keep`` (int64 ``[k]``, ascending, unique, ``0 < k <= I``) given ``gram`` (float64 ``[I, I]``,
    ``sum_t h_t h_t^T`` over calibration tokens; computed on its device). See the module docstring.

    Raises ``ValueError`` (naming ``where``) for shape mismatches or a Gram that is not finite or whose
    damped kept block is not positive definite."""
    width = weight.shape[1]
    if gram.shape != (width, width) or gram.dtype != torch.float64:
        raise ValueError(f"{where}: Gram matrix {tuple(gram.shape)} {gram.dtype} does not match down_proj width "
                         f"{width} (float64 [{width}, {width}] expected)")
    if not damp > 0:
        raise ValueError(f"{where}: refit damping {damp} must be > 0")
    dev = gram.device
    keep = keep.to(dev)
    mask = torch.ones(width, dtype=torch.bool, device=dev)
    mask[keep] = False
    drop = mask.nonzero().squeeze(1)
    def sliced():  # plain slicing, W[:, S] (a new tensor): the answer when there is nothing to refit
        return weight.detach().index_select(1, keep.to(weight.device))

    if drop.numel() == 0:  # nothing removed: the refit is the identity
        return RefitResult(sliced(), 0.0, 0.0)
    if not torch.isfinite(gram).all():
        raise ValueError(f"{where}: the calibration Gram matrix has non-finite entries (inf/nan activations); "
                         f"refit impossible, run without --refit or check the model/calibration data")
    w = weight.detach().to(dev, torch.float64)
    w_s, w_r = w.index_select(1, keep), w.index_select(1, drop)
    g_s = gram.index_select(0, keep)
    c_ss, c_sr = g_s.index_select(1, keep), g_s.index_select(1, drop)
    del g_s
    c_rr = gram.index_select(0, drop).index_select(1, drop)
    e0 = float((w_r * (w_r @ c_rr)).sum())
    mean_diag = float(c_ss.diagonal().mean())
    if mean_diag == 0.0:  # every kept channel is 0 on every calibration token: nothing to regress on
        return RefitResult(sliced(), e0, e0)
    lam = damp * mean_diag
    c_ss.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(c_ss)
    if int(info) != 0:
        raise ValueError(f"{where}: damped Gram block of the kept channels is not positive definite (leading "
                         f"minor {int(info)}); use a larger --refit-damp")
    b_t = c_sr @ w_r.T  # [k, H] = (W[:, R] C[R,S])^T
    d = torch.cholesky_solve(b_t, factor).T  # [H, k]
    e1 = e0 - float((d * b_t.T).sum()) - lam * float(d.square().sum())
    new = (w_s + d).to(weight.device, weight.dtype)
    return RefitResult(new, e0, e1)
