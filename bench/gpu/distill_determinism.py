"""Are CUDA distillation runs reproducible to the bit, with and without ``--deterministic``, and what does it cost?

For each scale, builds a random teacher and its MLP-sliced student (``distill.toy.save_pair``) and random token
data, then runs ``python -m distill`` ``--repeats`` times in fresh processes per mode (the default kernels, and
``--deterministic``), same seed and settings. Prints, per mode: whether every run's ``model.safetensors`` has the
first run's sha256, the largest weight difference from the first run (in bf16 ulps of the weight, and absolute),
and the median training tokens/s of the steps after the first two (from ``--log-json``)::

    python bench/gpu/distill_determinism.py --out $OUT/det --scales micro small --phases 1 2
    python bench/gpu/distill_determinism.py --out $OUT/det --scales micro --global-head-dim 512 \\
        --modes deterministic --extra="--loss-impl fused --compile-loss --compile-layers"
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _ids(path: Path, n_docs: int, length: int, vocab: int) -> Path:
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"input_ids": torch.randint(4, vocab, (length,), generator=g).tolist()}) + "\n")
    return path


def _sha(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _diff(a: Path, b: Path) -> tuple[float, float, int]:
    """(largest |a - b| over all weights, the largest in units of the bf16 spacing at max(|a|, |b|) (normals),
    weights that differ)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    worst = worst_ulp = 0.0
    differ = 0
    for k, x in ta.items():
        x, y = x.float(), tb[k].float()
        d = (x - y).abs()
        differ += int((d > 0).sum())
        if d.numel():
            worst = max(worst, float(d.max()))
            ulp = torch.maximum(x.abs(), y.abs()).clamp_min(2.0 ** -126) * 2.0 ** -7   # ~ bf16 spacing there
            worst_ulp = max(worst_ulp, float((d / ulp).max()))
    return worst, worst_ulp, differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scales", nargs="+", default=["micro", "small"])
    ap.add_argument("--phases", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--global-head-dim", type=int, default=None,
                    help="override the full-attention layers' head dim (E4B: 512, which SDPA's flash kernel "
                         "does not take: the memory-efficient kernel runs instead)")
    ap.add_argument("--modes", nargs="+", choices=("default", "deterministic"), default=["default", "deterministic"])
    ap.add_argument("--extra", default="", help="more `python -m distill` options for every run, one string "
                    "given as --extra=... (e.g. --extra=\"--loss-impl fused --compile-loss\"); recorded in the JSON")
    args = ap.parse_args()
    from distill.toy import save_pair

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    rows = []
    for scale in args.scales:
        over = {} if args.global_head_dim is None else {"global_head_dim": args.global_head_dim}
        root = args.out / (scale + "".join(f"-{k}{v}" for k, v in over.items()))
        teacher, student = save_pair(root, scale, width=int({"micro": 512, "small": 2048}.get(scale, 2048)),
                                     **over)
        vocab = json.loads((teacher / "config.json").read_text())
        vocab = (vocab.get("text_config") or vocab)["vocab_size"]
        data = _ids(root / "data.jsonl", 64, 1024, vocab)
        for phase in args.phases:
            for mode in args.modes:
                runs = []
                for r in range(args.repeats):
                    out = root / f"p{phase}-{mode}-{r}"
                    log = root / f"p{phase}-{mode}-{r}.jsonl"
                    cmd = [sys.executable, "-m", "distill", "--teacher", str(teacher), "--student", str(student),
                           "--data", str(data), "-o", str(out), "--device", args.device, "--phase", str(phase),
                           "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                           "--log-every", "100", "--log-json", str(log), "--force"]
                    if phase == 2:
                        cmd += ["--max-new-tokens", "32"]
                    if mode == "deterministic":
                        cmd.append("--deterministic")
                    cmd += shlex.split(args.extra)
                    t0 = time.perf_counter()
                    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
                    wall = time.perf_counter() - t0
                    if res.returncode != 0:
                        print(f"{scale} phase {phase} {mode} run {r}: FAILED\n{res.stderr[-3000:]}", flush=True)
                        break
                    steps = [json.loads(x) for x in log.read_text().splitlines()]
                    tps = [s["tokens_per_s"] for s in steps if s.get("event") == "step" and s["step"] > 2
                           and s.get("tokens_per_s")]
                    runs.append((out, _sha(out / "model.safetensors"), statistics.median(tps) if tps else None,
                                 wall))
                if not runs:
                    continue
                same = sum(sha == runs[0][1] for _, sha, *_ in runs[1:])
                diffs = [_diff(runs[0][0], o) for o, *_ in runs[1:]]
                worst = max((d[0] for d in diffs), default=0.0)
                worst_ulp = max((d[1] for d in diffs), default=0.0)
                differ = max((d[2] for d in diffs), default=0)
                tps = statistics.median([t for *_, t, _ in runs if t is not None] or [float("nan")])
                row = dict(scale=scale, phase=phase, mode=mode, runs=len(runs), same_bytes_as_first=same,
                           max_abs_diff=worst, max_diff_bf16_ulps=worst_ulp, weights_that_differ=differ,
                           tokens_per_s=tps, walls=[round(w, 1) for *_, w in runs])
                row.update(over, extra=args.extra)
                rows.append(row)
                print(f"{root.name:6s} phase {phase} {mode:13s}: {same}/{len(runs) - 1} later runs byte-identical "
                      f"to the first; largest difference {worst:.3g} ({worst_ulp:.1f} bf16 ulps), "
                      f"{differ:,} weights differ; {tps:,.0f} tok/s (median), walls {row['walls']} s", flush=True)
    (args.out / "distill_determinism.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
