"""Pure-torch emulation of Marlin's arithmetic order (spec marlin-arithmetic.md §4-§6), for CPU tests.

Independent of the Triton kernel: it walks the explicit job table and fold order that
:func:`kernels.marlin_schedule.build_schedule` derives block by block, and it uses plain torch for every step.

One thing cannot be emulated on a CPU: the tensor core's k16 step (it does not round like IEEE fp32). The
emulation models one warp-row step (32 k = two chained m16n8k16 MMAs) as "exact 32-term dot product, then one
fp32 rounding when added to the accumulator". The model is exact — and therefore equal to the tensor core, to
Marlin and to the Triton kernel in interpreter mode — whenever each 32-term dot product is exactly representable
and the accumulators are the only place that rounds (see :func:`exact_chunk_inputs`). For such inputs it checks
the chain assignment, the in-block tree and the cross-block fold bit for bit; for general inputs it is a model.
"""
from __future__ import annotations

import torch

from pack.packing import group_size_of, unpack_uint4

from .marlin_schedule import build_schedule

__all__ = ["emulate_marlin", "dequantize_marlin", "exact_chunk_inputs", "fma_round", "round_to"]


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 tensor holding RN_dtype(x) (torch's CPU casts round to nearest even)."""
    return x.to(dtype).to(torch.float32)


def fma_round(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 tensor holding RN_dtype(a * b + c) with a single rounding (``HFMA2``); a, b, c hold 16-bit values.

    The float64 sum is exact unless the operands' exponents differ by more than ~30 bits; it is rounded to fp32
    "to odd" and then to ``dtype``, which is one correct rounding (Boldo-Melquiond; fp32 has >= p + 2 bits).
    """
    v = a.double() * b.double() + c.double()
    f = v.float()
    bits = f.view(torch.int32)
    trunc = torch.where(v.abs() > f.double().abs(), bits, bits - 1)
    odd = torch.where(f.double() == v, bits, trunc | 1)
    return round_to(odd.view(torch.float32), dtype)


def dequantize_marlin(weight_packed: torch.Tensor, weight_scale: torch.Tensor, k: int) -> torch.Tensor:
    """What Marlin feeds the MMA, as fp32 ``[N, K]``: RN_dtype((q - 8) * s) grouped, exact ``q - 8`` channelwise."""
    w = unpack_uint4(weight_packed, k).to(torch.float32) - 8.0
    g = group_size_of(k, weight_scale)
    if g == -1:
        return w
    s = weight_scale.to(torch.float32).repeat_interleave(g, dim=1)
    return round_to(w * s, weight_scale.dtype)


def emulate_marlin(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, use_fp32_reduce: bool = True, sms: int = 132,
                   chains: str = "marlin", tree: str = "marlin", fold: str = "marlin") -> torch.Tensor:
    """Marlin's output for ``x [M, K]`` (bf16/fp16) with the exact-chunk MMA model (module docstring).

    ``chains``/``tree``/``fold`` other than "marlin" deliberately use a wrong order ("blocked": warp-row w takes
    a contiguous run of tiles; "pairwise": (P0 + P1) + (P2 + P3); "top_down": fold from the k = 0 piece): tests
    use them to show that a comparison against this emulation detects order errors.
    """
    if (chains, tree, fold) != ("marlin", "marlin", "marlin") and not (
            chains in ("marlin", "blocked") and tree in ("marlin", "pairwise") and fold in ("marlin", "top_down")):
        raise ValueError(f"unknown order variant {chains!r}, {tree!r}, {fold!r}")
    m, k = x.shape
    n = weight_packed.shape[0]
    dtype = x.dtype
    g = group_size_of(k, weight_scale)
    sched = build_schedule(m, n, k, g, "bfloat16" if dtype == torch.bfloat16 else "float16", sms)
    channelwise = sched.problem.group_blocks == -1
    wd = dequantize_marlin(weight_packed, weight_scale, k).to(torch.float64)  # [N, K], exact values
    xd = x.to(torch.float64)
    out = torch.empty(m, n, dtype=dtype)
    for ln in sched.launches:
        tk, tn, kw = ln.cfg.thread_k, ln.cfg.thread_n, ln.cfg.kw
        rows_l = xd[ln.row_off:ln.row_off + ln.m_split]
        partials = []
        for job in ln.jobs:
            a = rows_l[job.par_id * ln.mb:(job.par_id + 1) * ln.mb]  # [r, K]
            w = wd[job.col * tn:(job.col + 1) * tn]  # [tn, K]
            k0, k1 = job.t0 * tk, (job.t0 + job.nt) * tk
            if chains == "marlin":  # warp-row w: 32 k starting at 32 w of every tile
                a4 = a[:, k0:k1].reshape(a.shape[0], job.nt, kw, 32)
                w4 = w[:, k0:k1].reshape(tn, job.nt, kw, 32)
            else:
                a4 = a[:, k0:k1].reshape(a.shape[0], kw, job.nt, 32).transpose(1, 2)
                w4 = w[:, k0:k1].reshape(tn, kw, job.nt, 32).transpose(1, 2)
            dots = torch.einsum("rtwc,ntwc->twrn", a4, w4).to(torch.float32)  # exact-chunk model
            acc = torch.zeros(kw, a.shape[0], tn, dtype=torch.float32)
            for t in range(job.nt):  # each warp-row's chain, tiles in increasing k
                acc = acc + dots[t]
            if kw == 4 and tree == "pairwise":
                partials.append((acc[0] + acc[1]) + (acc[2] + acc[3]))
            elif kw == 4:
                partials.append(acc[0] + (acc[1] + (acc[3] + acc[2])))
            else:
                partials.append(acc[0] + acc[1])
        for order in ln.folds:  # bottom (largest k) first
            order = order[::-1] if fold == "top_down" else order
            r = partials[order[0]]
            for i in order[1:]:
                r = partials[i] + (r if use_fp32_reduce else round_to(r, dtype))
            job = ln.jobs[order[0]]
            y = round_to(r, dtype)
            cols = slice(job.col * tn, (job.col + 1) * tn)
            if channelwise and bias is not None:  # the binary fuses scale and bias into one FMA but in the
                s, b = weight_scale[cols, 0].to(torch.float32), bias[cols].to(torch.float32)  # first write
                two = round_to(round_to(y * s, dtype) + b, dtype)
                first = torch.zeros_like(y, dtype=torch.bool)
                first[:8, torch.arange(tn) % 64 < 8] = True
                y = torch.where(first, two, fma_round(y, s, b, dtype))
            elif channelwise:
                y = round_to(y * weight_scale[cols, 0].to(torch.float32), dtype)
            elif bias is not None:
                y = round_to(y + bias[cols].to(torch.float32), dtype)
            r0 = ln.row_off + job.par_id * ln.mb
            r1 = min(r0 + ln.mb, ln.row_off + ln.m_split)
            out[r0:r1, cols] = y[:r1 - r0].to(dtype)
    return out


def exact_chunk_inputs(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, seed: int,
                       big: int | None = None, small: tuple[int, int] = (0, 0),
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs whose 32-term warp-row dot products are exact, in compressed-tensors layout.

    ``x = a * 2**e`` with integers ``a`` in [-3, 3] and one exponent per (row, 32-wide k slice); codes uniform;
    scales ``c * 2**f`` (``c`` in [1, 7]) constant along k for each column, so every product in a slice is a small
    integer times one power of two and each slice's dot product is exact in fp32 (and on the tensor core).

    * ``big=None``: slice exponents uniform in ``small`` (``(0, 0)``: every sum is an exact integer, so only the
      epilogue rounds — Marlin's output is then reproducible on a CPU).
    * ``big=E``: the k slices are paired at random and each pair gets identical weights; per row, half of the
      pairs carry ``+a * 2**E`` and ``-a * 2**E`` (their dot products cancel exactly), the other slices small
      values ``2**small``. The true result is the small part, but every fp32 addition that meets a big partial sum
      rounds the small part away differently: any change in chain assignment, tree or fold order changes the
      output bits.
    Returns ``x, weight_packed, weight_scale``.
    """
    from pack.packing import pack_int4

    gen = torch.Generator().manual_seed(seed)
    nch = k // 32
    codes = torch.randint(-8, 8, (n, nch, 32), generator=gen)
    a = torch.randint(-3, 4, (m, nch, 32), generator=gen).to(torch.float32)
    e = torch.randint(small[0], small[1] + 1, (m, nch, 1), generator=gen).to(torch.float32)
    x = a * torch.exp2(e)
    if big is not None:
        order = torch.randperm(nch, generator=gen)
        first, second = order[0::2], order[1::2]
        codes[:, second] = codes[:, first]
        is_big = torch.rand((m, len(first)), generator=gen) < 0.5
        for r in range(m):
            sel = is_big[r]
            x[r, first[sel]] = a[r, first[sel]] * 2.0**big
            x[r, second[sel]] = -x[r, first[sel]]
    x = x.reshape(m, k).to(dtype)
    groups = 1 if group_size == -1 else k // group_size
    c = torch.randint(1, 8, (n, 1), generator=gen).to(torch.float32)
    f = torch.randint(-2, 3, (n, 1), generator=gen).to(torch.float32)
    scale = (c * torch.exp2(f)).expand(n, groups).to(dtype).contiguous()
    return x, pack_int4(codes.reshape(n, k)), scale
