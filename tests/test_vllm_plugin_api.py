"""The vLLM plugin's kernel classes against the two shapes of vLLM's mixed-precision kernel API they meet, on the CPU.

vLLM 0.26.0 (what the GPU tests run) gives ``MPLinearLayerConfig`` a ``has_g_idx`` field and returns
``(w_q, w_s, w_zp, w_gidx)`` from ``MPLinearKernel._get_weight_params``; vLLM 0.33.0 (PyPI's newest on 2026-12-02,
read from its wheel: it needs torch 2.14, which the GPU image does not have) dropped act-order, the field and
``w_gidx``. The stand-in package below has only what the plugin touches, in either shape; it is written from those
two interfaces, not copied. With it the plugin registers first, builds both kernel classes, answers
``can_implement`` and prepares the weights, and the fast kernel's ``apply_weights`` (the op's CPU path, the pure-torch
reference) matches ``x @ dequantize(W)^T`` computed here in float64, to within one bf16 rounding.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import sys
import types
from collections import namedtuple

import pytest
import torch

import kernels.vllm_plugin as plugin
from pack.observer import quantize_weight
from pack.packing import dequantize, pack_int4


class _Logger(logging.LoggerAdapter):
    def info_once(self, msg, *args):
        self.info(msg, *args)

    def warning_once(self, msg, *args):
        self.warning(msg, *args)


def _standin_vllm(shape: str) -> dict[str, types.ModuleType]:
    """``sys.modules`` entries of a minimal vLLM with the mixed-precision API of ``shape`` ("0.26" or "0.33")."""
    with_gidx = shape == "0.26"
    mods = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.envs", "vllm.config", "vllm.logger", "vllm.platforms", "vllm.model_executor",
        "vllm.model_executor.kernels", "vllm.model_executor.kernels.linear",
        "vllm.model_executor.kernels.linear.mixed_precision",
        "vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel",
        "vllm.model_executor.layers", "vllm.model_executor.layers.quantization",
        "vllm.model_executor.layers.quantization.utils",
        "vllm.model_executor.layers.quantization.utils.marlin_utils", "vllm.model_executor.parameter")}
    for name, mod in mods.items():  # each package holds its submodules as attributes, as after a real import
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)

    Platform = enum.Enum("PlatformEnum", "CUDA ROCM CPU")
    capability = namedtuple("DeviceCapability", "major minor")(9, 0)
    mods["vllm.platforms"].PlatformEnum = Platform
    mods["vllm.platforms"].current_platform = types.SimpleNamespace(
        is_cuda=lambda: True, get_device_capability=lambda: capability)
    mods["vllm.envs"].VLLM_MARLIN_USE_ATOMIC_ADD = False
    mods["vllm.config"].get_current_vllm_config_or_none = lambda: None
    mods["vllm.logger"].init_logger = lambda name: _Logger(logging.getLogger(name), {})
    mods["vllm.model_executor.layers.quantization.utils.marlin_utils"].USE_FP32_REDUCE_DEFAULT = True

    class BasevLLMParameter(torch.nn.Parameter):
        pass

    mods["vllm.model_executor.parameter"].BasevLLMParameter = BasevLLMParameter
    mods["vllm.model_executor.parameter"].permute_param_layout_ = lambda x, **dims: x

    fields = [("full_weight_shape", tuple), ("partition_weight_shape", tuple), ("weight_type", object),
              ("act_type", torch.dtype), ("group_size", int), ("zero_points", bool)]
    if with_gidx:
        fields.append(("has_g_idx", bool))
    fields.append(("out_type", object, dataclasses.field(default=None)))
    Config = dataclasses.make_dataclass("MPLinearLayerConfig", fields)

    class MPLinearKernel:
        def __init__(self, c, w_q_param_name, w_s_param_name, w_zp_param_name=None, *gidx):
            self.config, self.w_q_name, self.w_s_name, self.w_zp_name = c, w_q_param_name, w_s_param_name, \
                w_zp_param_name
            self.w_gidx_name = gidx[0] if with_gidx and gidx else None

        def _transform_param(self, layer, name, fn):
            setattr(layer, name, torch.nn.Parameter(fn(getattr(layer, name)), requires_grad=False))

        def _get_weight_params(self, layer):
            got = (getattr(layer, self.w_q_name), getattr(layer, self.w_s_name),
                   getattr(layer, self.w_zp_name or "", None))
            return got + (getattr(layer, self.w_gidx_name or "", None),) if with_gidx else got

    mp = mods["vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel"]
    mp.MPLinearKernel, mp.MPLinearLayerConfig = MPLinearKernel, Config
    linear = mods["vllm.model_executor.kernels.linear"]
    linear._POSSIBLE_KERNELS = {Platform.CUDA: [type("MarlinLinearKernel", (MPLinearKernel,), {})]}
    linear.register_linear_kernel = lambda cls, platform, kind: linear._POSSIBLE_KERNELS[platform].append(cls)
    return mods


@pytest.fixture
def standin(request, monkeypatch):
    """(shape, modules): the stand-in vLLM of ``request.param`` in ``sys.modules``; the plugin's vLLM-built caches
    cleared around."""
    mods = _standin_vllm(request.param)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(plugin, "logger", plugin.logger)  # _vllm_logger() replaces the module's logger
    plugin._kernel_classes.cache_clear()
    plugin._vllm_logger.cache_clear()
    yield request.param, mods
    plugin._kernel_classes.cache_clear()
    plugin._vllm_logger.cache_clear()


def _config(mods, shape, **kw):
    Config = mods["vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel"].MPLinearLayerConfig
    k, n = 256, 128
    args = {**dict(full_weight_shape=(k, n), partition_weight_shape=(k, n), weight_type="uint4b8",
                   act_type=torch.bfloat16, group_size=128, zero_points=False), **kw}
    if shape == "0.26":
        args.setdefault("has_g_idx", False)
    return Config(**args)


@pytest.mark.parametrize("standin", ["0.26", "0.33"], indirect=True)
def test_plugin_serves_both_api_shapes(standin, monkeypatch):
    """register() puts the chosen class first; both classes accept the pack-quantized layer and refuse zero
    points (and act-order where the API still has it); the fast kernel's output equals a float64 reference.
    Fails on the plugin before this session: ``c.has_g_idx`` and a four-way unpack of ``_get_weight_params``."""
    shape, standin = standin
    monkeypatch.setenv(plugin.ENV_VAR, "fast")
    plugin.register()
    cuda = standin["vllm.platforms"].PlatformEnum.CUDA
    kernels = standin["vllm.model_executor.kernels.linear"]._POSSIBLE_KERNELS[cuda]
    assert [k.__name__ for k in kernels] == ["PdqkitFastLinearKernel", "MarlinLinearKernel"]

    torch.manual_seed(0)
    w = (torch.randn(128, 256) * 0.05).to(torch.bfloat16)
    codes, scale = quantize_weight(w)
    x = torch.randn(3, 256).to(torch.bfloat16)
    ref = x.double() @ dequantize(pack_int4(codes), scale, (128, 256)).double().T
    for choice in ("fast", "exact"):
        cls = plugin.kernel_class(choice)
        assert cls.can_implement(_config(standin, shape)) == (True, None)
        ok, why = cls.can_implement(_config(standin, shape, zero_points=True))
        assert not ok and "zero points" in why
        if shape == "0.26":
            ok, why = cls.can_implement(_config(standin, shape, has_g_idx=True))
            assert not ok and "act-order" in why
        layer = torch.nn.Module()
        layer.weight_packed = torch.nn.Parameter(pack_int4(codes), requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale.clone(), requires_grad=False)
        kernel = cls(_config(standin, shape), "weight_packed", "weight_scale", None, *(
            [None] if shape == "0.26" else []))
        kernel.process_weights_after_loading(layer)
        assert layer.weight_packed.is_contiguous() and torch.equal(layer.weight_packed, pack_int4(codes))
        if choice == "fast":  # the exact op runs on CUDA (or the Triton interpreter) only
            y = kernel.apply_weights(layer, x)
            assert y.dtype == torch.bfloat16 and y.shape == (3, 128)
            torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-6)
