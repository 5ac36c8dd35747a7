"""GPU: the Marlin-order kernel against vLLM 0.26.0's Marlin (reduced sweep), and the torch op in graphs/compile.

Needs a CUDA GPU and vLLM 0.26.0's compiled ops (vLLM installed, or the bare .so, see kernels/vllm_ops.py).
The full acceptance sweep is ``python -m kernels.verify``.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def marlin():
    from kernels.vllm_ops import load_vllm_ops

    try:
        return load_vllm_ops()
    except (ImportError, OSError, RuntimeError) as exc:  # no vLLM and no .so: nothing to compare against
        pytest.skip(f"vLLM 0.26.0 Marlin ops unavailable: {exc}")


def test_reduced_sweep_is_bit_identical_to_marlin(marlin):
    from kernels.verify import exact_cases, failures, reduced_cases, run_cases

    results = run_cases(reduced_cases(seed=1) + exact_cases()[:3], log=lambda s: None)
    bad = [r for r in results if failures([r])]
    assert len(results) == 27 and not bad, bad[:3]


def test_op_matches_direct_call_in_eager_graph_and_compile():
    import kernels.exact_op  # noqa: F401  (registers torch.ops.pdqkit.w4a16_gemm_exact)
    from kernels.verify import make_weights
    from kernels.w4a16_marlin import device_sms, w4a16_gemm_exact

    wp, ws = make_weights(2560, 2048, 128, torch.bfloat16, 5, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, 7, 2048, generator=gen, device="cuda").to(torch.bfloat16)
    b = torch.randn(2560, generator=gen, device="cuda").to(torch.bfloat16)
    ref = w4a16_gemm_exact(x.reshape(21, 2048), wp, ws, b, True, device_sms(0)).reshape(3, 7, 2560)

    def same(a):
        return torch.equal(a.view(torch.int16), ref.view(torch.int16))

    op = torch.ops.pdqkit.w4a16_gemm_exact
    assert same(op(x, wp, ws, b)) and same(op(x, wp, ws, b))  # sms=-1 is the device's count; deterministic
    static_x = torch.zeros_like(x)
    op(static_x, wp, ws, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = op(static_x, wp, ws, b)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert same(static_out)
    compiled = torch.compile(lambda a: op(a, wp, ws, b), fullgraph=True, backend="aot_eager")
    assert same(compiled(x))
