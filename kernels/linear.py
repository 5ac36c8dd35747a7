"""``W4A16Linear`` and :func:`swap_w4a16_linears`: run a transformers model loaded from a pack-quantized checkpoint
on pdqkit's fast W4A16 GEMM (``torch.ops.pdqkit.w4a16_gemm``).

What transformers 5.17 + compressed-tensors 0.19 leave after ``from_pretrained(<pack-quantized dir>)`` (default
``dequantize=False``): every quantized ``nn.Linear`` still holds the checkpoint tensors as parameters
``weight_packed [N, K/8] int32``, ``weight_scale [N, K/G]``, ``weight_shape [2]`` and no ``weight``; a forward
pre-hook on the model (``model.ct_decompress_hook``) would decompress them all to bf16 on the first forward.
:func:`swap_w4a16_linears` replaces those Linears by :class:`W4A16Linear` (same tensors, no copy beyond a dtype
cast of the scales) and removes the hook. For a model that was already decompressed (``dequantize=True``, or
after a first forward) pass ``checkpoint=`` to re-read the packed tensors from its safetensors files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.pdqkit.w4a16_gemm)
from .counters import reserve
from .w4a16 import check_w4a16_args, group_supported, shape_supported

__all__ = ["W4A16Linear", "swap_w4a16_linears"]


class W4A16Linear(nn.Module):
    """Linear layer with an int4 (group-wise, symmetric) weight in the compressed-tensors layout.

    Buffers ``weight_packed [N, K/8] int32``, ``weight_scale [N, K/G]`` (activation dtype: bf16 or fp16) and
    ``weight_shape [2] int64`` (``[N, K]``, so that ``save_pretrained`` writes a checkpoint compressed-tensors can load
    back), optional ``bias [N]``. ``forward(x[..., K]) -> [..., N]`` calls ``torch.ops.pdqkit.w4a16_gemm`` (see its
    docstring for the numerics).
    """

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or weight_scale.dtype
        _check_dtype(dtype)
        weight_packed, weight_scale = weight_packed.contiguous(), weight_scale.to(dtype).contiguous()
        # the op's own rules, now rather than at the first forward (an x of no rows stands for the activations)
        k = weight_packed.shape[-1] * 8 if weight_packed.dim() else 0
        check_w4a16_args(weight_packed.new_empty((0, k), dtype=dtype), weight_packed, weight_scale,
                         None if bias is None else bias.to(dtype), name="W4A16Linear")
        self.out_features, self.in_features = weight_packed.shape[0], weight_packed.shape[1] * 8
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_shape", torch.tensor([self.out_features, self.in_features], dtype=torch.int64,
                                                          device=weight_packed.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight_scale.dtype:
            raise TypeError(f"W4A16Linear built for {self.weight_scale.dtype} activations got {x.dtype}; "
                            "pass dtype= to swap_w4a16_linears")
        return torch.ops.pdqkit.w4a16_gemm(x, self.weight_packed, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        g = self.in_features // self.weight_scale.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={g}, "
                f"bias={self.bias is not None}, dtype={self.weight_scale.dtype}")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"W4A16 layers compute in bfloat16 or float16 activations, not {dtype}; load the model with "
                         "dtype=torch.bfloat16 (or pass dtype= to swap_w4a16_linears)")


def _still_compressed(module: nn.Module) -> bool:
    """Whether compressed-tensors' decompression hook still has work on ``module``: packed codes, or integer
    weights with scales (8-bit formats), on a module of any type, unless it is ours."""
    if isinstance(module, W4A16Linear):
        return False
    if getattr(module, "weight_packed", None) is not None:
        return True
    w = getattr(module, "weight", None)
    scaled_ints = isinstance(w, torch.Tensor) and not w.is_floating_point()
    return scaled_ints and getattr(module, "weight_scale", None) is not None


def _symmetric_int4(module: nn.Module, extra) -> bool:
    """The layer holds what W4A16Linear computes: 4-bit symmetric integer codes, no nonzero zero point (compressed-
    tensors registers an all-zero one for symmetric schemes too), no act-order indices. ``extra(name)`` looks a
    tensor up in the module or the checkpoint."""
    qs = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if qs is not None and (qs.num_bits != 4 or not qs.symmetric or str(getattr(qs.type, "value", qs.type)) != "int"
                           or getattr(qs, "actorder", None) not in (None, False)):
        return False
    zp = extra("weight_zero_point")
    return (zp is None or not bool(zp.ne(0).any())) and extra("weight_g_idx") is None


def _checkpoint_reader(checkpoint: str | Path):
    """``key -> tensor`` reader over a checkpoint dir's safetensors files (lazy, one file open per lookup)."""
    from safetensors import safe_open

    ckpt = Path(checkpoint)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        where = {k: ckpt / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = sorted(ckpt.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{ckpt}: no *.safetensors files (expected a pack-quantized checkpoint dir)")
        where = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                where.update({k: f for k in h.keys()})

    def read(key: str) -> torch.Tensor | None:
        if key not in where:
            return None
        with safe_open(where[key], framework="pt") as h:
            return h.get_tensor(key)

    return read


def swap_w4a16_linears(model: nn.Module, checkpoint: str | Path | None = None,
                       dtype: torch.dtype | None = None) -> list[str]:
    """Replace every int4 pack-quantized Linear of ``model`` by :class:`W4A16Linear`; returns the swapped names.

    Sources, per module: its own ``weight_packed``/``weight_scale`` parameters (a model as loaded, still
    compressed), else — when ``checkpoint`` (a pack-quantized checkpoint dir) is given — the tensors
    ``<name>.weight_packed``/``<name>.weight_scale`` read from its safetensors. ``dtype``: activation dtype
    (default: the dtype of the model's first floating-point parameter; bf16 or fp16, else ``ValueError`` before
    anything changes). Linears whose shape or scales the kernel refuses (N % 64, K % 128, scales not ``[N, K/G]``)
    are left alone (and stay with compressed-tensors' decompression). The model's compressed-tensors decompression
    hook is removed only when no module, of any type, is left for it to decompress. On every GPU that holds a
    swapped layer the split-K kernels' tile counters are allocated now (:func:`kernels.counters.reserve`), so that a
    CUDA-graph capture (``torch.compile(mode="reduce-overhead")``, a static-cache generate) never has to create them.
    """
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    _check_dtype(dtype)
    read = _checkpoint_reader(checkpoint) if checkpoint is not None else None
    swapped, devices = [], set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, W4A16Linear):
            continue
        wp, ws = getattr(module, "weight_packed", None), getattr(module, "weight_scale", None)
        compressed = wp is not None and ws is not None
        if not compressed and read is not None:
            wp, ws = read(f"{name}.weight_packed"), read(f"{name}.weight_scale")
        if wp is None or ws is None or wp.dtype != torch.int32:
            continue
        n, k = wp.shape[0], wp.shape[1] * 8

        def extra(suffix, name=name, module=module):
            t = getattr(module, suffix, None)
            return t if t is not None or read is None else read(f"{name}.{suffix}")

        groups = ws.shape[1] if ws.dim() == 2 and ws.shape[0] == n else 0   # e.g. block scales [N/128, K/128]: no
        group_ok = groups > 0 and k % groups == 0 and group_supported(k // groups, k)
        if not shape_supported(n, k) or k != module.in_features or not group_ok or not _symmetric_int4(module, extra):
            continue
        device = next((t.device for t in module.parameters(recurse=False)), wp.device)
        new = W4A16Linear(wp.detach().to(device), ws.detach().to(device), module.bias, dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
        devices.add(new.weight_packed.device)
    for device in devices:
        if device.type == "cuda":
            reserve(device)
    hook = getattr(model, "ct_decompress_hook", None)
    if hook is not None and swapped and not any(_still_compressed(m) for m in model.modules()):
        hook.remove()
        delattr(model, "ct_decompress_hook")
    return swapped
