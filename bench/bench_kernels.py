"""W4A16 GEMM microbenchmarks: pdqkit's fast Triton kernel vs cuBLAS bf16, vLLM 0.26.0 Marlin and Machete.

Script mode (prints a table, writes JSON)::

    python -m bench.bench_kernels --out DIR [--shapes 3072x2560 ...] [--ms 1 2 4 ...] [--dtype bfloat16]

pytest-benchmark mode (GPU only)::

    pytest bench/bench_kernels.py --benchmark-enable

(pytest-benchmark's figure is host time per round: one graph of R calls, its launch and a synchronize; the per-call
GPU time from the timer below and its TB/s are in each result's ``extra_info``.)

Timing: every implementation is captured in one CUDA graph of R calls that rotate through R weight copies (together
>= 3x the 60 MB L2, so every call streams its weights from HBM), replayed 5x; the median per-call time is reported.
The device-to-device copy bandwidth is measured in the same run (bytes read + written). Reported per row: µs,
effective TB/s (weight + scale bytes / time; bf16 weight bytes for cuBLAS), % of the measured copy bandwidth,
TFLOP/s (2·M·N·K / time) and speedups of pdqkit over each other implementation. Marlin gets exactly
``MarlinLinearKernel``'s transforms (gptq_marlin_repack of the transposed packed weight, marlin_permute_scales;
spec marlin-arithmetic.md §3, §9C) and Machete ``MacheteLinearKernel``'s (machete_prepack_B, scales [K/G, N]).
Each implementation's output is checked once against the pure-torch reference (§9B tolerance) and the ratio logged.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = ((3072, 2560, "qkv"), (2560, 2048, "o"), (16384, 2560, "gate_up"), (2560, 8192, "down"),
          (8192, 8192, "8k"))
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
UINT4B8_ID = 1125899907892224  # vLLM ScalarType id of uint4b8 (spec §9C)


def copy_bandwidth_tbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return nbytes / statistics.median(times) / 1e12


class Impl:
    """One implementation on one (N, K): prepared weight copies and ``run(x, i)`` using copy ``i``."""

    name = "?"

    def weight_bytes(self) -> int:
        raise NotImplementedError


class Pdqkit(Impl):
    name = "pdqkit"

    def __init__(self, wps, ss):
        self.wps, self.ss = wps, ss

    def weight_bytes(self):
        return self.wps[0].numel() * 4 + self.ss[0].numel() * 2

    def run(self, x, i):
        from kernels.w4a16 import w4a16_gemm
        return w4a16_gemm(x, self.wps[i], self.ss[i])


class Cublas(Impl):
    name = "cublas"

    def __init__(self, ws):
        self.ws = ws

    def weight_bytes(self):
        return self.ws[0].numel() * 2

    def run(self, x, i):
        return torch.nn.functional.linear(x, self.ws[i])


class Marlin(Impl):
    name = "marlin"

    def __init__(self, wps, ss, n, k, group):
        from pack.packing import marlin_permute_scales
        self.n, self.k = n, k
        dev = wps[0].device
        self.empty = torch.empty(0, dtype=torch.int32, device=dev)
        # positional, in vLLM 0.26.0's _custom_ops order: (b_q_weight, perm, size_k, size_n, num_bits, is_a_8bit)
        self.qs = [torch.ops._C.gptq_marlin_repack(wp.t().contiguous(), self.empty, k, n, 4, False) for wp in wps]
        self.ss = [marlin_permute_scales(s.t().contiguous(), k, group) for s in ss]
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        self.workspace = torch.zeros(sms, dtype=torch.int32, device=dev)

    def weight_bytes(self):
        return self.qs[0].numel() * 4 + self.ss[0].numel() * 2

    def run(self, x, i):
        # (a, c, b_q_weight, b_bias, b_scales, a_scales, global_scale, b_zeros, g_idx, perm, workspace, b_q_type_id,
        #  size_m, size_n, size_k, is_k_full, use_atomic_add, use_fp32_reduce, is_zp_float): spec §2 defaults
        return torch.ops._C.marlin_gemm(x, None, self.qs[i], None, self.ss[i], None, None, self.empty, self.empty,
                                        self.empty, self.workspace, UINT4B8_ID, x.shape[0], self.n, self.k, True,
                                        False, True, False)


class Machete(Impl):
    name = "machete"

    def __init__(self, wps, ss, dtype, group):
        self.group = group
        # (b_q_weight [K/8, N] column-major view, a_type, b_type_id, group_scales_type), as MacheteLinearKernel
        self.qs = [torch.ops._C.machete_prepack_B(wp.t(), dtype, UINT4B8_ID, dtype) for wp in wps]
        self.ss = [s.t().contiguous() for s in ss]

    def weight_bytes(self):
        return self.qs[0].numel() * 4 + self.ss[0].numel() * 2

    def run(self, x, i):
        # (a, b_q, b_type_id, out_type, b_group_scales, b_group_zeros, b_group_size, b_channel_scales,
        #  a_token_scales, schedule)
        return torch.ops._C.machete_mm(x, self.qs[i], UINT4B8_ID, None, self.ss[i], None, self.group, None, None,
                                       None)


def bench(shapes, ms, dtype, log, with_vllm=True) -> dict:
    from kernels.w4a16_autotune import check_tolerance, graph_time_us, make_problem, n_copies
    from pack.packing import dequantize

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    copy_tbs = copy_bandwidth_tbs()
    log(f"device {props.name}, {props.multi_processor_count} SMs; D2D copy {copy_tbs:.2f} TB/s (read+write)")
    vllm_src = None
    if with_vllm:
        try:
            from kernels.vllm_ops import load_vllm_ops
            vllm_src = load_vllm_ops()
            for op in ("gptq_marlin_repack", "marlin_gemm", "machete_prepack_B", "machete_mm"):
                o = getattr(torch.ops._C, op, None)
                log(f"schema {op}: {o.default._schema if o is not None else 'MISSING'}")
        except Exception as e:  # noqa: BLE001 - benchmark still runs pdqkit and cuBLAS
            log(f"vLLM ops unavailable ({type(e).__name__}: {e}); Marlin/Machete skipped")
    rows = []
    for n, k, label in shapes:
        group = 128
        wp0, s0 = make_problem(n, k, dtype, dev, seed=3)
        copies = n_copies(n * k // 2 + s0.numel() * 2)
        wps = [wp0] + [make_problem(n, k, dtype, dev, seed=10 + i)[0] for i in range(copies - 1)]
        ss = [s0] + [torch.rand_like(s0) * 0.01 + 0.001 for _ in range(copies - 1)]
        impls = [Pdqkit(wps, ss)]
        # the same weights as pdqkit's copies, dequantized (cuBLAS's time may depend on the values it multiplies)
        impls.append(Cublas([dequantize(wps[i % copies], ss[i % copies], (n, k)) for i in range(n_copies(n * k * 2))]))
        if vllm_src:
            for cls, args in ((Marlin, (wps, ss, n, k, group)), (Machete, (wps, ss, dtype, group))):
                try:
                    impls.append(cls(*args))
                except Exception as e:  # noqa: BLE001
                    log(f"{label}: {cls.name} setup failed: {type(e).__name__}: {str(e)[:300]}")
        # correctness once per impl (copy 0 holds the reference weights for every impl)
        xc = torch.randn(7, k, device=dev, dtype=dtype)
        for im in list(impls):
            try:
                r = check_tolerance(im.run(xc, 0), xc, wp0, s0)
                log(f"{label} {n}x{k}: {im.name} vs reference: tolerance ratio {r:.3f} ({'ok' if r <= 1 else 'BAD'})")
            except Exception as e:  # noqa: BLE001
                log(f"{label}: {im.name} failed: {type(e).__name__}: {str(e)[:300]}")
                impls.remove(im)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            row = {"shape": label, "N": n, "K": k, "M": m}
            for im in impls:
                cnt = len(getattr(im, "wps", None) or getattr(im, "ws", None) or im.qs)
                try:
                    us = graph_time_us(lambda i: im.run(x, i), cnt, replays=5)
                except Exception as e:  # noqa: BLE001
                    log(f"{label} M={m} {im.name}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                wb = im.weight_bytes()
                row[im.name] = {"us": us, "tbs": wb / us / 1e6, "pct_copy": 100 * wb / us / 1e6 / copy_tbs,
                                "tflops": 2 * m * n * k / us / 1e6, "weight_bytes": wb}
            rows.append(row)
            log(_fmt_row(row))
        del impls, wps, ss
        torch.cuda.empty_cache()
    return {"device": props.name, "sm_count": props.multi_processor_count, "date": time.strftime("%Y-%m-%d"),
            "dtype": str(dtype).split(".")[-1], "copy_tbs": copy_tbs, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "vllm_ops": vllm_src, "rows": rows,
            "summary": summarize(rows)}


def _fmt_row(r) -> str:
    p = r.get("pdqkit")
    s = f"{r['shape']:>7} {r['N']:>5}x{r['K']:<5} M={r['M']:<5}"
    if p:
        s += f" pdqkit {p['us']:8.2f}us {p['tbs']:5.2f}TB/s {p['pct_copy']:4.0f}% {p['tflops']:6.1f}TF"
    for o in ("cublas", "marlin", "machete"):
        if o in r:
            s += f" | {o} {r[o]['us']:8.2f}us"
            if p:
                s += f" x{r[o]['us'] / p['us']:.2f}"
    return s


def _geomean(v):
    v = [x for x in v if x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def summarize(rows) -> dict:
    """Goal figures: decode (M<=16, the four E4B shapes) geomean speedups vs Marlin/Machete; gate_up TB/s;
    prefill (M>=256) geomean vs cuBLAS."""
    e4b = {"qkv", "o", "gate_up", "down"}
    out = {}
    for other in ("marlin", "machete", "cublas"):
        dec = [r[other]["us"] / r["pdqkit"]["us"] for r in rows
               if r["shape"] in e4b and r["M"] <= 16 and other in r and "pdqkit" in r]
        pre = [r[other]["us"] / r["pdqkit"]["us"] for r in rows
               if r["M"] >= 256 and other in r and "pdqkit" in r]
        out[f"decode_speedup_vs_{other}_geomean"] = _geomean(dec)
        out[f"prefill_speedup_vs_{other}_geomean"] = _geomean(pre)
    gu = [r["pdqkit"]["tbs"] for r in rows if r["shape"] == "gate_up" and r["M"] <= 16 and "pdqkit" in r]
    out["gate_up_decode_tbs_min"] = min(gu) if gu else float("nan")
    out["gate_up_decode_tbs_max"] = max(gu) if gu else float("nan")
    return out


def table(res) -> str:
    lines = [f"{res['device']} ({res['sm_count']} SMs), {res['dtype']}, {res['date']}; copy {res['copy_tbs']:.2f} TB/s",
             f"{'shape':>7} {'NxK':>11} {'M':>5} | {'pdqkit us':>9} {'TB/s':>5} {'%cp':>4} {'TF/s':>6} | "
             f"{'cuBLAS':>8} {'x':>5} | {'Marlin':>8} {'x':>5} | {'Machete':>8} {'x':>5}"]
    for r in res["rows"]:
        p = r.get("pdqkit")
        if not p:
            continue
        s = (f"{r['shape']:>7} {r['N']:>5}x{r['K']:<5} {r['M']:>5} | {p['us']:9.2f} {p['tbs']:5.2f} "
             f"{p['pct_copy']:4.0f} {p['tflops']:6.1f} |")
        for o in ("cublas", "marlin", "machete"):
            s += (f" {r[o]['us']:8.2f} {r[o]['us'] / p['us']:5.2f} |" if o in r else f" {'-':>8} {'-':>5} |")
        lines.append(s.rstrip("|"))
    for k, v in res["summary"].items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="directory for bench_kernels.json / bench_kernels.txt")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k, _ in SHAPES])
    ap.add_argument("--ms", nargs="+", type=int, default=list(MS))
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--no-vllm", action="store_true", help="skip Marlin/Machete")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    labels = {f"{n}x{k}": lab for n, k, lab in SHAPES}
    shapes = [(int(s.split("x")[0]), int(s.split("x")[1]), labels.get(s, s)) for s in args.shapes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = bench(shapes, args.ms, getattr(torch, args.dtype), lambda m: print(m, flush=True), not args.no_vllm)
    (out / "bench_kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    txt = table(res)
    (out / "bench_kernels.txt").write_text(txt + "\n")
    print(txt)
    return 0


# --------------------------------------------------------------------------------- pytest-benchmark entry points
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.mark.gpu
    @pytest.mark.parametrize("m", (1, 16, 256))
    @pytest.mark.parametrize("n,k", ((16384, 2560), (2560, 8192)))
    def test_bench_pdqkit_w4a16(benchmark, m, n, k):
        from kernels.w4a16 import w4a16_gemm
        from kernels.w4a16_autotune import graph_time_us, make_problem, n_copies

        wps, ss = zip(*[make_problem(n, k, torch.bfloat16, "cuda", seed=i) for i in range(n_copies(n * k // 2))])
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = torch.cuda.CUDAGraph()
        w4a16_gemm(x, wps[0], ss[0])
        with torch.cuda.graph(g):
            for i in range(len(wps)):
                w4a16_gemm(x, wps[i], ss[i])

        def replay():
            g.replay()
            torch.cuda.synchronize()

        # pytest-benchmark's own figure is host time per round (one graph of len(wps) calls, with its launch and
        # the synchronize); the per-call GPU time comes from the project's timer, beside it
        benchmark.pedantic(replay, rounds=20, warmup_rounds=2)
        us = graph_time_us(lambda i: w4a16_gemm(x, wps[i], ss[i]), len(wps))
        nbytes = wps[0].numel() * 4 + ss[0].numel() * 2
        benchmark.extra_info.update(calls_per_round=len(wps), us_per_call_gpu=us, weight_tb_s=nbytes / us / 1e6)


if __name__ == "__main__":
    sys.exit(main())
