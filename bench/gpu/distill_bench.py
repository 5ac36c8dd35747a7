"""Throughput of ``python -m distill`` on one GPU: tokens/s and MFU of the real training step.

Pairs (random weights from :mod:`bench.factory`; teacher bf16, student fp32 master weights + bf16 autocast,
exactly the objects ``python -m distill`` builds, stepped by :class:`distill.train.Distiller`):

* ``small``: teacher ``small`` (MLP 2560) vs student ``small`` with MLP 2048 (the 20 % prune), vocab 8192;
* ``e4b``: teacher ``e4b`` (MLP 10240, 42 layers, hidden 2560, vocab 262144) vs student MLP 8192.

Each configuration (phase, batch x seq_len, activation checkpointing, loss chunk) runs ``--warmup`` steps,
then ``--steps`` timed steps (CUDA-synchronised wall clock). A configuration that runs out of memory is
reported as OOM and the next one is tried. MFU = model FLOPs / time / peak, model FLOPs per trained token =
``6 N_student + 2 N_teacher`` with N = matmul weights (every ``nn.Linear`` of the language stack + the tied
``lm_head``; embedding lookups not counted; attention-score FLOPs, losses, recomputation and phase-2
generation not counted), peak = ``--peak-tflops`` (default 989.4: H100/H200 SXM dense bf16; the H200 here
measured 789 TFLOP/s on a bf16 8192^3 matmul, shared/gpu/README.md). Phase-2 rows include student sampling
(lmbda = 1: every step on-policy) in their time, so their MFU is lower by design.

Usage (repo root, GPU machine)::

    python bench/gpu/distill_bench.py                       # small + e4b, ~3-4 min
    python bench/gpu/distill_bench.py --pairs small --steps 10
    python bench/gpu/distill_bench.py --pairs e4b --configs "1,16,2048,1,1024" --attn pdq_hybrid \
        --loss-impl fused --compile-loss --compile-layers --ckpt-layers 28 --precision bf16-master
    # the same with phase 1's data term (--ce-weight: phase-1 configurations only)
    python bench/gpu/distill_bench.py --pairs e4b --configs "1,16,2048,1,1024" ... --ce-weight 0.2 --hidden-weight 10
    torchrun --standalone --nproc-per-node 2 bench/gpu/distill_bench.py --pairs e4b --configs "1,32,2048,1,1024"

Under torchrun every rank builds the same random pair on its GPU and the student is sharded with FSDP2 (what
``python -m distill`` does under torchrun); ``--configs`` batches are global (split over the ranks), so weak
scaling against one GPU means N times the one-GPU batch. Rows then also give tokens/s per GPU and the peak memory
of every rank; rank 0 prints and writes the JSON.

Prints a table and writes ``distill_bench.json`` to ``--out`` (default ``$OUT``, else the current dir).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.factory import build_model  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill import parallel  # noqa: E402
from pack.hfcompat import checkpointing_disable, checkpointing_on  # noqa: E402
from distill.train import Distiller, deterministic_kernels, loss_parts  # noqa: E402

PAIRS = {"small": dict(scale="small", student_mlp=2048), "e4b": dict(scale="e4b", student_mlp=8192),
         "micro": dict(scale="micro", student_mlp=512)}  # micro: CPU smoke run of this script (--device cpu)
# (phase, batch, seq_len, grad_ckpt, chunk): tried in order per pair; OOM rows are reported and skipped
CONFIGS = {
    "small": [(1, 32, 1024, False, 4096), (1, 64, 1024, False, 4096), (1, 128, 1024, True, 4096),
              (2, 32, 256, False, 4096)],
    "e4b": [(1, 4, 2048, False, 1024), (1, 8, 2048, True, 1024), (1, 16, 2048, True, 1024),
            (1, 24, 2048, True, 2048)],
    "micro": [(1, 2, 64, False, 64), (1, 2, 64, True, 64), (2, 2, 160, False, 64)],
}


def _models(pair: str, device, attn: str = "sdpa"):
    """The random teacher (bf16) and student (fp32) of ``pair`` on ``device``, running attention ``attn``
    (sdpa, or pdq_hybrid: registered with transformers first, as ``distill.models.load_model`` does)."""
    if attn == "pdq_hybrid":
        from distill.attention import register

        register()
    p = PAIRS[pair]
    teacher = build_model(p["scale"], seed=0, dtype=torch.bfloat16, device=device)
    student = build_model(p["scale"], seed=1, dtype=torch.float32, device=device,
                          intermediate_size=p["student_mlp"])
    for m in (teacher, student):
        m.config._attn_implementation = attn
        m.config.use_cache = False
    return teacher, student


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cfg(phase, batch, seq_len, grad_ckpt, chunk, total_steps, peak_tflops, device, switches=None):
    """The :class:`DistillConfig` of one bench configuration (its validation raises ``ValueError``, e.g. for
    ``ce_weight`` outside phase 1). ``switches``: extra DistillConfig fields (attn, loss_impl, compile_loss,
    compile_layers, ckpt_layers, precision, ce_weight, hidden_weight, deterministic; precision None: bf16-mixed on
    cuda, fp32 on cpu)."""
    sw = dict(switches or {})
    precision = sw.pop("precision", None) or ("bf16-mixed" if device.type == "cuda" else "fp32")
    return DistillConfig(teacher="-", student="-", out="-", phase=phase, steps=total_steps, batch=batch,
                         seq_len=seq_len, lr=1e-5, grad_ckpt=grad_ckpt, chunk=chunk, precision=precision,
                         lmbda=1.0, max_new_tokens=128, peak_tflops=peak_tflops, **sw)


def _distiller(teacher, student, phase, batch, seq_len, grad_ckpt, chunk, total_steps, peak_tflops, env,
               switches=None):
    """The :class:`Distiller` the benches step (``total_steps`` = every step it will take, for the lr schedule)
    and this rank's rows of a random global batch of ids [batch, seq_len] (int64, seed 0, on ``env.device``).
    ``switches``: as :func:`_cfg`. Resets the CUDA peak-memory counter just before the Distiller is built, so
    :func:`_peak_gb` counts it and the steps."""
    device = env.device
    cfg = _cfg(phase, batch, seq_len, grad_ckpt, chunk, total_steps, peak_tflops, device, switches)
    if not grad_ckpt and checkpointing_on(student):
        checkpointing_disable(student)
    vocab = student.config.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(4, vocab, (batch, seq_len), generator=g, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dz = Distiller(cfg, env, teacher, student)
    return dz, ids[env.rank * dz.local_b:(env.rank + 1) * dz.local_b]  # this rank's rows of the global batch


def _mfu(dz, tok_s, peak_tflops, world=1):
    """Model FLOPs utilisation of ``tok_s`` global tokens/s over ``world`` GPUs of ``peak_tflops`` each."""
    return dz.flops_per_token * tok_s / (peak_tflops * 1e12 * world)


def _peak_gb(device):
    """Peak CUDA memory allocated on ``device`` since the last reset, in GB (0.0 on cpu)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0


