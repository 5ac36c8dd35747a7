"""Where a distill step's time goes on one GPU: per-phase CUDA-event timings, the top CUDA kernels, attention.

Runs the real :class:`distill.train.Distiller` step on a ``bench/gpu/distill_bench.py`` pair (random weights)
for one configuration (batch x seq_len, checkpointing, loss chunk, attention, loss implementation, compile
switches):

1. ``--warmup`` untimed steps (and compilation), then ``--steps`` steps timed with CUDA events around each part
   of :meth:`Distiller.step` (teacher forward, student forward + loss, backward, optimizer) and, inside the
   student part, around the logit loss and the hidden-state loss (the student forward is the rest); tok/s and
   MFU exactly as ``distill_bench.py`` computes them;
2. ``--prof-steps`` more steps under ``torch.profiler``: the top ``--top`` CUDA kernels by total time (name,
   calls, total ms, % of the profiled steps), kernel time by category (gemm, attention by backend,
   element-wise/reduction, copies, optimizer), and the attention operators called (which SDPA backend:
   ``_scaled_dot_product_{flash,efficient,cudnn}_attention`` / math ops, or flex_attention);
3. with ``--attn-bench``: forward and forward+backward of one attention layer of each E4B kind at the run's
   batch and sequence length, for each way to run it (transformers' sdpa call as Gemma-4 makes it, sdpa with
   native GQA, each SDPA backend forced, flex_attention), in ms and TFLOP/s of useful work.

Writes ``distill_profile.json`` and ``distill_profile.txt`` (and a gzipped Chrome trace with ``--trace``) to
``--out`` (default ``$OUT``). An E4B configuration takes ~1-2 min on an H200 (+ compile time with the compile
switches). Usage (repo root, GPU machine)::

    python bench/gpu/distill_profile.py --pair e4b --batch 16 --seq-len 2048 --grad-ckpt --attn-bench
    python bench/gpu/distill_profile.py --pair e4b --batch 16 --grad-ckpt --attn pdq_hybrid --loss-impl fused \\
        --compile-loss --tag hybrid-fused
    python bench/gpu/distill_profile.py --pair e4b --batch 16 --grad-ckpt --attn pdq_hybrid --loss-impl fused \
        --compile-loss --precision bf16-master --tag bf16master   # bf16 student, fp32 masters in AdamW
    python bench/gpu/distill_profile.py --pair micro --device cpu --batch 2 --seq-len 64 --steps 1  # CPU smoke

The CUDA-event phase split needs no profiler; on CPU the phases are wall-clock and the kernel table is empty.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu.distill_bench import PAIRS, _distiller, _free, _mfu, _models, _peak_gb, _sync  # noqa: E402
from distill.parallel import DistEnv  # noqa: E402

# kernel-name patterns, first match wins (lower-case substrings)
CATEGORIES = [
    ("attn:flash", ("flash_fwd", "flash_bwd", "flash::", "flashattn", "flash_attention")),
    ("attn:mem_efficient", ("fmha_cutlass", "cutlassf", "cutlassb", "attentionkernel", "attentionbackwardkernel",
                            "efficient_attention", "mem_eff")),
    ("attn:cudnn", ("cudnn", "fmha", "sdpa")),
    ("attn:flex", ("flex_attention", "flex_attn", "triton_tem_fused")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "matmul")),
    ("optimizer", ("multi_tensor_apply", "fused_adam", "adam")),
    ("copy/cast", ("copy", "memcpy", "memset", "cat_", "catarray", "to_copy", "fill")),
    ("softmax", ("softmax",)),
    ("reduction", ("reduce", "triton_red", "triton_per", "norm")),
    ("elementwise", ("elementwise", "vectorized", "triton_poi", "unrolled", "pointwise")),
    ("embedding/index", ("index", "gather", "scatter", "embedding")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, pats in CATEGORIES:
        if any(p in low for p in pats):
            return cat
    return "other"


class PhaseTimer:
    """``timer(name)`` context manager: CUDA events (or wall clock on CPU) summed per name."""

    def __init__(self, device):
        self.device = device
        self.pending: list = []
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name):
        if self.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            try:
                yield
            finally:
                b.record()
                self.pending.append((name, a, b))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.totals[name] += 1e3 * (time.perf_counter() - t0)

    def collect(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for name, a, b in self.pending:
            self.totals[name] += a.elapsed_time(b)
        self.pending.clear()

    def reset(self):
        self.pending.clear()
        self.totals.clear()


def _wrap_losses(timer):
    """Time the logit and hidden losses inside the student part (patches the names distill.models calls)."""
    import distill.models as dmod

    orig_logit, orig_hidden = dmod.chunked_logit_loss, dmod.hidden_state_loss

    def logit(*a, **k):
        with timer("  logit_loss (fwd+grad, chunked)"):
            return orig_logit(*a, **k)

    def hidden(*a, **k):
        with timer("  hidden_mse_loss (fwd)"):
            return orig_hidden(*a, **k)

    dmod.chunked_logit_loss, dmod.hidden_state_loss = logit, hidden
    return lambda: (setattr(dmod, "chunked_logit_loss", orig_logit), setattr(dmod, "hidden_state_loss", orig_hidden))


def _kernel_table(prof, n_steps: int, step_ms: float, top: int):
    rows, ops = [], []
    for e in prof.key_averages():
        dev_t = getattr(e, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(e, "self_cuda_time_total", 0.0)
        is_kernel = str(getattr(e, "device_type", "")).endswith("CUDA")
        if is_kernel and dev_t > 0:
            rows.append({"name": e.key, "calls": e.count, "total_ms": dev_t / 1e3})
        low = e.key.lower()
        if not is_kernel and ("attention" in low or "scaled_dot_product" in low or "flex" in low):
            ops.append({"op": e.key, "calls": e.count,
                        "device_ms": (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) / 1e3})
    rows.sort(key=lambda r: -r["total_ms"])
    total = sum(r["total_ms"] for r in rows)
    denom = n_steps * step_ms
    for r in rows:
        r["pct_of_step"] = 100 * r["total_ms"] / denom if denom else 0.0
        r["category"] = categorize(r["name"])
    cats: dict[str, float] = defaultdict(float)
    for r in rows:
        cats[r["category"]] += r["total_ms"]
    cat_rows = sorted(({"category": k, "total_ms": v / n_steps, "pct_of_step": 100 * v / denom if denom else 0.0}
                       for k, v in cats.items()), key=lambda r: -r["total_ms"])
    ops.sort(key=lambda r: -r["calls"])
    return rows[:top], cat_rows, ops, total / n_steps


# ---------------------------------------------------------------------------------------------- attention bench

def attention_bench(batch, seq, device, window=512, heads=8, kv_heads=2, reps=5):
    """fwd and fwd+bwd ms of one sliding (head_dim 256, window) and one full (head_dim 512, causal) layer."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import repeat_kv

    from distill.attention import _flex, _window_bool_mask, sliding_block_mask

    out = []
    timer_ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731

    def bench(fn, q, k, v, backward):
        qs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        g = torch.randn_like(q) if backward else None

        def run():
            o = fn(*qs)
            if backward:
                o.backward(g)
        run()
        _sync(device)
        a, b = timer_ev(), timer_ev()
        a.record()
        for _ in range(reps):
            run()
        b.record()
        _sync(device)
        return a.elapsed_time(b) / reps

    def which_backend(fn, q, k, v):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as p:
            fn(q, k, v)
        names = [e.key for e in p.key_averages() if "scaled_dot_product" in e.key or "flex" in e.key.lower()
                 or e.key in ("aten::bmm", "aten::_softmax", "aten::baddbmm")]
        return sorted(set(names))

    for kind, hd in (("sliding", 256), ("full", 512)):
        q = torch.randn(batch, heads, seq, hd, device=device, dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, seq, hd, device=device, dtype=torch.bfloat16)
        v = torch.randn(batch, kv_heads, seq, hd, device=device, dtype=torch.bfloat16)
        rep = heads // kv_heads
        if kind == "sliding":
            mask = _window_bool_mask(seq, window, device).expand(batch, 1, seq, seq)
            useful = sum(min(i + 1, window) for i in range(seq)) / (seq * seq)
            forced_args, how, span = dict(attn_mask=mask), "bool mask", window
        else:
            useful = 0.5 * (seq + 1) / seq
            forced_args, how, span = dict(is_causal=True), "is_causal", seq
        block_mask = sliding_block_mask(seq, span, device)  # a window as wide as the sequence = causal
        variants = {
            f"transformers sdpa (repeat_kv, {how})":
                lambda q, k, v: F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), scale=1.0,
                                                               **forced_args),
            f"sdpa enable_gqa, {how}":
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True, **forced_args),
            f"flex {kind} BlockMask" + (" (pdq_hybrid)" if kind == "sliding" else ""):
                lambda q, k, v: _flex("cuda")(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=True),
        }
        for name, be in (("FLASH_ATTENTION", SDPBackend.FLASH_ATTENTION),
                         ("EFFICIENT_ATTENTION", SDPBackend.EFFICIENT_ATTENTION),
                         ("CUDNN_ATTENTION", SDPBackend.CUDNN_ATTENTION), ("MATH", SDPBackend.MATH)):
            def forced(q, k, v, be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), scale=1.0,
                                                          **forced_args)
            variants[f"sdpa forced {name} (repeat_kv)"] = forced
        flops_fwd = 4 * batch * heads * seq * seq * hd * useful  # QK^T and PV over the allowed pairs
        for name, fn in variants.items():
            row = {"layer": kind, "head_dim": hd, "variant": name, "batch": batch, "seq": seq}
            try:
                row["ops"] = which_backend(fn, q, k, v)
                row["fwd_ms"] = bench(fn, q, k, v, False)
                row["fwd_bwd_ms"] = bench(fn, q, k, v, True)
                row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
                row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9
            except Exception as e:  # noqa: BLE001 (a backend that cannot run is a result)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            out.append(row)
            _free()
    return out


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", default="e4b", choices=sorted(PAIRS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--ckpt-layers", type=int, default=None, help="with --grad-ckpt: only the first N layers")
    ap.add_argument("--attn", default="sdpa", help="sdpa (default) or pdq_hybrid")
    ap.add_argument("--loss-impl", default="autograd", choices=("autograd", "fused"))
    ap.add_argument("--compile-loss", action="store_true")
    ap.add_argument("--compile-layers", action="store_true")
    ap.add_argument("--precision", default=None, choices=("bf16-mixed", "bf16-master", "fp32"),
                    help="student precision (default: bf16-mixed on cuda, fp32 on cpu); bf16-master casts the "
                         "fp32-built student to bf16 and keeps fp32 masters in the optimizer")
    ap.add_argument("--steps", type=int, default=3, help="steps timed with CUDA events")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prof-steps", type=int, default=1, help="steps under torch.profiler (0: none)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--attn-bench", action="store_true", help="also time each attention variant alone")
    ap.add_argument("--attn-bench-only", action="store_true", help="only the attention bench (no models)")
    ap.add_argument("--trace", action="store_true", help="also write a gzipped Chrome trace of the profiled steps")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--peak-tflops", type=float, default=989.4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("distill_profile: needs a CUDA GPU (or --device cpu --pair micro for a smoke run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    report = {"args": vars(args), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        report["cudnn"] = torch.backends.cudnn.version()
        with contextlib.suppress(Exception):
            report["sdp_priority_order"] = [str(x) for x in torch._C._get_sdp_priority_order()]
        report["sdp_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                 "math": torch.backends.cuda.math_sdp_enabled()}
    lines = [f"{report['device']}, torch {report['torch']}, cudnn {report.get('cudnn')}, "
             f"sdp order {report.get('sdp_priority_order')}"]

    def dump():
        (out / f"distill_profile{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"distill_profile{tag}.txt").write_text("\n".join(lines) + "\n")

    if args.attn_bench or args.attn_bench_only:
        if device.type != "cuda":
            print("distill_profile: --attn-bench needs CUDA", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        rows = attention_bench(args.batch, args.seq_len, device)
        report["attention_bench"] = rows
        lines.append(f"\nattention, one layer, B={args.batch} S={args.seq_len}, 8 q / 2 kv heads "
                     f"({time.perf_counter() - t0:.0f} s)")
        lines.append(f"{'layer':8} {'variant':44} {'fwd ms':>8} {'TF/s':>6} {'f+b ms':>8} {'TF/s':>6}  ops")
        for r in rows:
            if "error" in r:
                lines.append(f"{r['layer']:8} {r['variant']:44} {r['error']}")
            else:
                lines.append(f"{r['layer']:8} {r['variant']:44} {r['fwd_ms']:8.2f} {r['fwd_tflops']:6.0f} "
                             f"{r['fwd_bwd_ms']:8.2f} {r['fwd_bwd_tflops']:6.0f}  {','.join(r['ops'])}")
        print("\n".join(lines), flush=True)
        dump()
        if args.attn_bench_only:
            return 0

    t0 = time.perf_counter()
    teacher, student = _models(args.pair, device, args.attn)
    build_s = time.perf_counter() - t0
    switches = dict(attn=args.attn, loss_impl=args.loss_impl, compile_loss=args.compile_loss,
                    compile_layers=args.compile_layers, ckpt_layers=args.ckpt_layers, precision=args.precision)
    env = DistEnv(0, 1, 0, device)  # one process, the device as given (no torchrun process group)
    dz, ids = _distiller(teacher, student, 1, args.batch, args.seq_len, args.grad_ckpt, args.chunk,
                         args.warmup + args.steps + args.prof_steps, args.peak_tflops, env, switches)
    precision = dz.cfg.precision
    timer = PhaseTimer(device)
    restore = _wrap_losses(timer)
    losses = []
    try:
        t0 = time.perf_counter()
        for s in range(args.warmup):
            losses.append(dz.step(s, ids)["loss"])
        _sync(device)
        warm_s = time.perf_counter() - t0
        dz.phase_timer = timer
        timer.reset()
        t0 = time.perf_counter()
        for s in range(args.warmup, args.warmup + args.steps):
            losses.append(dz.step(s, ids)["loss"])
        _sync(device)
        step_ms = 1e3 * (time.perf_counter() - t0) / args.steps
        timer.collect()
        dz.phase_timer = None
        tok_s = args.batch * args.seq_len / (step_ms / 1e3)
        mfu = _mfu(dz, tok_s, args.peak_tflops)
        peak_gb = _peak_gb(device)
        phases = {k: v / args.steps for k, v in timer.totals.items()}
        sf = phases.get("student_forward_and_loss", 0.0)
        phases["  student_forward (rest)"] = sf - sum(v for k, v in phases.items() if k.startswith("  "))
        report.update({"build_s": build_s, "warmup_s": warm_s, "step_ms": step_ms, "tokens_per_s": tok_s, "mfu": mfu,
                       "peak_mem_gb": peak_gb, "phases_ms": phases, "losses": losses,
                       "n_student": dz.n_student, "n_teacher": dz.n_teacher,
                       "model_flops_per_token": dz.flops_per_token, "precision": precision})
        start = len(lines)
        lines.append(f"\n{args.pair} B={args.batch} S={args.seq_len} ckpt={args.grad_ckpt}"
                     f"{'' if args.ckpt_layers is None else f'(first {args.ckpt_layers})'} chunk={args.chunk} "
                     f"attn={args.attn} loss={args.loss_impl} compile_loss={args.compile_loss} "
                     f"compile_layers={args.compile_layers} precision={precision}")
        lines.append(f"step {step_ms:.1f} ms | {tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | peak {peak_gb:.1f} GB | "
                     f"warmup {warm_s:.1f} s | losses {', '.join(f'{x:.5f}' for x in losses)}")
        lines.append("phase (CUDA events, ms per step):")
        order = ["teacher_forward", "student_forward_and_loss", "  student_forward (rest)",
                 "  logit_loss (fwd+grad, chunked)", "  hidden_mse_loss (fwd)", "backward", "optimizer"]
        for k in order + [k for k in phases if k not in order]:
            if k in phases:
                lines.append(f"  {k:34} {phases[k]:9.1f}  {100 * phases[k] / step_ms:5.1f}%")
        print("\n".join(lines[start:]), flush=True)
        dump()

        if args.prof_steps and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            _sync(device)
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for s in range(args.warmup + args.steps, args.warmup + args.steps + args.prof_steps):
                    dz.step(s, ids)
                _sync(device)
            prof_ms = 1e3 * (time.perf_counter() - t0) / args.prof_steps
            top, cats, ops, kernel_ms = _kernel_table(prof, args.prof_steps, step_ms, args.top)
            report.update({"top_kernels": top, "kernel_categories": cats, "attention_ops": ops,
                           "kernel_ms_per_step": kernel_ms, "profiled_step_ms": prof_ms})
            start = len(lines)
            lines.append(f"\nkernels: {kernel_ms:.1f} ms of GPU time per step ({100 * kernel_ms / step_ms:.1f}% of the "
                         f"{step_ms:.1f} ms step; profiled step {prof_ms:.1f} ms)")
            lines.append("by category:")
            for r in cats:
                lines.append(f"  {r['category']:20} {r['total_ms']:9.1f} ms  {r['pct_of_step']:5.1f}%")
            lines.append("attention ops (CPU-side op names: which SDPA backend / flex ran):")
            for r in ops:
                lines.append(f"  {r['calls']:6d} x {r['op']}  ({r['device_ms'] / args.prof_steps:.1f} ms/step)")
            lines.append(f"top {args.top} CUDA kernels ({args.prof_steps} step(s)):")
            lines.append(f"  {'total ms':>9} {'calls':>6} {'%step':>6}  {'category':18} name")
            for r in top:
                lines.append(f"  {r['total_ms']:9.1f} {r['calls']:6d} {r['pct_of_step']:6.1f}  {r['category']:18} "
                             f"{r['name'][:160]}")
            print("\n".join(lines[start:]), flush=True)
            if args.trace:
                prof.export_chrome_trace(str(out / f"distill_trace{tag}.json.gz"))
    except torch.OutOfMemoryError as e:
        report["error"] = f"OOM: {str(e).splitlines()[0][:300]}"
        lines.append(f"OOM: {report['error']}")
        print(lines[-1], flush=True)
    finally:
        restore()
        dump()
    print(f"wrote {out / f'distill_profile{tag}.json'} and .txt")
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
