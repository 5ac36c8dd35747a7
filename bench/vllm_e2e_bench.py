"""End-to-end vLLM 0.26.0 speed of pdqkit's kernels on E4B-shaped checkpoints (GPU machine, CUDA graphs on).

Checkpoints (random weights, bench.factory's ``e4b`` scale, text-only ``Gemma4ForCausalLM``):

* ``full-bf16``     the unpruned model (MLP 10240);
* ``pruned-bf16``   MLP sliced to 8192 (``prune.slicing``: the first 8192 channels; random weights, so which ones
                    does not matter);
* ``pruned-w4a16``  ``pruned-bf16`` quantized by ``python -m pack.quantize`` (W4A16, group 128).

The 262144 x 2560 token embedding and the 262144 x 10752 per-layer-embedding table (6.9 GB together) are the
same in both bf16 checkpoints: they are written once into one shard that is hard-linked into both directories.
The KV-shared layers' ``k_norm`` tensors vLLM requires in unquantized Gemma-4 checkpoints are added
(``pack.checkpoint.kv_shared_k_norm_tensors``).

Engines (one per subprocess, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, torch.compile + CUDA graphs captured for
batch 1, 16 and 64 only, ``max_model_len`` 2304, prefix caching off):

    bf16-full, bf16-pruned                 vLLM's default (unquantized) path
    w4a16-vllm                             vLLM's own W4A16 choice (Machete on Hopper)
    w4a16-marlin                           Marlin forced (VLLM_DISABLED_KERNELS=CutlassW4A8,Machete,AllSpark)
    w4a16-pdqkit-fast, w4a16-pdqkit-exact  PDQKIT_VLLM_KERNEL=fast / exact (pdqkit's vLLM plugin)

Measured per engine: decode at batch 1, 16 and 64 (128-token prompts, ignore_eos, detokenize off, greedy): the
time of ``T0 + D`` output tokens minus that of ``T0``, over D steps -> ms/step and tok/s (prefill and engine
overheads cancel); prefill of 2048-token prompts (max_tokens=1) -> prompt tok/s. Best of ``--reps``.

The script is resumable, for runs that do not fit one command's time limit: checkpoints stay in ``--work``
(default /tmp/pdqkit_vllm_bench), results accumulate in ``--work``/vllm_e2e_bench.json, and no engine is started
when ``--budget-s`` (default 540 s, counted from the start of the call) would be exceeded; run the same command
again (same warm machine) until it prints "all variants done" (exit status 0; 3 = variants left). Each call
copies the JSON and the engine logs to ``$OUT``. Plot with bench/plot_e2e.py. ``--compile none`` (no
torch.compile, CUDA graphs for the decode batches only) starts engines faster; its results go to their own file.

    python bench/vllm_e2e_bench.py                       # generate (first call) + as many engines as fit
    python bench/vllm_e2e_bench.py --variants w4a16-marlin,w4a16-pdqkit-fast
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu.vllm_e2e_check import (check_kernel_use, engine_env, finish_engine, launch_summary,  # noqa: E402
                                      install_engine_reaper, pack_quantize, run_engine_subprocess, start_engine,
                                      text_config_of)

# variant -> (checkpoint dir name, kernel selection as in vllm_e2e_check.engine_env); run in this order
VARIANTS = {
    "w4a16-marlin": ("pruned-w4a16", "marlin"),
    "w4a16-pdqkit-fast": ("pruned-w4a16", "fast"),
    "w4a16-pdqkit-exact": ("pruned-w4a16", "exact"),
    "w4a16-vllm": ("pruned-w4a16", "default"),
    "bf16-pruned": ("pruned-bf16", "default"),
    "bf16-full": ("full-bf16", "default"),
}
CHECKPOINTS = ("full-bf16", "pruned-bf16", "pruned-w4a16")
SHARED_KEYS = ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight")  # identical in all variants
SHARED_SHARD, LAYER_SHARD = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
BATCHES = (1, 16, 64)
RESULTS = "vllm_e2e_bench.json"
# kernels/README.md reference (H200, vLLM 0.26.0 kernels, CUDA graphs): batch-1 decode ms/step
REFERENCE_B1_MS = {"bf16-full": 4.35, "bf16-pruned": 3.95, "w4a16-marlin": 3.40, "w4a16-vllm": 4.18}


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------

def _write_bf16(model, out: Path, shared_file: Path) -> None:
    """Write ``model`` as a two-shard bf16 checkpoint: shard 1 hard-linked from ``shared_file`` (embeddings),
    shard 2 every other tensor transformers' save_pretrained would write, plus the KV-shared k_norm tensors."""
    import torch
    from safetensors.torch import save_file

    from pack.checkpoint import atomic_output_dir, kv_shared_k_norm_tensors, usual_file_modes
    from pack.qconfig import QuantRecipe
    from pack.targets import plan_model

    with atomic_output_dir(out, force=True) as tmp:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        recipe = QuantRecipe()
        saved = plan_model(tmp, recipe).saved  # the keys save_pretrained writes
        sd = model.state_dict()
        if missing := [k for k in saved if k not in sd]:
            raise RuntimeError(f"model state_dict lacks {missing[:3]} that config.json implies")
        layers = {k: sd[k].detach().to(torch.bfloat16).contiguous().cpu() for k in saved if k not in SHARED_KEYS}
        layers.update(kv_shared_k_norm_tensors(model))
        save_file(layers, tmp / LAYER_SHARD, metadata={"format": "pt"})
        os.link(shared_file, tmp / SHARED_SHARD)
        weight_map = {k: SHARED_SHARD for k in SHARED_KEYS} | {k: LAYER_SHARD for k in layers}
        size = (tmp / LAYER_SHARD).stat().st_size + shared_file.stat().st_size
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        usual_file_modes(tmp)   # (save_file writes 0600)


