"""Channel importance of a gated MLP ``down(act(gate(x)) * up(x))`` and top-k channel selection.

For channel ``j`` of one layer, with ``a_tj = act(gate(x_t))_j * up(x_t)_j`` over calibration tokens ``t``
(:class:`prune.stack.ChannelStats`) and ``agg`` = ``l2`` (``sqrt(sum_t a_tj^2)``) or ``mean`` (``mean_t |a_tj|``):

=============  ============================================  =====================================================
criterion      score_j                                       reading
=============  ============================================  =====================================================
activation     agg_t(a_tj)                                   Minitron's neuron importance (activation size)
wanda          agg_t(a_tj) * ||down[:, j]||_2                Wanda for a whole channel: with l2, EXACTLY the
                                                             Frobenius norm of the channel's contribution
                                                             ``a_j (x) down[:, j]`` to the MLP output
taylor         agg_w(delta_wj)                               first-order change of the model's next-token loss on
                                                             calibration window w when channel j is removed
                                                             (prune/taylor.py; agg over windows, not tokens)
magnitude      ||[gate[j, :], up[j, :], down[:, j]]||_2      data-free: size of the channel's weights
random         uniform(0, 1), torch.Generator(seed)          data-free baseline
=============  ============================================  =====================================================

Scores are float32 (computed from the bf16 weights upcast); higher = more important.
"""
from __future__ import annotations

import torch

from .stack import ChannelStats

__all__ = ["channel_scores", "select_channels"]


def _activation(stats: ChannelStats, aggregation: str) -> torch.Tensor:
    return (stats.l2() if aggregation == "l2" else stats.mean_abs()).float()


def channel_scores(criterion: str, mlp, stats: ChannelStats | None = None, aggregation: str = "l2",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 ``[I]`` importance of each intermediate channel of ``mlp`` (``gate_proj``/``up_proj``/``down_proj``
    ``nn.Linear``; weights ``[I, H]``, ``[I, H]``, ``[H, I]``). ``stats`` is needed by activation/wanda (the
    intermediate activations') and taylor (the loss changes', :func:`prune.taylor.taylor_stats`), ``generator``
    by random."""
    width = mlp.down_proj.in_features
    if criterion in ("activation", "wanda", "taylor"):
        if stats is None or stats.width != width:
            raise ValueError(f"criterion {criterion} needs calibration statistics of width {width}")
        score = _activation(stats, aggregation)
        if criterion == "wanda":
            score = score * mlp.down_proj.weight.float().norm(dim=0).cpu()
        return score
    if criterion == "magnitude":
        sq = (mlp.gate_proj.weight.float().square().sum(1) + mlp.up_proj.weight.float().square().sum(1)
              + mlp.down_proj.weight.float().square().sum(0))
        return sq.sqrt().cpu()
    if criterion == "random":
        return torch.rand(width, generator=generator)
    raise ValueError(f"unknown criterion {criterion!r}")


def select_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """int64 indices of the ``keep`` highest ``scores``, in ascending channel order (the kept channels keep
    their relative order). Ties go to the lower index (stable sort), so the choice is deterministic."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} channels")
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:keep].sort().values
