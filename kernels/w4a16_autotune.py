"""``python -m kernels.w4a16_autotune``: measure the fast W4A16 kernels' configs on this GPU, write the JSON table.

For each (N, K) shape and M bucket, every candidate :class:`~kernels.w4a16_config.W4A16Config` (and split-K value)
is timed with CUDA graphs over weight copies rotated past the L2, the fastest is kept, and the result goes to
``kernels/configs/<GPU name>.json`` (or ``--out``). Before timing, each compiled variant is checked once against
the pure-torch reference (§9B tolerance); variants that fail are dropped and logged, never tuned in.

Compilation is the slow part (~100 Triton variants): ``--jobs`` worker processes compile them in parallel into
Triton's on-disk cache by launching each once on a tiny problem with the same specialization as the real shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

from .w4a16_config import (CONFIG_DIR, GEMV_KERNELS, KERNELS, W4A16Config, chain_ok, device_table_name,
                           effective_split, mma8_ok)

# qkv, o, gate_up (pruned), down (pruned), an 8192^2 reference, and the KV-shared layers' q_proj
E4B_SHAPES = ((3072, 2560), (2560, 2048), (16384, 2560), (2560, 8192), (8192, 8192), (2048, 2560))
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
L2_BYTES = 60 << 20


# ----------------------------------------------------------------------------------------------- candidates
def decode_candidates(block_m: int) -> list[W4A16Config]:
    out = []
    for bn in (64, 128, 256):
        for bk in (128, 256):
            for nw in (4, 8):
                for ns in (3, 4):
                    for kp, wa in ((True, True), (False, False)):
                        if nw == 8 and bn < 128 or (bn == 256 and bk == 256) or (nw == 8 and not wa):
                            continue
                        if not wa and (bn == 256 or bk == 256):
                            continue
                        out.append(W4A16Config("decode", block_m, bn, bk, 1, nw, ns, kp, wa))
    return out


def prefill_candidates(block_m: int) -> list[W4A16Config]:
    out = []
    for bn in (128, 256):
        for bk in (64, 128):
            for nw in (4, 8):
                for ns in (3, 4):
                    for kp, wa in ((False, False), (True, True)):
                        if bn == 256 and bk == 128 or (block_m == 256 and (bn == 256 or not wa)):
                            continue
                        if nw == 4 and (block_m > 64 or bn > 128):
                            continue
                        out.append(W4A16Config("prefill", block_m, bn, bk, 1, nw, ns, kp, wa))
    return out


def prefill_tma_candidates(block_ms=(64, 128, 256), smem_max: int = 200 << 10) -> list[W4A16Config]:
    """Tilings of the Gluon prefill kernel (:mod:`kernels.w4a16_prefill_tma`): ``block_m`` from ``block_ms``,
    ``block_n`` 64 / 128, ``block_k`` 64 (3-5 ring slots) or 128 (2-4), each within ``smem_max`` bytes of ring
    (activation box + word box per slot)."""
    out = []
    for bm in block_ms:
        for bn in (64, 128):
            for bk, stages in ((64, (3, 4, 5)), (128, (2, 3, 4))):
                for ns in stages:
                    if ns * (bm * bk * 2 + bn * bk // 2) <= smem_max:
                        out.append(W4A16Config("prefill_tma", bm, bn, bk, 1, bn // 16, ns))
    return out


def prefill_wsp_candidates(m: int, smem_max: int = 224 << 10) -> list[W4A16Config]:
    """Tilings of the warp-specialised Gluon prefill kernel (:mod:`kernels.w4a16_prefill_wsp`): ``block_n`` 128
    (the warpgroups split the rows) or 64 (they split the K blocks; their fp32 halves meet in ``64 x block_m x 4``
    bytes of shared memory), ``block_m`` 128 (and 256 from M = 256), ``block_k`` 64 (4-6 ring slots) or 128 (2-5),
    within ``smem_max`` bytes of ring and reduction buffer. Its split-K values come from :func:`split_candidates`."""
    out = []
    for bn in (128, 64):
        for bm in (128, 256) if m >= 256 else (128, ):
            red = 64 * bm * 4 if bn == 64 else 0   # the K halves' reduction buffer
            for bk, stages in ((64, (4, 5, 6)), (128, (2, 3, 4, 5))):
                for ns in stages:
                    if ns * (bm * bk * 2 + bn * bk // 2) + red <= smem_max:
                        out.append(W4A16Config("prefill_wsp", bm, bn, bk, 1, 4, ns))
    return out


def gemv_block_ms(m: int, kernel: str = "gemv_mma") -> list[int]:
    """``block_m`` values worth timing at M for a GEMV kernel: the power of two covering M (capped at the kernel's
    largest, 4 for ``gemv_mma``, 8 for ``gemv`` and 16 for ``gemv_mma8``) and the one below it (``gemv_mma8``: at
    least 8, its MMA's column count)."""
    top = min({"gemv_mma": 4, "gemv": 8, "gemv_mma8": 16}[kernel], 1 << (m - 1).bit_length())
    low = 8 if kernel == "gemv_mma8" else 1
    return sorted({max(low, top), max(low, top // 2)})


def gemv_candidates(m: int, kernels=("gemv_mma",), bns=(2, 4, 8, 16, 32), bks=(256, 512, 1024, 2048),
                    warps=(1, 2, 4), stages=(2, 3), max_words: int = 32) -> list[W4A16Config]:
    """GEMV tilings for M (the autotuner's: tensor-core GEMV only, :mod:`kernels.w4a16_gemv_mma`): ``block_m`` from
    :func:`gemv_block_ms`; every thread at least one vector per K block (``gemv_mma``: 2 words, one per row half,
    loaded apart; ``gemv``: 4) and at most ``max_words`` words; every register pipeline depth of ``stages``;
    ``gemv_mma`` with and without ``chain`` where the tiling allows it."""
    out = []
    for kern in kernels:
        for bm in gemv_block_ms(m, kern):
            for bn in bns:
                for bk in bks:
                    for nw in warps:
                        if kern == "gemv_mma" and bn < 2:
                            continue
                        if (2 if kern == "gemv_mma" else 4) <= bn * bk // 8 / (32 * nw) <= max_words:
                            out += [W4A16Config(kern, bm, bn, bk, 1, nw, ns) for ns in stages]
                            if kern == "gemv_mma" and chain_ok(bn, bk, nw):
                                out += [W4A16Config(kern, bm, bn, bk, 1, nw, ns, chain=True) for ns in stages]
    return out


def gemv_mma8_candidates(m: int, bns=(16, 32, 64), bks=(128, 256, 512, 1024), warps=(1, 2, 4, 8),
                         stages=(2, 3), max_words: int = 32) -> list[W4A16Config]:
    """Tilings of the full-MMA GEMV (:mod:`kernels.w4a16_gemv_mma8`) for M: ``block_m`` from :func:`gemv_block_ms`,
    every :func:`~kernels.w4a16_config.mma8_ok` tiling of ``bns`` x ``bks`` x ``warps`` with at most ``max_words``
    words per thread (a thread holds at least 8: one vector of each row half), every pipeline depth of ``stages``,
    with and without ``chain``."""
    out = []
    for bm in gemv_block_ms(m, "gemv_mma8"):
        for bn in bns:
            for bk in bks:
                for nw in warps:
                    if mma8_ok(bn, bk, nw) and bn * bk // 8 // (32 * nw) <= max_words:
                        out += [W4A16Config("gemv_mma8", bm, bn, bk, 1, nw, ns, chain=ch)
                                for ns in stages for ch in (False, True)]
    return out


def candidates_for(m: int) -> list[W4A16Config]:
    if m <= 2:
        return decode_candidates(16) + gemv_candidates(m)
    if m <= 4:
        return decode_candidates(16) + gemv_candidates(m) + gemv_mma8_candidates(m)
    if m <= 16:
        return decode_candidates(16) + gemv_mma8_candidates(m)
    if m <= 64:   # decode tiles come in powers of two: the one that holds M
        return decode_candidates(1 << (m - 1).bit_length()) + prefill_candidates(64) + prefill_tma_candidates((64,))
    # split-K over big tiles: at M ~ 128..256 there are too few 128x128 tiles to fill 132 SMs
    splitk_big = [W4A16Config("decode", 64, 128, 128, 1, 4, 4, True, True),
                  W4A16Config("decode", 64, 128, 64, 1, 4, 4, False, False),
                  W4A16Config("decode", 128, 128, 64, 1, 8, 3, False, False),
                  W4A16Config("decode", 128, 128, 128, 1, 8, 3, True, True),
                  W4A16Config("decode", 128, 256, 64, 1, 8, 3, False, False)]
    cands = (prefill_candidates(64) + prefill_candidates(128) + splitk_big + prefill_tma_candidates((64, 128))
             + prefill_wsp_candidates(m))
    if m >= 256:
        cands += prefill_candidates(256) + prefill_tma_candidates((256,))
    if m >= 1024:
        cands.append(W4A16Config("dequant_mm"))
    return cands


SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
GEMV_SPLITS = (2, 3, 4, 6, 8)


def split_candidates(cfg: W4A16Config, m: int, n: int, k: int, sms: int, max_per_sm: int = 8,
                     values: tuple[int, ...] = SPLITS) -> list[int]:
    """Split-K values worth timing: from ``values``, those that leave every split a K block and give between half a
    program and ``max_per_sm`` programs per SM (1 as well when the tiles alone fill half the SMs). ``prefill_wsp``
    (one CTA per SM: its warps hold the register file) and ``prefill_tma``: 1, and 2..4 where the tiles leave SMs
    idle (``prefill_tma``: fewer than two per SM) and the splits make at most four programs per SM. The GEMVs: 1,
    and those of :data:`GEMV_SPLITS` that leave every split a K block and make at most 16 programs per SM. Every
    value as the number of slices it launches (:func:`kernels.w4a16_config.effective_split`, the decode kernel's clamp
    too: 6 over 8 K blocks is 4), so that no launch is timed twice."""
    if cfg.kernel in ("prefill_wsp", "prefill_tma"):
        tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
        busy = sms if cfg.kernel == "prefill_wsp" else 2 * sms
        return [1] + [s for s in (2, 3, 4) if s <= k // cfg.block_k and tiles < busy and tiles * s <= 4 * sms]
    tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    kb = k // cfg.block_k
    if cfg.kernel in GEMV_KERNELS:   # small programs: up to 16 per SM
        return sorted({1} | {effective_split(kb, s) for s in GEMV_SPLITS if s <= kb and tiles * s <= 16 * sms})
    if cfg.kernel != "decode":
        return [1]
    good = sorted({effective_split(kb, s) for s in values if s <= kb and sms // 2 <= tiles * s <= max_per_sm * sms}
                  | ({1} if tiles >= sms // 2 else set()))
    return good or [effective_split(kb, max(1, round(2 * sms / tiles)))]


def launch_variants(cfg: W4A16Config, m: int, n: int, k: int, sms: int) -> list[W4A16Config]:
    """``cfg`` with each of its :func:`split_candidates`, and for ``prefill_wsp`` with stream-K where its tiles
    are fewer than four per SM (with more, the last wave's idle SMs cost little)."""
    out = [dataclasses.replace(cfg, split_k=sk, stream_k=False) for sk in split_candidates(cfg, m, n, k, sms)]
    tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    if cfg.kernel == "prefill_wsp" and tiles < 4 * sms:
        out.append(dataclasses.replace(cfg, split_k=1, stream_k=True))
    return out


def base_variant(cfg: W4A16Config) -> W4A16Config:
    """The compiled kernel a config shares with its split-K and stream-K launches (one compile and gate each)."""
    return dataclasses.replace(cfg, split_k=1, stream_k=False)


# ----------------------------------------------------------------------------------------------- data
def make_problem(n: int, k: int, dtype: torch.dtype, device, group: int = 128, seed: int = 0):
    """Random codes/scales in the compressed-tensors layout (packed on the GPU: pack.packing on CPU is slow)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32).to(device)
    shifts = torch.arange(0, 32, 4, device=device, dtype=torch.int32)
    words = (u.view(n, k // 8, 8) << shifts).sum(-1, dtype=torch.int64)
    wp = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    s = (torch.rand(n, k // group, generator=g) * 0.02 + 0.002).to(dtype).to(device)
    return wp, s


def check_tolerance(y: torch.Tensor, x: torch.Tensor, wp: torch.Tensor, s: torch.Tensor, bias=None) -> float:
    """max over elements of |y - y_ref| / (ulp(max(|y|,|y_ref|)) + 2^-16 Σ|x·w|); <= 1 passes (§9B)."""
    from pack.packing import dequantize

    n, k = wp.shape[0], wp.shape[1] * 8
    w = dequantize(wp, s, (n, k)).float()
    xf = x.reshape(-1, k).float()
    ref = xf @ w.t()
    if bias is not None:
        ref = ref + bias.float()
    ref = ref.to(y.dtype).float()
    yf = y.reshape(-1, n).float()
    bound = ulp(torch.maximum(yf.abs(), ref.abs()), y.dtype) + (xf.abs() @ w.abs().t()) * 2.0**-16
    err = (yf - ref).abs()
    if not torch.isfinite(yf).all():
        return float("inf")
    return float((err / bound).max())


def ulp(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of |a| in ``dtype`` (bf16: 8 significant bits, fp16: 11, subnormals floored)."""
    p, tiny = (7, 2.0**-133) if dtype == torch.bfloat16 else (10, 2.0**-24)
    _, e = torch.frexp(a.float())
    return torch.clamp(torch.ldexp(torch.ones_like(a, dtype=torch.float32), e - 1 - p), min=tiny)


def rotated_problem(n: int, k: int, dtype: torch.dtype, device, seed: int = 2):
    """The timed problem of one (N, K) shape: ``(wps, ss, nbytes)``, enough weight/scale copies to rotate past the
    L2 (the first from :func:`make_problem`, the rest random) and the bytes one call reads (weights + scales)."""
    wp0, s0 = make_problem(n, k, dtype, device, seed=seed)
    nbytes = wp0.numel() * 4 + s0.numel() * 2
    copies = n_copies(nbytes)
    wps = [wp0] + [torch.randint_like(wp0, -2**31, 2**31 - 1) for _ in range(copies - 1)]
    ss = [s0] + [torch.rand_like(s0) * 0.01 for _ in range(copies - 1)]
    return wps, ss, nbytes


# ----------------------------------------------------------------------------------------------- timing
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU clock: far longer than a Python graph launch (~10-50 µs)


def graph_time_us(call, n_calls: int, replays: int = 3) -> float:
    """Per-call µs of ``call(i)`` for i in range(n_calls), captured in one CUDA graph; median of ``replays``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(n_calls, 3)):
            call(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            call(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # keep the GPU busy while the host records, launches the graph and records again: the timed interval then
        # holds only GPU work, not the host's launch latency (which would pull every ratio towards 1)
        torch.cuda._sleep(SLEEP_CYCLES)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n_calls)
    del g
    return statistics.median(times)


def n_copies(bytes_per_copy: int) -> int:
    """Copies to rotate through so that consecutive calls miss the L2: together ~3x its size, at least 2. (Capped
    at 64 before the thirty-fourth session: matrices under ~3 MB, the `small` model's, then rotated through 0.14-0.7x
    the L2 and were timed partly from it.)"""
    return max(2, math.ceil(3 * L2_BYTES / max(1, bytes_per_copy)))


# ----------------------------------------------------------------------------------------------- compile
def _compile_worker(args):
    cfgs, dtype_name = args
    import torch as _t

    from kernels.w4a16 import w4a16_gemm
    dtype = getattr(_t, dtype_name)
    wp, s = make_problem(256, 2048, dtype, "cuda")
    x = _t.randn(64, 2048, device="cuda", dtype=dtype)
    wp4, s4 = make_problem(256, 4096, dtype, "cuda")
    x4 = _t.randn(16, 4096, device="cuda", dtype=dtype)
    res = []
    for c in cfgs:
        cfg = W4A16Config(**c)
        t = time.time()
        try:
            m = 64 if cfg.kernel != "decode" else min(cfg.block_m, 64)
            w4a16_gemm(x[:m], wp, s, config=dataclasses.replace(cfg, split_k=2 if cfg.kernel == "decode" else 1))
            if cfg.kernel in ("prefill_wsp", "prefill_tma"):   # their split-K epilogue is a separate variant
                w4a16_gemm(x[:m], wp, s, config=dataclasses.replace(cfg, split_k=2))
            if cfg.kernel == "prefill_wsp":                     # and prefill_wsp's stream-K one
                w4a16_gemm(x[:m], wp, s, config=dataclasses.replace(cfg, stream_k=True))
            if cfg.kernel in GEMV_KERNELS:                      # the GEMVs' split-K variant (two K blocks or more)
                w4a16_gemm(x4[:16], wp4, s4, config=dataclasses.replace(cfg, split_k=2))
            _t.cuda.synchronize()
            res.append((c, None, time.time() - t))
        except Exception as e:  # noqa: BLE001 - reported, config dropped
            res.append((c, f"{type(e).__name__}: {str(e)[:300]}", time.time() - t))
    return res


def precompile(cfgs: list[W4A16Config], dtype: torch.dtype, jobs: int, log) -> set[W4A16Config]:
    """Compile every distinct variant in ``jobs`` spawned processes; returns the configs that compiled."""
    keys = sorted({base_variant(c) for c in cfgs}, key=str)
    chunks = [[dataclasses.asdict(c) for c in keys[i::jobs]] for i in range(jobs)]
    chunks = [c for c in chunks if c]
    t = time.time()
    ok = set()
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(chunks)) as pool:
        for res in pool.imap_unordered(_compile_worker, [(c, str(dtype).split(".")[-1]) for c in chunks]):
            for c, err, dt in res:
                if err:
                    log(f"compile FAILED {c}: {err}")
                else:
                    ok.add(W4A16Config(**c))
    log(f"precompiled {len(ok)}/{len(keys)} variants in {time.time() - t:.0f}s with {len(chunks)} workers")
    return ok


# ----------------------------------------------------------------------------------------------- tuning
def correctness_gate(cfgs, dtype: torch.dtype, log) -> set[W4A16Config]:
    """The variants of ``cfgs`` (split_k and stream_k ignored) that pass the §9B tolerance once on a small problem:
    odd M, and for decode and gemv M = 16 too (gemv_mma8: 5, 13, 16), decode with split-K 3, the Gluon prefill
    kernels and the GEMVs with split-K 1 and 3 (``prefill_wsp`` with stream-K too); K = 2560, or 4096 for tiles
    that do not divide 2560.
    The others are logged and dropped, never tuned in."""
    from .w4a16 import w4a16_gemm

    dev = torch.device("cuda")
    problems = {k: make_problem(512, k, dtype, dev, seed=1) for k in (2560, 4096)}
    good = set()
    for c in sorted(cfgs, key=str):
        k = 2560 if c.fits(2560, 128) else 4096
        wp, s = problems[k]
        splits = (3, ) if c.kernel == "decode" else (1, 3) if c.kernel in ("prefill_wsp", "prefill_tma",
                                                                         *GEMV_KERNELS) else (1, )
        variants = [dataclasses.replace(c, split_k=sk) for sk in splits]
        if c.kernel == "prefill_wsp":
            variants.append(dataclasses.replace(c, stream_k=True))
        for m in {"decode": (5, 16), "gemv": (5, 16), "gemv_mma8": (5, 13, 16)}.get(c.kernel, (77,)):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            r = max(check_tolerance(w4a16_gemm(x, wp, s, config=v), x, wp, s) for v in variants)
            if not r <= 1.0:
                log(f"WRONG (tolerance ratio {r:.3g}) -> dropped: {c}")
                break
        else:
            good.add(c)
    log(f"{len(good)}/{len(cfgs)} variants pass the correctness gate")
    return good


def tune(shapes, ms, dtype, jobs: int, log, time_budget_s: float = 1e9, kernels=None, incumbent=None) -> dict:
    """Time the candidates of every (shape, M) and keep the fastest. ``kernels``: time only candidates of these
    kernels; ``incumbent``: a table's ``shapes`` dict whose entry for (shape, M), if any, is timed beside them (so a
    restricted re-tune replaces an entry only with a faster one)."""
    from .w4a16 import w4a16_gemm

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    incumbent = incumbent or {}

    def cands(m):
        return [c for c in candidates_for(m) if kernels is None or c.kernel in kernels]

    def held(n, k, m):
        e = incumbent.get(f"{n}x{k}", {}).get(str(m))
        return W4A16Config(**e) if e else None

    all_cfgs = {c for m in ms for c in cands(m)} | {c for n, k in shapes for m in ms for c in [held(n, k, m)] if c}
    compiled = precompile(sorted(all_cfgs, key=str), dtype, jobs, log)
    good = correctness_gate(compiled, dtype, log)
    t_start = time.time()
    table = {}
    for n, k in shapes:
        wps, ss, nbytes = rotated_problem(n, k, dtype, dev)
        copies = len(wps)
        entry = {}
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            best = None
            inc = held(n, k, m)
            # the incumbent first: a budget that runs out mid-way still compares against it; once the budget is
            # spent, a (shape, M) gets no entry (a --merge then keeps the table's own) rather than an untried one
            out_of_time = time.time() - t_start > time_budget_s
            for c in ([inc] if inc else []) + ([] if out_of_time else cands(m)):
                if base_variant(c) not in good or not c.fits(k, 128) or n % c.block_n:
                    continue
                for cfg in [c] if c is inc else launch_variants(c, m, n, k, sms):
                    try:
                        us = graph_time_us(lambda i: w4a16_gemm(x, wps[i % copies], ss[i], config=cfg), copies)
                    except Exception as e:  # noqa: BLE001
                        log(f"  {n}x{k} M={m} {cfg}: {type(e).__name__} {str(e)[:200]}")
                        continue
                    if best is None or us < best[0]:
                        best = (us, cfg)
                if time.time() - t_start > time_budget_s:
                    break
            if best is None or (out_of_time and inc is None):
                continue
            entry[str(m)] = best[1].to_json()
            gbps = nbytes / best[0] / 1e3
            log(f"{n}x{k} M={m}: {best[0]:.2f} us ({gbps:.0f} GB/s weights) {best[1]}"
                f"{' (the incumbent)' if best[1] == inc else ''} [t={time.time() - t_start:.0f}s]")
        table[f"{n}x{k}"] = entry
        wps = ss = None  # free the copies before the next shape
        torch.cuda.empty_cache()
    return {"device": props.name, "sm_count": sms, "triton": __import__("triton").__version__,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype).split(".")[-1],
            "shapes": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.w4a16_autotune", description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output JSON (default kernels/configs/<GPU name>.json); another file is used by "
                    "the dispatcher through PDQKIT_W4A16_TABLE=FILE")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in E4B_SHAPES], help="NxK ...")
    ap.add_argument("--ms", nargs="+", type=int, default=list(M_BUCKETS))
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop trying new configs after this many seconds")
    ap.add_argument("--merge", action="store_true", help="keep the existing table's other (shape, M) entries and "
                    "replace only the ones tuned now (the table read is --out if it exists, else this GPU's)")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, help="time only these kernels' candidates; with "
                    "--merge the table's own entry for each (shape, M) is timed too and kept unless beaten")
    ap.add_argument("--also-compile", choices=("bfloat16", "float16"),
                    help="after tuning, precompile the chosen configs for this dtype too (warm Triton cache)")
    ap.add_argument("--demo", action="store_true", help="only run the demo launches (for compute-sanitizer: "
                    "every kernel family and prefill_wsp mode once, then the tuned gate_up M=1 and M=8) and exit")
    ap.add_argument("--demo-only", metavar="I,J,...", type=lambda v: {int(i) for i in v.split(",")},
                    help="with --demo: run only these launches (0-based, in the order --demo prints them), e.g. "
                    "to run one sanitizer process per launch")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: autotuning needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.demo:
        return demo_launches(args.demo_only)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    own_table = str(CONFIG_DIR / device_table_name(torch.cuda.get_device_name()))
    out = args.out or own_table
    base_path = out if os.path.isfile(out) else own_table
    base = None
    if args.merge and os.path.isfile(base_path):
        with open(base_path) as f:
            base = json.load(f)
    result = tune(shapes, args.ms, getattr(torch, args.dtype), args.jobs, log, args.budget_s, kernels=args.kernels,
                  incumbent=base["shapes"] if base and args.kernels else None)
    if args.merge:
        if base is not None:
            shapes_new = result["shapes"]
            result["shapes"] = base.get("shapes", {})
            for shape, by_m in shapes_new.items():
                result["shapes"].setdefault(shape, {}).update(by_m)
            result["merged_into"] = {k: base.get(k) for k in ("date", "triton", "torch")}
            for key, val in base.items():   # the base table's notes (e.g. which entries an earlier run re-tuned)
                result.setdefault(key, val)
            log(f"merged {sum(map(len, shapes_new.values()))} entries into {base_path}'s table")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, out)
    log(f"wrote {out}")
    if args.also_compile:
        chosen = {W4A16Config(**c) for by_m in result["shapes"].values() for c in by_m.values()}
        precompile(sorted(chosen, key=str), getattr(torch, args.also_compile), args.jobs, log)
    return 0


def demo_launches(only: set[int] | None = None) -> int:
    """One split-K decode launch (M=5), eight prefill launches (M=300, Triton and both Gluon kernels; ``prefill_wsp``
    with 128 rows, split-K at M=200, and with K halves, M=300 on an odd ring and split-K at M=200; ``prefill_wsp``
    with stream-K, 128 rows at M=300 and K halves on an odd ring at M=200), two diagonal
    tensor-core GEMV launches (M=3 in a 4-row program, per-word and chained accumulators) and two full-MMA ones
    (M=13 of 16, M=6 of 8, chained), ragged tiles, then both with split-K (M=2, 3 splits of 2, 2, 1 K blocks; M=11
    of 16, split 4 asked, which over 5 K blocks launches the same 3 slices), checked against the reference;
    then the tuned M=1 and M=8 launches on the 16384x2560 gate_up shape (the ones a profiler should look at).
    ``only``: the indices (0..16, in that order) to run; None runs all."""
    from .w4a16 import w4a16_gemm

    fixed = ((5, W4A16Config("decode", 16, 128, 128, 4, 4, 4, True, True)),
             (300, W4A16Config("prefill", 128, 128, 64, 1, 8, 3)),
             (300, W4A16Config("prefill_tma", 128, 64, 128, 1, 4, 3)),
             (300, W4A16Config("prefill_wsp", 256, 128, 128, 1, 4, 3)),
             (200, W4A16Config("prefill_wsp", 128, 128, 128, 3, 4, 2)),
             (300, W4A16Config("prefill_wsp", 128, 64, 128, 1, 4, 5)),
             (200, W4A16Config("prefill_wsp", 256, 64, 64, 2, 4, 4)),
             (300, W4A16Config("prefill_wsp", 128, 128, 128, 1, 4, 4, stream_k=True)),
             (200, W4A16Config("prefill_wsp", 128, 64, 128, 1, 4, 5, stream_k=True)),
             (3, W4A16Config("gemv_mma", 4, 2, 512, 1, 1, 3)),
             (3, W4A16Config("gemv_mma", 4, 8, 512, 1, 2, 2, chain=True)),
             (13, W4A16Config("gemv_mma8", 16, 16, 512, 1, 4, 3)),
             (6, W4A16Config("gemv_mma8", 8, 32, 256, 1, 2, 2, chain=True)),
             (2, W4A16Config("gemv_mma", 2, 8, 512, 3, 2, 3)),
             (11, W4A16Config("gemv_mma8", 16, 16, 512, 4, 4, 2, chain=True)))
    tuned = (1, 8)
    if only is not None and not only <= set(range(len(fixed) + len(tuned))):
        print(f"error: --demo-only takes indices 0..{len(fixed) + len(tuned) - 1}", file=sys.stderr)
        return 2
    wp, s = make_problem(3072, 2560, torch.bfloat16, "cuda")
    for i, (m, cfg) in enumerate(fixed):
        if only is not None and i not in only:
            continue
        x = torch.randn(m, 2560, device="cuda", dtype=torch.bfloat16)
        y = w4a16_gemm(x, wp, s, config=cfg)
        torch.cuda.synchronize()
        name = (cfg.kernel + (" chain" if cfg.chain else "") + (f" split {cfg.split_k}" if cfg.split_k > 1 else "")
                + (" stream-K" if cfg.stream_k else ""))
        print(f"demo {i} {name} M={m}: tolerance ratio {check_tolerance(y, x, wp, s):.3f}", flush=True)
    wp, s = make_problem(16384, 2560, torch.bfloat16, "cuda")
    for i, m in enumerate(tuned, start=len(fixed)):
        if only is not None and i not in only:
            continue
        x = torch.randn(m, 2560, device="cuda", dtype=torch.bfloat16)
        y = w4a16_gemm(x, wp, s)
        torch.cuda.synchronize()
        print(f"demo {i} tuned gate_up M={m}: tolerance ratio {check_tolerance(y, x, wp, s):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
