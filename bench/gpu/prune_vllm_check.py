"""GPU check of ``python -m prune``: prune on CUDA, quantize, load both in vLLM 0.26.0, print tokens.

For each checkpoint (default: random ``micro`` multimodal and ``small`` text-only Gemma-4 from bench.factory with
the bench tokenizer; or ``--ckpt DIR`` for e.g. the trained ``small`` of the quality pipeline):

1. ``python -m prune BASE -o PRUNED --device cuda`` (activation criterion, calibration from the bench corpus
   calib split) and the same with ``--device cpu``; reported: whether both runs kept the same channels in every
   layer (bf16 GEMMs differ between CPU and GPU, so a channel near the cut may flip: reported, not a gate).
2. ``python -m pack.quantize PRUNED -o PRUNED-w4a16 --device cuda`` (W4A16 pack-quantized).
3. vLLM loads PRUNED (bf16; vLLM's unquantized Gemma-4 loader needs the KV-shared k_norm tensors the bf16
   writer adds) and PRUNED-w4a16 with Marlin forced, each in its own engine process, with the settings of
   shared/gpu/README.md (``enforce_eager=True``, TRITON_ATTN, head-dim fix, ``language_model_only`` for the
   multimodal model, ``kv_cache_memory_bytes``); greedy tokens for a few token-id prompts are printed and
   compared with HF transformers' greedy tokens of PRUNED (common prefix per prompt; random-weight models have
   tiny logit margins, so one bf16 rounding difference can flip a token: reported, not a gate).

Usage on the GPU machine (repo root; vLLM importable, see shared/gpu/README.md)::

    export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
    OUT=$OUT python bench/gpu/prune_vllm_check.py [--scales micro-mm,small] [--ckpt DIR ...] [--prompts 4]

Exit status 0 when every prune/quantize command succeeded, the pruned config has the expected width and
every engine loaded and generated. ``--cpu-dry-run`` (no GPU, no vLLM) runs steps 1 (CPU) and HF on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu.pack_vllm_check import _prompts, _spawn, finish_report  # noqa: E402  (HF worker, prompts, report)
from bench.gpu.vllm_e2e_check import (engine_env, engine_main, pack_quantize,  # noqa: E402
                                      run_engine_subprocess, text_prompts)


def _prune(src: Path, dst: Path, device: str, samples: int, seq_len: int) -> str:
    cmd = [sys.executable, "-m", "prune", str(src), "-o", str(dst), "--device", device, "--samples", str(samples),
           "--seq-len", str(seq_len), "--force", "--no-progress"]
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(r.stdout.strip() or r.stderr.strip()[-2000:], flush=True)
    if r.returncode:
        raise RuntimeError(f"prune failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


def _same_channels(a: Path, b: Path) -> dict:
    """Per layer, whether two pruned checkpoints of one base kept the same gate_proj rows (compared as bytes)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    keys = sorted(k for k in ta if k.endswith("mlp.gate_proj.weight"))
    same = [bool(ta[k].equal(tb[k])) for k in keys]
    return {"layers": len(keys), "identical_layers": sum(same), "all_identical": all(same)}


