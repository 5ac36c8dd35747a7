"""Structural slicing of gated MLPs and the config field that describes their width."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["slice_mlp", "set_intermediate_size"]


def _take(linear: nn.Linear, index: torch.Tensor, dim: int, values: torch.Tensor | None = None) -> None:
    """Keep ``index`` along ``dim`` of ``linear.weight`` (0: output rows, with the bias; 1: input columns).
    ``values``: the kept slice's new contents (the weight's shape with ``index.numel()`` along ``dim``),
    written instead of the selected weights."""
    w = linear.weight.detach().index_select(dim, index) if values is None else values.to(linear.weight.device)
    linear.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).contiguous(), requires_grad=False)
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


def slice_mlp(mlp: nn.Module, keep: torch.Tensor, down_weight: torch.Tensor | None = None) -> None:
    """Keep intermediate channels ``keep`` (int64, ascending) of ``mlp`` in place: rows of ``gate_proj`` and
    ``up_proj`` (weights ``[I, H]`` -> ``[k, H]``), columns of ``down_proj`` (``[H, I]`` -> ``[H, k]``).
    ``down_proj``'s bias (if any) is per output and stays. ``down_weight`` (``[H, k]``, the weight's dtype, e.g.
    from :func:`prune.refit.refit_down_proj`) replaces the kept ``down_proj`` columns instead of copying them."""
    keep = keep.to(mlp.down_proj.weight.device)
    _take(mlp.gate_proj, keep, 0)
    _take(mlp.up_proj, keep, 0)
    if down_weight is not None:
        w = mlp.down_proj.weight
        if down_weight.shape != (w.shape[0], keep.numel()) or down_weight.dtype != w.dtype:
            raise ValueError(f"down_proj replacement {tuple(down_weight.shape)} {down_weight.dtype} does not match "
                             f"[{w.shape[0]}, {keep.numel()}] {w.dtype}")
    _take(mlp.down_proj, keep, 1, down_weight)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def set_intermediate_size(model, width: int) -> None:
    """Record the new MLP width in ``model``'s (text) config, which the decoder shares or mirrors."""
    for cfg in {id(c): c for c in (model.config.get_text_config(), model.get_decoder().config)}.values():
        cfg.intermediate_size = width