def generate_checkpoints(work: Path, scale: str, pruned_width: int, seed: int) -> dict[str, Path]:
    """Make the three checkpoints under ``work`` (skips those already there); returns {name: dir}."""
    dirs = {name: work / f"{scale}-{name}" for name in CHECKPOINTS}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    import torch
    from safetensors.torch import save_file

    from bench.factory import build_model
    from prune.slicing import set_intermediate_size, slice_mlp

    t0 = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(scale, seed=seed, device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built random {scale} ({n_params / 1e9:.2f} B params) on {dev} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    shared = work / "shared" / SHARED_SHARD
    if not shared.is_file():
        shared.parent.mkdir(parents=True, exist_ok=True)
        sd = model.state_dict()
        save_file({k: sd[k].detach().contiguous().cpu() for k in SHARED_KEYS}, shared.with_suffix(".part"),
                  metadata={"format": "pt"})
        os.replace(shared.with_suffix(".part"), shared)
    if not (dirs["full-bf16"] / "config.json").is_file():
        _write_bf16(model, dirs["full-bf16"], shared)
        print(f"wrote {dirs['full-bf16']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    keep = torch.arange(pruned_width, device=dev)
    for layer in model.model.layers:
        slice_mlp(layer.mlp, keep)
    set_intermediate_size(model, pruned_width)
    if not (dirs["pruned-bf16"] / "config.json").is_file():
        _write_bf16(model, dirs["pruned-bf16"], shared)
        print(f"wrote {dirs['pruned-bf16']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    if not (dirs["pruned-w4a16"] / "config.json").is_file():
        pack_quantize(dirs["pruned-bf16"], dirs["pruned-w4a16"], dev)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return dirs


def parse_decode_steps(text: str) -> dict[str, int]:
    """``"1:256,16:128,64:128"`` -> ``{"1": 256, "16": 128, "64": 128}`` (batch as a JSON key, steps as int; every
    batch of BATCHES needs a count)."""
    try:
        steps = {b.strip(): int(n) for b, n in (x.split(":") for x in text.split(",") if x.strip())}
    except ValueError:
        raise ValueError(f"--decode-steps {text!r}: expected BATCH:STEPS pairs, e.g. 1:256,16:128,64:128") from None
    if missing := [b for b in BATCHES if str(b) not in steps] + [b for b, n in steps.items() if n < 1]:
        raise ValueError(f"--decode-steps {text!r}: need a positive step count for each batch of {BATCHES} "
                         f"(bad or missing: {missing})")
    return steps


# ----------------------------------------------------------------------------------------------------------------
# the engine process
# ----------------------------------------------------------------------------------------------------------------

def engine_main(spec_path: str) -> None:
    import random

    spec = json.loads(Path(spec_path).read_text())
    from vllm import SamplingParams

    llm, res = start_engine(spec)
    t0 = time.perf_counter()
    rng = random.Random(0)
    vocab = spec["vocab"]

    def prompts(n, length):  # fresh random ids every time: no cache can help
        return [{"prompt_token_ids": [rng.randrange(4, vocab) for _ in range(length)]} for _ in range(n)]

    def timed(n, length, max_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        ps = prompts(n, length)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return dt

    P, T0 = spec["prompt_len"], spec["t0"]
    for b in BATCHES:  # warm-up: every captured size, and the prefill path
        timed(b, P, T0)
    timed(2, spec["prefill_len"], 1)
    res["decode"] = {}
    for b in BATCHES:
        d = spec["decode_steps"][str(b)]
        ms = []
        for _ in range(spec["reps"]):
            short = timed(b, P, T0)
            long = timed(b, P, T0 + d)
            ms.append((long - short) / d * 1e3)
        best = min(ms)
        res["decode"][str(b)] = {"ms_per_step": round(best, 4), "tok_s": round(b * 1e3 / best, 1),
                                 "ms_per_step_all": [round(x, 4) for x in ms], "steps": d}
    n, L = spec["prefill_prompts"], spec["prefill_len"]
    ts = [timed(n, L, 1) for _ in range(spec["reps"])]
    res["prefill"] = {"tok_s": round(n * L / min(ts), 0), "prompts": n, "prompt_len": L,
                      "s_all": [round(t, 4) for t in ts]}
    res["bench_s"] = round(time.perf_counter() - t0, 1)
    # pdqkit's launch census (engine_env turns it on for pdqkit engines): every launch made from Python over the
    # whole bench, per kernel, shape and config (start-up, warm-up, prefills beyond the captured batch sizes); CUDA
    # graph replays are not seen
    w4a16 = sys.modules.get("kernels.w4a16")
    res["launches"] = w4a16.census(reset=True) if w4a16 is not None else {}
    finish_engine(res, spec["result"])


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------

def resume_state(res_file: Path, settings: dict) -> dict:
    """The results of earlier calls in ``res_file`` to resume from, if they were measured with exactly ``settings``
    (every setting a measurement depends on); else a fresh state, so that a ``--scale micro`` dry run and an e4b
    run never share one table. The state records ``settings``."""
    state = json.loads(res_file.read_text()) if res_file.is_file() else {"variants": {}}
    if state["variants"] and state.get("settings") != settings:
        print(f"{res_file}: its {len(state['variants'])} variants were measured with other settings "
              f"({state.get('settings')}); measuring again", flush=True)
        state = {"variants": {}}
    state["settings"] = settings
    return state


def _table(results: dict, with_reference: bool = True) -> str:
    """The results table; ``with_reference``: the reference column (measured for ``--scale e4b --compile vllm``)."""
    marlin = results.get("w4a16-marlin", {}).get("decode", {})
    head = (f"{'variant':<20} {'kernel (log)':<26} " + " ".join(f"{'b' + str(b) + ' ms/step':>12}" for b in BATCHES)
            + " " + " ".join(f"{'b' + str(b) + ' tok/s':>10}" for b in BATCHES) + f" {'prefill tok/s':>13}"
            + f" {'b1 vs marlin':>12} {'b1 ref ms':>9}")
    lines = [head, "-" * len(head)]
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        if "decode" not in r:
            lines.append(f"{name:<20} ERROR {r.get('error', '')[:120]}")
            continue
        dec = r["decode"]
        ms = " ".join(f"{dec[str(b)]['ms_per_step']:>12.3f}" for b in BATCHES)
        tps = " ".join(f"{dec[str(b)]['tok_s']:>10.0f}" for b in BATCHES)
        vs = (f"{marlin['1']['ms_per_step'] / dec['1']['ms_per_step']:>11.2f}x" if "1" in marlin else f"{'-':>12}")
        ref = REFERENCE_B1_MS.get(name) if with_reference else None
        kern = ",".join(r.get("kernels_logged", [])) or "(unquantized)"
        if r.get("kernel_ok") is False:
            kern = "WRONG KERNEL: " + kern
        lines.append(f"{name:<20} {kern[:26]:<26} {ms} {tps} {r['prefill']['tok_s']:>13.0f} {vs} "
                     f"{ref if ref else '-':>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list, default all: " + ",".join(VARIANTS))
    ap.add_argument("--scale", default="e4b", help="bench.factory scale (default e4b; micro/small for a dry run)")
    ap.add_argument("--pruned-width", type=int, help="MLP width of the pruned checkpoints (default: 80%% of the "
                    "scale's width rounded down to 128: 8192 for e4b)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("PDQKIT_BENCH_WORK", "/tmp/pdqkit_vllm_bench")))
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--budget-s", type=float, default=540, help="start no engine that could end after this")
    ap.add_argument("--engine-estimate-s", type=float, default=150, help="assumed engine time before one is measured")
    ap.add_argument("--redo", action="store_true", help="re-measure variants already in the results file")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--t0", type=int, default=16, help="output tokens of the short run")
    ap.add_argument("--decode-steps", default="1:256,16:128,64:128", help="extra decode steps per batch size")
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--prefill-prompts", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2304)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--kv-cache-gib", type=float, default=16)
    ap.add_argument("--compile", choices=("vllm", "none", "eager"), default="vllm",
                    help="vllm: vLLM's default torch.compile + CUDA graphs (default); none: no torch.compile, full "
                    "CUDA graphs of the decode batches only (engines start ~1 min sooner); eager: neither")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per engine")
    ap.add_argument("--_engine", help=argparse.SUPPRESS)
    ap.add_argument("--_gen", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._engine:
        engine_main(args._engine)
        return 0
    t_start = time.perf_counter()
    if args.pruned_width is None:
        from bench.factory import text_config

        args.pruned_width = int(0.8 * text_config(args.scale).intermediate_size) // 128 * 128
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    try:
        steps = parse_decode_steps(args.decode_steps)
    except ValueError as e:
        ap.error(str(e))
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    if args._gen:
        generate_checkpoints(work, args.scale, args.pruned_width, seed=0)
        return 0
    install_engine_reaper()
    out = (args.out or work).absolute()
    out.mkdir(parents=True, exist_ok=True)
    # checkpoint generation in its own process: its GPU memory is gone before the first engine starts
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_gen", "--work", str(work), "--scale",
                    args.scale, "--pruned-width", str(args.pruned_width)], cwd=REPO, check=True)
    dirs = {name: work / f"{args.scale}-{name}" for name in CHECKPOINTS}

    # one results file per compile mode: numbers of different modes never mix
    res_file = work / (RESULTS if args.compile == "vllm" else RESULTS.replace(".json", f"-{args.compile}.json"))
    settings = {"scale": args.scale, "pruned_width": args.pruned_width, "prompt_len": args.prompt_len,
                "prefill_len": args.prefill_len, "prefill_prompts": args.prefill_prompts, "t0": args.t0,
                "decode_steps": steps, "reps": args.reps, "max_model_len": args.max_model_len,
                "kv_cache_gib": args.kv_cache_gib, "gpu_memory_utilization": args.gpu_memory_utilization,
                "compile": args.compile}
    state = resume_state(res_file, settings)
    state["meta"] = {"scale": args.scale, "pruned_width": args.pruned_width, "batches": list(BATCHES),
                     "prompt_len": args.prompt_len, "prefill_len": args.prefill_len,
                     "compile": args.compile, "cuda_graphs": args.compile != "eager",
                     "cudagraph_capture_sizes": list(BATCHES),
                     "reference_b1_ms": REFERENCE_B1_MS}
    vocab = int(text_config_of(dirs["pruned-w4a16"])["vocab_size"])
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    engine = dict(max_model_len=args.max_model_len, max_num_seqs=max(BATCHES), max_num_batched_tokens=8192,
                  gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
                  kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), enforce_eager=args.compile == "eager")
    if args.compile == "vllm":
        engine["compilation_config"] = {"cudagraph_capture_sizes": list(BATCHES)}
    elif args.compile == "none":
        engine["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                        "cudagraph_capture_sizes": list(BATCHES)}
    durations = [r["wall_s"] for r in state["variants"].values() if "wall_s" in r]
    todo = [v for v in variants if args.redo or "decode" not in state["variants"].get(v, {})]
    for name in todo:
        estimate = max(durations, default=args.engine_estimate_s)
        if time.perf_counter() - t_start + estimate > args.budget_s:
            print(f"budget: {name} would end after {args.budget_s:.0f} s; run the same command again", flush=True)
            break
        ckpt, kernel = VARIANTS[name]
        spec = {"ckpt": str(dirs[ckpt]), "engine": engine, "vocab": vocab, "reps": args.reps,
                "prompt_len": args.prompt_len, "t0": args.t0, "decode_steps": steps,
                "prefill_len": args.prefill_len, "prefill_prompts": args.prefill_prompts}
        print(f"[{name}] {ckpt}, kernel selection: {kernel} ...", flush=True)
        r = run_engine_subprocess(Path(__file__).resolve(), spec, engine_env(kernel, work, name), logs / f"{name}.log",
                                  args.timeout)
        r.update(checkpoint=ckpt, selection=kernel)
        if "w4a16" in ckpt:  # the kernel asked for ran every W4A16 layer (vLLM's log + census of the model)
            r["kernel_ok"] = check_kernel_use(r, kernel)["ok"]
        state["variants"][name] = r
        durations.append(r["wall_s"])
        res_file.write_text(json.dumps(state, indent=1))
        msg = (f"b1 {r['decode']['1']['ms_per_step']:.3f} ms/step, prefill {r['prefill']['tok_s']:.0f} tok/s"
               if "decode" in r else "ERROR " + r.get("error", "")[-300:])
        print(f"[{name}] {r['wall_s']} s (startup {r.get('startup_s', '-')} s), kernels {r['kernels_logged']}, "
              f"census {r.get('census')}: {msg}", flush=True)
        if r.get("launches"):
            print(f"[{name}] launches: {launch_summary(r['launches'])}", flush=True)

    res_file.write_text(json.dumps(state, indent=1))   # settings and meta of this call, also when nothing ran
    print("\n" + _table(state["variants"], with_reference=args.scale == "e4b" and args.compile == "vllm"))
    left = [v for v in variants if "decode" not in state["variants"].get(v, {})]
    print("\nall variants done" if not left else f"\nnot measured yet: {left}")
    if out != work:
        if res_file.is_file():
            shutil.copy(res_file, out / res_file.name)
        with open(out / "vllm_e2e_bench_logs.txt", "w") as fh:
            for f in sorted(logs.glob("*.log")):
                fh.write(f"\n===== {f.stem} =====\n" + f.read_text(errors="replace")[-20000:])
    return 0 if not left else 3


if __name__ == "__main__":
    sys.exit(main())
