"""Loss-aware channel importance (``--criterion taylor``): how much each MLP channel matters to the model's own
next-token loss, from one backward pass per calibration batch.

Put a gate ``m_j`` (1 in the model as it is) on every intermediate channel ``j`` of every layer's MLP, one gate
per calibration window ``w``: the down_proj input becomes ``a_twj * m_wj``. Removing channel ``j`` is
``m_j = 0``, and to first order the window's loss changes by

    delta_wj = -dL_w/dm_wj = -sum_t dL_w/da_twj * a_twj        (first-order Taylor, Molchanov et al. 2019)

where ``L_w`` is the unpruned model's mean next-token cross-entropy on window ``w``. On the data a model was
trained on its loss is near a minimum, so the signed terms cancel across windows; the score aggregates their
size instead (``--agg``): ``l2`` = ``sqrt(sum_w delta_wj^2)`` (the square root of the empirical Fisher
information of the gate, Molchanov's criterion), ``mean`` = ``mean_w |delta_wj|``. Unlike the activation
criterion it weighs each channel by what the rest of the network does with its output (down_proj, the later
layers, the logits), for every layer at once.

Cost and memory: the whole model runs forward and backward on ``device`` once per batch of windows (weights
need no gradients: only the gates do, ``[B, I]`` per layer), so unlike :func:`prune.stack.collect_mlp_stats`
the whole model must fit on the device with one batch's activations (E4B in bf16: ~16 GB + activations).
The gradients flow in the model's dtype; the gates and the products they see are fp32 (fp64 for an fp64 model),
the sums over windows float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .stack import ChannelStats, language_stack

__all__ = ["taylor_stats"]


def _window_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 ``[B]``: mean next-token cross-entropy of each window (one window's fp32 logits at a time)."""
    return torch.stack([F.cross_entropy(logits[w, :-1].float(), ids[w, 1:]) for w in range(ids.shape[0])])


def taylor_stats(model, input_ids: torch.Tensor, *, batch_size: int = 8, device="cpu",
                 progress=None) -> list[ChannelStats]:
    """Per language-stack layer, a :class:`ChannelStats` over the first-order loss changes ``delta_wj`` of the
    calibration windows (``input_ids`` int64 ``[N, S]``; one value per window and channel, so ``tokens`` counts
    windows): ``l2()`` and ``mean_abs()`` are the two ``--agg`` scores. ``model`` is moved to ``device`` for the
    pass and back; its parameters' ``requires_grad`` flags are restored. ``progress``: advanced once per batch."""
    layers = language_stack(model).layers
    device = torch.device(device)
    home = next(model.parameters()).device
    stats = [ChannelStats(layer.mlp.down_proj.in_features) for layer in layers]
    gates: list[torch.Tensor | None] = [None] * len(layers)

    # the gates (and the products they see) in fp32, or fp64 for an fp64 model: a bf16 product would round each
    # token's a * dL/da before the sum over the window
    gate_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)

    def gate_hook(i):
        def hook(module, args):
            a = args[0]
            return ((a.to(gate_dtype) * gates[i][:, None, :]).to(a.dtype), *args[1:])
        return hook

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    handles = [layer.mlp.down_proj.register_forward_pre_hook(gate_hook(i)) for i, layer in enumerate(layers)]
    model.to(device)
    try:
        for ids in input_ids.split(batch_size):
            ids = ids.to(device)
            for i, st in enumerate(stats):
                gates[i] = torch.ones(ids.shape[0], st.width, dtype=gate_dtype, device=device, requires_grad=True)
            logits = model(input_ids=ids, use_cache=False).logits
            # the windows are independent, so d(sum_w L_w)/dm_wj = dL_w/dm_wj: one backward gives every window's
            grads = torch.autograd.grad(_window_losses(logits, ids).sum(), gates)
            del logits
            for st, g in zip(stats, grads):
                delta = g.detach().double().cpu()  # the sign is irrelevant to both aggregations
                st.sum_abs += delta.abs().sum(0)
                st.sum_sq += delta.square().sum(0)
                st.tokens += delta.shape[0]
            if progress is not None:
                progress.update(1)
    finally:
        for h in handles:
            h.remove()
        gates = [None] * len(layers)
        model.to(home)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return stats