def _base(scale: str, work: Path) -> Path:
    name, mm = scale.removesuffix("-mm"), scale.endswith("-mm")
    base = work / f"{scale}-bf16"
    if not (base / "config.json").is_file():
        from bench.factory import save_random_checkpoint
        from bench.tokenizer import get_tokenizer

        save_random_checkpoint(name, base, multimodal=mm, seed=0, force=True, tokenizer=get_tokenizer(name))
    return base


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="micro-mm,small", help="comma list of micro, micro-mm, small, small-mm "
                                                               "(random weights); '' for none")
    ap.add_argument("--ckpt", type=Path, action="append", default=[], help="also check this bf16 checkpoint")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=540, help="seconds per engine")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "out" / "prune_vllm_check")))
    ap.add_argument("--cpu-dry-run", action="store_true", help="no GPU/vLLM: prune on CPU + HF on CPU only")
    ap.add_argument("--_engine", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._engine:
        engine_main(args._engine)
        return 0

    work = args.out.absolute()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    # (tag, checkpoint, trained: a --ckpt with its tokenizer gets prompts cut from the validation text)
    bases = ([(s, _base(s, work), False) for s in args.scales.split(",") if s] +
             [(c.name, c.absolute(), (c / "tokenizer.json").is_file()) for c in args.ckpt])
    dev = "cpu" if args.cpu_dry_run else "cuda"
    report, failures = {}, []
    for tag, base, trained in bases:
        entry: dict = {"base": str(base)}
        report[tag] = entry
        pruned, pruned_cpu = work / f"{tag}-pruned", work / f"{tag}-pruned-cpu"
        try:
            t0 = time.perf_counter()
            entry["summary"] = _prune(base, pruned, dev, args.samples, args.seq_len)
            entry["prune_s"] = round(time.perf_counter() - t0, 1)
            if not args.cpu_dry_run:
                _prune(base, pruned_cpu, "cpu", args.samples, args.seq_len)
                entry["cpu_vs_cuda_channels"] = _same_channels(pruned, pruned_cpu)
            cfg = json.loads((pruned / "config.json").read_text())
            tc, tb = cfg.get("text_config", cfg), json.loads((base / "config.json").read_text())
            tb = tb.get("text_config", tb)
            entry["intermediate_size"] = [tb["intermediate_size"], tc["intermediate_size"]]
            if tc["intermediate_size"] >= tb["intermediate_size"] or tc["intermediate_size"] % 128:
                failures.append(f"{tag}: pruned intermediate_size {tc['intermediate_size']} unexpected")
            w4 = None if args.cpu_dry_run else pack_quantize(pruned, work / f"{tag}-pruned-w4a16", "cuda")
        except (RuntimeError, subprocess.CalledProcessError) as e:
            failures.append(f"{tag}: {e}")
            continue
        prompts = text_prompts(base, args.prompts, 256, seed=1) if trained else _prompts(args.prompts,
                                                                                          int(tc["vocab_size"]))
        entry["prompt_source"] = "bench corpus valid text" if trained else "random token ids"
        hf, log, _ = _spawn("hf", {"ckpt": str(pruned), "prompts": prompts, "new_tokens": args.new_tokens,
                                   "device": dev}, work / "logs", f"{tag}-hf")
        if hf is None:
            failures.append(f"{tag}: HF transformers failed on the pruned checkpoint:\n{log[-2000:]}")
        entry["hf_tokens"] = [r["tokens"] for r in hf["results"]] if hf else None
        if args.cpu_dry_run:
            continue
        engine = dict(max_model_len=512, gpu_memory_utilization=0.1, kv_cache_memory_bytes=1 << 30,
                      enforce_eager=True, enable_prefix_caching=False)
        runs = [("bf16", pruned, "default"), ("w4a16-marlin", w4, "marlin")]

        def one(run, tag=tag, prompts=prompts, engine=engine):
            name, ckpt, kernel = run
            spec = {"ckpt": str(ckpt), "engine": engine, "prompts": prompts, "new_tokens": args.new_tokens}
            return name, run_engine_subprocess(Path(__file__).resolve(), spec,
                                               engine_env(kernel, work, f"{tag}-{name}"),
                                               work / "logs" / f"{tag}-{name}.log", args.timeout)

        with ThreadPoolExecutor(max_workers=2) as pool:
            for name, r in pool.map(one, runs):
                if "error" in r:
                    failures.append(f"{tag}: vLLM {name} failed: {r['error'][-1500:]}")
                    entry[f"vllm_{name}"] = {"error": r["error"][-1500:]}
                    continue
                toks = [row["tokens"] for row in r["batched"]]
                entry[f"vllm_{name}"] = {"startup_s": r.get("startup_s"), "kernels": r.get("kernels_logged"),
                                         "tokens": toks}
                if entry["hf_tokens"]:
                    entry[f"vllm_{name}"]["prefix_vs_hf"] = [_prefix(a, b) for a, b in zip(entry["hf_tokens"], toks)]

    for tag, e in report.items():
        print(f"\n== {tag}: intermediate_size {e.get('intermediate_size')}, prune {e.get('prune_s')} s on {dev}, "
              f"cpu vs cuda channels {e.get('cpu_vs_cuda_channels')}")
        print(f"   HF bf16 pruned tokens: {e.get('hf_tokens')}")
        for name in ("bf16", "w4a16-marlin"):
            r = e.get(f"vllm_{name}")
            if r:
                print(f"   vLLM {name} ({','.join(r.get('kernels') or []) or 'bf16'}): {r.get('tokens', r)}"
                      f"  common prefix with HF {r.get('prefix_vs_hf')}")
    return finish_report(work / "prune_vllm_check.json", {"checkpoints": report, "failures": failures}, failures)


if __name__ == "__main__":
    sys.exit(main())
