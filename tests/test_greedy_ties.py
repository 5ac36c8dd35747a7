"""The tie rules of tests/greedy_ties.py (the HF greedy test of the fast kernel), checked on the CPU.

The trained ``micro`` quantized by ``pack.quantize`` is loaded twice with transformers: the reference (compressed-
tensors' decompressed bf16 path) and a copy whose quantized Linears multiply by the same bf16 dequantized weights in
fp32 and round the output to bf16 once (another summation order, like our kernel). That copy must pass every rule;
the same copy with a kernel error must not: scales applied to the wrong groups everywhere (rule 1), or a per-channel
error of a few percent on the one-token decode path only (rule 2, which the teacher-forced pass never sees).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.bench_fixtures import trained_micro  # noqa: F401  (fixture)
from tests.greedy_ties import SPAN_FRAC, greedy_tie_check

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


class _DequantF32Linear(nn.Module):
    """``x @ dequantize(weight).T`` (bf16 weights) in fp32, one rounding to ``x.dtype``; optional injected errors."""

    def __init__(self, lin, roll_groups: bool = False, decode_error: torch.Tensor | None = None):
        super().__init__()
        from pack.packing import dequantize

        scale = lin.weight_scale
        if roll_groups:  # every group's scale applied to its neighbour's codes
            scale = scale.roll(1, dims=1)
        n, k = lin.out_features, lin.in_features
        # the same bf16 weights as the reference (code x scale rounded to bf16), summed in fp32 in another order
        self.weight = dequantize(lin.weight_packed, scale, (n, k)).float()
        self.decode_error = decode_error

    def forward(self, x):
        y = x.float() @ self.weight.t()
        if self.decode_error is not None and x.shape[-2] == 1:  # one-token steps only
            y = y * (1 + self.decode_error[: y.shape[-1]])
        return y.to(x.dtype)


@pytest.fixture(scope="module")
def models(trained_micro, tmp_path_factory):  # noqa: F811
    from bench.gpu.vllm_e2e_check import text_prompts
    from pack.quantize import main as quantize_main

    out = tmp_path_factory.mktemp("greedy") / "w4a16"
    assert quantize_main([str(trained_micro), "-o", str(out), "--no-progress"]) == 0

    def load():
        m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        m.generation_config.eos_token_id = None
        return m

    return load, text_prompts(trained_micro, 6, 96, seed=3)


def _ours(load, **err):
    from kernels.linear import swap_w4a16_linears

    m = load()
    for name in swap_w4a16_linears(m):
        m.set_submodule(name, _DequantF32Linear(m.get_submodule(name), **err))
    return m


def test_another_summation_order_passes(models):
    load, prompts = models
    rows, bad = greedy_tie_check(load(), _ours(load), prompts, "cpu")
    assert not bad, bad
    assert any(r["tf_max_diff"] > 0 for r in rows)  # the paths really differ: the rules were exercised


def test_wrong_scale_groups_fail(models):
    load, prompts = models
    _, bad = greedy_tie_check(load(), _ours(load, roll_groups=True), prompts, "cpu")
    assert any(b["rule"].startswith("1:") for b in bad), bad


def test_decode_only_error_fails(models):
    """A few percent per output channel, only where a Linear sees one token: teacher-forced logits are untouched."""
    load, prompts = models
    err = 0.05 * torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    longer = [p for p in prompts if len(p) > 1]  # a 1-token prompt's prefill is a one-token step as well
    rows, bad = greedy_tie_check(load(), _ours(load, decode_error=err), longer, "cpu")
    assert all(r["tf_max_diff"] <= SPAN_FRAC for r in rows)
    assert any(b["rule"].startswith(("2:", "4:")) for b in bad), rows
