"""``pdqkit::w4a16_gemm_exact`` registration, schema, fake implementation and input checks (CPU)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kernels.exact_op  # noqa: F401  (registers the op)


def test_schema_is_the_documented_one():
    assert str(torch.ops.pdqkit.w4a16_gemm_exact.default._schema) == (
        "pdqkit::w4a16_gemm_exact(Tensor x, Tensor weight_packed, Tensor weight_scale, Tensor? bias=None, "
        "bool use_fp32_reduce=True, int sms=-1) -> Tensor")


def test_fake_impl_gives_output_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 2048, dtype=torch.float16)
        out = torch.ops.pdqkit.w4a16_gemm_exact(x, torch.empty(2560, 256, dtype=torch.int32),
                                                torch.empty(2560, 16, dtype=torch.float16))
    assert out.shape == (2, 5, 2560) and out.dtype == torch.float16


def test_cpu_tensors_are_refused_outside_the_interpreter():
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        torch.ops.pdqkit.w4a16_gemm_exact(torch.zeros(1, 256, dtype=torch.bfloat16),
                                          torch.zeros(128, 32, dtype=torch.int32),
                                          torch.zeros(128, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("change,err", [
    (dict(x=torch.zeros(1, 256)), "bfloat16 or float16"),
    (dict(wp=torch.zeros(128, 32, dtype=torch.int64)), "int32"),
    (dict(wp=torch.zeros(128, 16, dtype=torch.int32)), "does not match K"),
    (dict(ws=torch.zeros(128, 2, dtype=torch.float16)), "must equal x dtype"),
    (dict(ws=torch.zeros(64, 2, dtype=torch.bfloat16)), "weight_scale must be"),
    (dict(bias=torch.zeros(64, dtype=torch.bfloat16)), "bias must be"),
])
def test_bad_inputs_get_a_clear_error(change, err):
    from kernels.w4a16_marlin import w4a16_gemm_exact

    args = dict(x=torch.zeros(1, 256, dtype=torch.bfloat16), wp=torch.zeros(128, 32, dtype=torch.int32),
                ws=torch.zeros(128, 2, dtype=torch.bfloat16), bias=None) | change
    with pytest.raises((TypeError, ValueError), match=err):
        w4a16_gemm_exact(args["x"], args["wp"], args["ws"], args["bias"], True, 132)


def test_package_and_op_import_without_triton():
    code = ("import sys, kernels, kernels.exact_op, kernels.marlin_schedule, kernels.marlin_emulate; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fused_fold_counters_grow_without_freeing():
    """A captured CUDA graph keeps the counter buffer's address: growing must add a buffer, never drop one."""
    from kernels.w4a16_marlin import _COUNTERS, _counters

    dev = torch.device("cpu")
    _COUNTERS.pop(dev, None)
    a = _counters(dev, 10)
    assert a.numel() >= 10 and not a.any() and _counters(dev, 100) is a  # reused while large enough
    b = _counters(dev, a.numel() + 1)
    assert b.numel() > a.numel() and _COUNTERS[dev][0] is a and _COUNTERS[dev][-1] is b
    _COUNTERS.pop(dev)
