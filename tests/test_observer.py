"""pack.observer against an independent pure-torch reference of spec pack-quantized.md §1.2-§1.3.

The reference below works one group at a time with the spec's literal formulas and its own
round-half-to-even (floor-based), so it shares no code path with the vectorised observer.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pack.observer import QuantScheme, compute_scale, quantize_codes, quantize_weight

BF16_EPS = 2.0 ** -7


def _round_half_even(x: float) -> float:
    f = math.floor(x)
    d = x - f
    if d > 0.5:
        return f + 1.0
    if d < 0.5:
        return f
    return f if f % 2 == 0 else f + 1.0


def ref_quantize(w: torch.Tensor, group: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §1.2 scale and §1.3 codes, group by group (w: bf16 [N, K])."""
    n, k = w.shape
    g = k if group == -1 else group
    scales = torch.empty(n, k // g, dtype=torch.bfloat16)
    codes = torch.empty(n, k, dtype=torch.int8)
    for i in range(n):
        for j in range(k // g):
            grp = w[i, j * g:(j + 1) * g]
            mn = torch.minimum(grp.min(), torch.zeros((), dtype=torch.bfloat16))
            mx = torch.maximum(grp.max(), torch.zeros((), dtype=torch.bfloat16))
            amax = torch.maximum(mn.abs(), mx.abs())
            s = torch.tensor(amax.float().item() / 7.5, dtype=torch.float32).to(torch.bfloat16)  # one RNE rounding
            if s.item() == 0.0:
                s = torch.tensor(BF16_EPS, dtype=torch.bfloat16)
            scales[i, j] = s
            for c in range(g):
                t = torch.tensor(grp[c].item(), dtype=torch.float32) / torch.tensor(s.item(), dtype=torch.float32)
                if mode == "eager":
                    t = t.to(torch.bfloat16)
                q = _round_half_even(min(max(t.item(), -8.0), 7.0))  # clamp, then round
                codes[i, j * g + c] = int(q)
    return codes, scales


def _bf16(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("mode", ["fp32div", "eager"])
@pytest.mark.parametrize("n, k, group", [(3, 256, 128), (2, 64, 32), (4, 24, -1), (1, 128, 8)])
def test_matches_reference(mode, n, k, group):
    g = torch.Generator().manual_seed(n * 31 + k + (group % 7))
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.2).to(torch.bfloat16)
    codes, scale = quantize_weight(w, QuantScheme(group_size=group, rounding=mode))
    ref_codes, ref_scale = ref_quantize(w, group, mode)
    assert scale.dtype == torch.bfloat16 and torch.equal(scale, ref_scale)
    assert codes.dtype == torch.int8 and torch.equal(codes, ref_codes)


def test_exact_half_quotients_round_half_even():
    """Groups whose elements are exactly (k + 1/2) * scale, for scales m * 2^e with odd m (1 / scale inexact for
    m > 1): w / scale is then exactly k + 1/2 in fp32 only through a correctly rounded division (multiplying by a
    rounded reciprocal can land one ulp off the half, and round it the other way). Checked against the
    group-by-group reference in both modes; in fp32div mode every such element's code is the even neighbour."""
    rows = []
    for m in (1, 3, 5, 7, 9, 11, 13, 15, 17):      # 15 * m <= 255: every value below fits bf16's 8 bits
        for e in range(-14, -3):
            half = m * 2.0 ** (e - 1)               # scale / 2
            amax = 15 * half                        # amax / 7.5 = m * 2^e exactly: the scale
            vals = [(2 * k + 1) * half for k in range(-8, 7)]   # (k + 1/2) * scale, k = -8 .. 6
            rows.append([amax, *vals, -amax, *[-v for v in vals]][:32])
    w = _bf16(rows)
    for mode in ("fp32div", "eager"):
        codes, scale = quantize_weight(w, QuantScheme(group_size=32, rounding=mode))
        ref_codes, ref_scale = ref_quantize(w, 32, mode)
        assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes), mode
        if mode == "fp32div":
            halves = codes[:, 1:16].to(torch.int64)
            assert (halves % 2 == 0).all()              # k + 1/2 -> the even one of k, k + 1


def test_eager_vs_fp32div_minus_001():
    """Spec §1.3: a group of all -0.01 -> scale 0.00133514404296875; eager code -8, fp32div code -7."""
    w = _bf16([[-0.01] * 128])
    s = compute_scale(w)
    assert s.item() == 0.00133514404296875
    assert quantize_codes(w, s, "eager").unique().tolist() == [-8]
    assert quantize_codes(w, s, "fp32div").unique().tolist() == [-7]
    # the same reference says so too
    assert ref_quantize(w, 128, "eager")[0].unique().tolist() == [-8]
    assert ref_quantize(w, 128, "fp32div")[0].unique().tolist() == [-7]
    # all +0.01 -> 7 in both modes
    wp = _bf16([[0.01] * 128])
    for mode in ("eager", "fp32div"):
        assert quantize_codes(wp, compute_scale(wp), mode).unique().tolist() == [7]


def test_extremes_clamp_then_round():
    """amax 0.9375 -> scale exactly 0.125: quotients +7.5 (clamped to 7) and -7.5 (half-even to -8)."""
    row = [0.9375, -0.9375, 0.0625, -0.0625, 0.1875, 0.3125] + [0.0] * 122
    w = _bf16([row])
    s = compute_scale(w)
    assert s.item() == 0.125
    for mode in ("fp32div", "eager"):
        q = quantize_codes(w, s, mode)[0].tolist()
        # +7.5 -> 7, -7.5 -> -8, +-0.5 -> 0 (even), 1.5 -> 2, 2.5 -> 2
        assert q[:6] == [7, -8, 0, 0, 2, 2]
        assert q[6:] == [0] * 122


def test_all_zero_group_uses_bf16_eps():
    w = torch.zeros(2, 256, dtype=torch.bfloat16)
    w[1, 128:] = 0.5
    codes, scale = quantize_weight(w)
    assert scale[0].tolist() == [BF16_EPS, BF16_EPS]
    assert scale[1, 0].item() == BF16_EPS and scale[1, 1].item() == torch.tensor(0.5 / 7.5).bfloat16().item()
    assert (codes[0] == 0).all() and (codes[1, :128] == 0).all() and (codes[1, 128:] == 7).all()


@pytest.mark.parametrize("mode", ["fp32div", "eager"])
@pytest.mark.parametrize("dtype, tiny", [(torch.bfloat16, 2.0 ** -133), (torch.float16, 2.0 ** -24)])
def test_subnormal_scales_clamp_quotients_above_eight(mode, dtype, tiny):
    """Groups whose amax is a few of the dtype's smallest subnormals (``tiny``): amax / 7.5 rounds to a subnormal
    scale up to a third below it (amax 11 tiny -> scale 1 tiny), so quotients reach +-11 and must clamp to
    [-8, 7]; amax 3 tiny underflows to the eps scale. Against a value-by-value fp64 rendering of spec §1."""
    amaxes = list(range(1, 41))
    w = torch.zeros(len(amaxes), 128, dtype=torch.float64)
    for i, a in enumerate(amaxes):
        w[i, :2 * a + 1] = torch.arange(-a, a + 1, dtype=torch.float64)  # every multiple of tiny in [-a, a]
    w = (w * tiny).to(dtype)
    assert torch.equal(w.double() / tiny, (w.double() / tiny).round())  # exact: subnormal multiples of tiny
    codes, scale = quantize_weight(w, QuantScheme(rounding=mode))
    eps = torch.finfo(dtype).eps
    for i, a in enumerate(amaxes):
        s = torch.tensor(a * tiny / 7.5, dtype=torch.float32).to(dtype).item() or eps
        assert scale[i, 0].item() == s
        for c in range(2 * a + 1):
            t = torch.tensor(w[i, c].item(), dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)
            if mode == "eager":
                t = t.to(dtype)
            assert codes[i, c].item() == _round_half_even(min(max(t.item(), -8.0), 7.0)), (a, c)
    assert scale[10, 0].item() == tiny and codes[10, 0].item() == -8 and codes[10, 22].item() == 7  # amax 11
    assert quantize_codes(w, scale, mode).equal(codes)


def test_scale_is_born_bf16_with_one_rounding():
    # the scale is amax / 7.5 in fp32, rounded once to bf16 (spec §1.2); a scale computed in bf16 arithmetic
    # (bf16(amax) / bf16(7.5) rounded in bf16) differs for 3.0 and 1.5e-5, so those two would catch it
    w = torch.zeros(1, 128, dtype=torch.bfloat16)
    vals = _bf16([1.0, 3.0, 0.0078125, 65280.0, 1.5e-5])
    for v in vals:
        w[0, 0] = v
        s = compute_scale(w)
        assert s.item() == torch.tensor(v.float().item() / 7.5, dtype=torch.float32).bfloat16().item()


def test_scheme_validation():
    with pytest.raises(ValueError):
        QuantScheme(num_bits=8)
    with pytest.raises(ValueError):
        QuantScheme(rounding="nearest")
    with pytest.raises(ValueError):
        QuantScheme(group_size=100)
    with pytest.raises(ValueError, match="not a multiple of group_size 128"):
        QuantScheme().check_k(200, "model.x")


_value = st.one_of(st.floats(min_value=-3e38, max_value=3e38, allow_nan=False),
                   st.integers(-16, 16).map(lambda i: i / 2))  # exact halves: rounding ties


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(_value, min_size=16, max_size=16), min_size=1, max_size=3),
       scale_pow=st.integers(-30, 10), mode=st.sampled_from(["fp32div", "eager"]))
def test_property_matches_reference(rows, scale_pow, mode):
    w = (torch.tensor(rows, dtype=torch.float64) * 2.0 ** scale_pow).to(torch.bfloat16)
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))  # overflow to inf is not a valid weight
    codes, scale = quantize_weight(w, QuantScheme(group_size=8, rounding=mode))
    ref_codes, ref_scale = ref_quantize(w, 8, mode)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes, ref_codes)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp32div", "eager"])
def test_cuda_same_bytes(mode):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(1024, 2560, generator=g) * 0.05).to(torch.bfloat16)
    w[3, :128] = 0  # eps group
    w[5, :128] = -0.01
    scheme = QuantScheme(rounding=mode)
    c_cpu, s_cpu = quantize_weight(w, scheme)
    c_gpu, s_gpu = quantize_weight(w.cuda(), scheme)
    assert torch.equal(s_gpu.cpu(), s_cpu) and torch.equal(c_gpu.cpu(), c_cpu)
