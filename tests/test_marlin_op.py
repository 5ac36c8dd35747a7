"""``pdqkit::w4a16_gemm_exact`` registration, schema, fake implementation and input checks (CPU)."""
from __future__ import annotations

import os
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


def test_counters_grow_without_freeing():
    """A captured CUDA graph keeps a counter buffer's address: growing must add a buffer, never drop one."""
    from kernels.counters import grow_zeros

    dev, pool = torch.device("cpu"), {}
    a = grow_zeros(pool, dev, 10, 64)
    assert a.dtype == torch.int32 and a.numel() == 64 and not a.any()
    assert grow_zeros(pool, dev, 64, 64) is a  # reused while large enough
    b = grow_zeros(pool, dev, 65, 64)
    assert b.numel() == 65 and not b.any() and pool[dev] == [a, b] and pool[dev][0] is a
    assert grow_zeros(pool, dev, 1, 64) is b  # the newest serves every smaller call



def test_vllm_ops_xz_copy_is_loaded_from_a_private_fresh_file(tmp_path, monkeypatch):
    """The xz copy of vLLM's ops library is decompressed into a fresh private directory, loaded and deleted; the
    sha256 reported is the one of the bytes loaded. A library planted at the old fixed /tmp path is never used."""
    import hashlib
    import lzma
    import tempfile

    import _lzma

    from kernels import vllm_ops

    lib = open(_lzma.__file__, "rb").read()   # any shared object: load_library only dlopens it
    xz = tmp_path / "ops.so.xz"
    xz.write_bytes(lzma.compress(lib))
    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    loads = []
    monkeypatch.setattr(torch.ops, "load_library", lambda p: loads.append(
        (p, open(p, "rb").read(), os.stat(os.path.dirname(p)).st_mode & 0o777)))
    monkeypatch.setattr(vllm_ops, "_XZ", xz)
    monkeypatch.setattr(vllm_ops, "_loaded", False)
    monkeypatch.setattr(vllm_ops.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("PDQKIT_VLLM_C_SO", raising=False)
    where = vllm_ops.load_vllm_ops()
    assert len(loads) == 1 and loads[0][1] == lib and loads[0][0].startswith(made[0] + "/")
    assert loads[0][2] == 0o700                                   # no other user could have placed it there
    assert not os.path.exists(made[0])                           # deleted once loaded
    assert vllm_ops.loaded_sha256() == hashlib.sha256(lib).hexdigest() and str(xz) in where