def weights_sha256(model) -> str:
    """sha256 over ``model``'s state dict, tensors in name order, each's name and raw bytes (one tensor at a time
    on the CPU): equal for two runs that trained to the same bits."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def measure(teacher, student, phase, batch, seq_len, grad_ckpt, chunk, steps, warmup, peak_tflops, env,
            switches=None, hash_weights=False):
    """Time ``steps`` Distiller steps after ``warmup`` on random ids (``batch`` = global sequences per step).
    ``switches``: as :func:`_cfg`. The row's ``loss`` and ``loss_parts`` are the last step's; the parts as
    ``python -m distill`` logs them (``hidden_mse`` with its weight in, ``data_ce`` the plain mean cross-entropy).
    ``hash_weights`` (one process only): the row also gets the student's :func:`weights_sha256` after the steps,
    to compare two runs bit for bit."""
    device = env.device
    dz, ids = _distiller(teacher, student, phase, batch, seq_len, grad_ckpt, chunk, steps + warmup, peak_tflops,
                         env, switches)
    try:
        for s in range(warmup):
            rec = dz.step(s, ids)
        _sync(device)
        t0 = time.perf_counter()
        for s in range(warmup, warmup + steps):
            rec = dz.step(s, ids)
        _sync(device)
        dt = (time.perf_counter() - t0) / steps
        tok_s = batch * seq_len / dt
        peaks = parallel.gather_float(_peak_gb(device), env)
        return {"tokens_per_s": tok_s, "step_ms": 1e3 * dt, "world": env.world,
                "tokens_per_s_per_gpu": tok_s / env.world,
                "mfu": _mfu(dz, tok_s, peak_tflops, env.world),
                "model_tflops_per_s": dz.flops_per_token * tok_s / 1e12,
                "n_student": dz.n_student, "n_teacher": dz.n_teacher,
                "peak_mem_gb": max(peaks), "peak_mem_gb_per_rank": peaks, "loss": rec["loss"],
                "loss_parts": loss_parts(rec, per_layer=False),
                **({"weights_sha256": weights_sha256(student)} if hash_weights and not env.is_dist else {})}
    finally:
        dz.opt.zero_grad(set_to_none=True)
        del dz
        student.zero_grad(set_to_none=True)
        if checkpointing_on(student):
            checkpointing_disable(student)
        _free()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="small,e4b", help="comma-separated: small, e4b")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak per GPU for MFU")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for distill_bench.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run: --pairs micro)")
    ap.add_argument("--configs", default="", metavar="PH,B,S,CKPT,CHUNK;...",
                    help="configurations to run instead of the pair's defaults, e.g. '1,16,2048,1,1024'")
    ap.add_argument("--attn", default=None, help="distill --attn (sdpa, pdq_hybrid)")
    ap.add_argument("--loss-impl", default=None, choices=("autograd", "fused"))
    ap.add_argument("--compile-loss", action="store_true")
    ap.add_argument("--compile-layers", action="store_true")
    ap.add_argument("--ckpt-layers", type=int, default=None)
    ap.add_argument("--precision", default=None, choices=("bf16-mixed", "bf16-master", "fp32"))
    ap.add_argument("--ce-weight", type=float, default=None,
                    help="distill --ce-weight: the data cross-entropy term, in the logit loss's chunked pass "
                         "(phase-1 --configs only; e4b's default list is phase 1)")
    ap.add_argument("--hidden-weight", type=float, default=None,
                    help="distill --hidden-weight (default: distill's, 1 in phase 1)")
    ap.add_argument("--deterministic", action="store_true",
                    help="distill --deterministic: deterministic kernels for the whole bench (what it costs)")
    ap.add_argument("--hash-weights", action="store_true",
                    help="print the sha256 of the student's weights after each configuration's steps (one process "
                         "only): run twice to compare, e.g. with --deterministic")
    ap.add_argument("--json-name", default="distill_bench.json", help="file name of the JSON in --out")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("distill_bench: needs a CUDA GPU (or --device cpu --pairs micro for a smoke run)", file=sys.stderr)
        return 2
    with deterministic_kernels(args.deterministic):   # as python -m distill: entered before any CUDA work
        env = parallel.init(args.device)  # under torchrun: joins the process group, cuda -> cuda:LOCAL_RANK
        try:
            return _run(args, env)
        finally:
            parallel.shutdown(env)


def _configs(spec: str) -> list[tuple]:
    """``"1,16,2048,1,1024;2,32,256,0,4096"`` -> [(phase, batch, seq_len, grad_ckpt, chunk), ...]."""
    rows = []
    for item in (x.strip() for x in spec.split(";") if x.strip()):
        f = [int(v) for v in item.split(",")]
        if len(f) != 5:
            raise ValueError(f"--configs: {item!r} is not PHASE,BATCH,SEQ_LEN,CKPT(0/1),CHUNK")
        rows.append((f[0], f[1], f[2], bool(f[3]), f[4]))
    return rows


def _run(args, env) -> int:
    device = env.device
    say = print if env.is_main else (lambda *a, **k: None)  # only rank 0 talks
    configs = _configs(args.configs)  # a bad spec fails before any model is built
    switches = {k: v for k, v in dict(attn=args.attn, loss_impl=args.loss_impl, ckpt_layers=args.ckpt_layers,
                                      precision=args.precision, ce_weight=args.ce_weight,
                                      hidden_weight=args.hidden_weight).items() if v is not None}
    switches.update({k: True for k in ("compile_loss", "compile_layers", "deterministic") if getattr(args, k)})
    pairs = [p for p in args.pairs.split(",") if p]
    for pair in pairs:  # every configuration's settings, before any model is built
        if pair not in PAIRS:
            say(f"distill_bench: unknown pair {pair!r}; choose from {sorted(PAIRS)}", file=sys.stderr)
            return 2
        for phase, batch, seq, ckpt, chunk in configs or CONFIGS[pair]:
            try:
                _cfg(phase, batch, seq, ckpt, chunk, args.steps + args.warmup, args.peak_tflops, device, switches)
            except ValueError as e:
                hint = (" (give phase-1 --configs: the default small/micro lists hold a phase-2 row)"
                        if phase != 1 else "")
                say(f"distill_bench: {pair} configuration {phase},{batch},{seq},{int(ckpt)},{chunk}: {e}{hint}",
                    file=sys.stderr)
                return 2
    if device.type == "cuda":  # as python -m distill does on cuda; never on cpu (the flags are process-wide)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "world": env.world, "switches": switches,
              "date": _dt.date.today().isoformat(), "peak_tflops": args.peak_tflops,
              "steps": args.steps, "warmup": args.warmup, "rows": []}
    out = Path(args.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    hdr = (f"{'pair':5} {'ph':>2} {'batch x seq':>12} {'ckpt':>4} {'chunk':>5} {'tok/s':>10} {'MFU':>6} "
           f"{'TFLOP/s':>8} {'step ms':>8} {'peak GB':>8} {'tok/s/GPU':>10}  ({env.world} GPU(s); peak = max rank)")
    say(f"{report['device']}, torch {report['torch']}, MFU vs {args.peak_tflops} TFLOP/s dense bf16")
    say(hdr)
    for pair in pairs:
        teacher = student = None
        for phase, batch, seq, ckpt, chunk in configs or CONFIGS[pair]:
            # a fresh pair when the last Distiller changed the student in place (FSDP2 sharding, bf16 layout,
            # compiled or partly checkpointed layers); the default path reuses it
            if teacher is None or env.is_dist or switches:
                del teacher, student
                _free()
                t0 = time.perf_counter()
                teacher, student = _models(pair, device, args.attn or "sdpa")
                build_s = time.perf_counter() - t0
            row = {"pair": pair, "phase": phase, "batch": batch, "seq_len": seq, "grad_ckpt": ckpt, "chunk": chunk,
                   "build_s": build_s}
            try:
                row.update(measure(teacher, student, phase, batch, seq, ckpt, chunk, args.steps, args.warmup,
                                   args.peak_tflops, env, switches, hash_weights=args.hash_weights))
                line = (f"{row['tokens_per_s']:10,.0f} {100 * row['mfu']:5.1f}% {row['model_tflops_per_s']:8.1f} "
                        f"{row['step_ms']:8.1f} {row['peak_mem_gb']:8.1f} {row['tokens_per_s_per_gpu']:10,.0f}")
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
                line = f"{'OOM':>10}"
                _free()
            say(f"{pair:5} {phase:2d} {f'{batch} x {seq}':>12} {('yes' if ckpt else 'no'):>4} {chunk:5d} {line}",
                flush=True)
            if "weights_sha256" in row:
                say(f"      student weights after the steps: sha256 {row['weights_sha256']}, last loss "
                    f"{row['loss']!r}", flush=True)
            report["rows"].append(row)
            if env.is_main:
                (out / args.json_name).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        del teacher, student
        _free()
    best = {}
    for r in report["rows"]:
        if "mfu" in r and r["phase"] == 1 and r["mfu"] > best.get(r["pair"], {}).get("mfu", -1):
            best[r["pair"]] = r
    report["best_phase1"] = {k: {f: v[f] for f in ("batch", "seq_len", "grad_ckpt", "chunk", "tokens_per_s", "mfu")}
                             for k, v in best.items()}
    for k, v in best.items():
        say(f"best {k} phase 1: {v['tokens_per_s']:,.0f} tok/s, MFU {100 * v['mfu']:.1f}% "
            f"(batch {v['batch']} x {v['seq_len']}, ckpt {v['grad_ckpt']}, chunk {v['chunk']})")
    if env.is_main:
        (out / args.json_name).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    say(f"wrote {out / args.json_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
