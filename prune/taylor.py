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

Cost and memory: the whole model runs forward and backward in fp32 on ``device`` once per batch of windows
(weights need no gradients: only the gates do, ``[B, I]`` per layer), so unlike
:func:`prune.stack.collect_mlp_stats` the whole model must fit on the device in fp32 with one batch's
activations and logits (E4B with its towers: ~32 GB + 8 x 512 x 262144 fp32 logits, 4.3 GB, and their
softcap / log-softmax copies). The sums over windows are float64.
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
    windows): ``l2()`` and ``mean_abs()`` are the two ``--agg`` scores. ``progress``: advanced once per batch.

    For the pass the model is moved to ``device`` and computes in fp32 (an fp64 model in fp64); afterwards every
    parameter and buffer is back where it was with its own dtype (bf16 -> fp32 -> bf16 is exact, so the model is
    bit-identical) and the ``requires_grad`` flags are restored, also when the pass fails."""
    # inference_mode(False): under a caller's inference mode the restored weights (and the sums) would become
    # inference tensors
    with torch.inference_mode(False):
        return _taylor_stats(model, input_ids, batch_size, torch.device(device), progress)


def _taylor_stats(model, input_ids, batch_size, device, progress):
    layers = language_stack(model).layers
    stats = [ChannelStats(layer.mlp.down_proj.in_features) for layer in layers]
    gates: list[torch.Tensor | None] = [None] * len(layers)
    # fp32 through the whole pass, not only at the gates: with bf16 activations and gradients the scores of the
    # first layers of a trained micro model were 7-13 % off (median) and 18-27 of 512 kept channels changed;
    # in fp32 they match an fp64 pass to ~3e-5
    dtype = torch.promote_types(layers[0].mlp.down_proj.weight.dtype, torch.float32)
    tensors = [*model.parameters(), *model.buffers()]
    homes = [(t.device, t.dtype) for t in tensors]
    flags = [p.requires_grad for p in model.parameters()]

    def gate_hook(i):
        def hook(module, args):
            return (args[0] * gates[i][:, None, :].to(args[0].dtype), *args[1:])
        return hook

    handles = []
    try:
        model.requires_grad_(False)
        handles = [layer.mlp.down_proj.register_forward_pre_hook(gate_hook(i))
                   for i, layer in enumerate(layers)]
        for t in tensors:  # in place (Parameter objects and ties stay), on device; floats: at least dtype
            t.data = t.data.to(device, torch.promote_types(t.dtype, dtype) if t.is_floating_point() else None)
        with torch.enable_grad():
            for ids in input_ids.split(batch_size):
                ids = ids.to(device)
                for i, st in enumerate(stats):
                    gates[i] = torch.ones(ids.shape[0], st.width, dtype=dtype, device=device,
                                          requires_grad=True)
                logits = model(input_ids=ids, use_cache=False).logits
                # windows are independent, so d(sum_w L_w)/dm_wj = dL_w/dm_wj: one backward gives every window's
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
        for t, (dev, dt) in zip(tensors, homes):
            t.data = t.data.to(dev, dt)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the fp32 copy's blocks, for whoever uses the device next
    return stats
