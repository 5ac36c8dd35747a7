"""pdqkit ``python -m pack.quantize`` vs llmcompressor ``oneshot`` on the same ~1B-parameter random Gemma-4.

Not a test: run it by hand on the CPU machine (2 cores, 24 GiB) and record the numbers (pack/README.md).

    python bench/bench_quantize.py [--layers 10] [--vocab 32768] [--oracle-python .oracle-venv/bin/python]

The checkpoint is bench.factory's "e4b" scale (E4B's published text dims: hidden 2560, MLP 10240, 8/2 heads,
head dim 256/512, PLE 256) with 10 layers (2 full-attention, the last 4 KV-shared) and a 32768-token vocab:
~1.1 B parameters, text-only (``Gemma4ForCausalLM``), built once under out/bench/ and reused.
Both tools run as separate processes, end to end (imports included), interleaved ``--repeats`` times (best
wall time reported: the machine is shared); a third pdqkit run imports its libraries first and times the work
after them, which llmcompressor's oracle script reports too (``work_only``: the ratio without import time);
pdqkit in eager rounding (the only mode a CPU llmcompressor run produces, so the outputs are compared byte for
byte) and in its default fp32div mode, each with cold caches (an empty ``$PDQKIT_PLAN_CACHE`` and
``$PDQKIT_HASH_CACHE`` per run: a first run) and warm ones (filled once before the loop: a repeat run on the same
input, which takes its plan from pack.plancache, importing neither transformers nor compressed-tensors, and its
input files' sha256 from pack.hashcache; each run's summary line is checked for it). Peak RSS is each process's own
``ru_maxrss`` (``os.wait4``; this driver stays small because a child inherits its parent's high-water mark,
recorded as ``rss_floor_gib``: the peak a ``true`` child reports);
the input is read once before each run so both start with a warm page cache.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "tests" / "oracle" / "llmc_oneshot.py"


def _run(argv: list[str], log: Path, caches: Path | None = None) -> dict:
    """Run ``argv`` as a child (if ``caches`` is given, ``$PDQKIT_PLAN_CACHE`` = ``caches/plans`` and
    ``$PDQKIT_HASH_CACHE`` = ``caches/hashes``); wall and CPU seconds, peak RSS (GiB)."""
    env = None if caches is None else dict(os.environ, PDQKIT_PLAN_CACHE=str(caches / "plans"),
                                           PDQKIT_HASH_CACHE=str(caches / "hashes"))
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed ({proc.returncode}); see {log}")
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_gib": round(ru.ru_maxrss * 1024 / 2**30, 3)}


# the work of ``python -m pack.quantize ARGS`` after every import it needs, timed in one process (the CLI itself
# overlaps those imports with hashing the input): compared with llmcompressor's ``work_s`` (its oneshot after its
# imports) this is the ratio without the libraries' import time
_PDQ_WORK = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, compressed_tensors, transformers.models.gemma4.modeling_gemma4
from pack.quantize import main
t1 = time.perf_counter()
rc = main(sys.argv[1:])
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "work_s": t2 - t1}))
sys.exit(rc)
"""


def _last_json(log: Path) -> dict:
    """The JSON object a child printed last (its own timings)."""
    return json.loads(log.read_text().strip().splitlines()[-1])


def _warm(d: Path) -> int:
    """Read every safetensors file once (page cache warm) through one small reused buffer: the driver's own peak
    RSS is every child's floor (Linux keeps ru_maxrss across fork and exec)."""
    n, buf = 0, bytearray(1 << 20)
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while got := fh.readinto(buf):
                n += got
    return n


def _n_params(d: Path) -> int:
    """Elements of every tensor, from the safetensors headers (8-byte length + JSON; no torch import here)."""
    n = 0
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        n += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--kv-shared", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--work", type=Path, default=REPO / "out" / "bench")
    ap.add_argument("--oracle-python", default=os.environ.get("PDQKIT_ORACLE_PYTHON",
                                                               str(REPO / ".oracle-venv" / "bin" / "python")))
    ap.add_argument("--multimodal", action="store_true",
                    help="with E4B's vision and audio towers (Gemma4ForConditionalGeneration)")
    ap.add_argument("--streamed", action="store_true",
                    help="build the input with bench.factory.save_random_checkpoint_streamed (meta model, one "
                         "shard in memory: N(0, 0.02) stand-in weights; needed for the full E4B on 24 GiB)")
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each tool; best wall time kept")
    args = ap.parse_args(argv)

    tag = ("-mm" if args.multimodal else "") + ("-streamed" if args.streamed else "")
    base = args.work / f"gemma4-e4b-L{args.layers}-kv{args.kv_shared}-v{args.vocab}{tag}-bf16"
    if not (base / "config.json").is_file():
        # built in a child process: a fork inherits the parent's peak RSS (ru_maxrss survives exec), so this
        # driver must stay small for the two measured children
        print(f"building {base} ...", flush=True)
        fn = "save_random_checkpoint_streamed" if args.streamed else "save_random_checkpoint"
        subprocess.run([sys.executable, "-c", f"import sys; from bench.factory import {fn} as s; "
                        f"s('e4b', sys.argv[1], multimodal={args.multimodal}, seed=0, force=True, "
                        f"num_hidden_layers={args.layers}, num_kv_shared_layers={args.kv_shared}, "
                        f"vocab_size={args.vocab})", str(base)],
                       cwd=REPO, check=True)
    n_params = _n_params(base)
    size = _warm(base)
    floor = _run(["true"], args.work / "floor.log")["peak_rss_gib"]  # what any child reports as its peak at least
    print(f"input: {base.name}: {n_params / 1e9:.3f} B parameters, {size / 1e9:.2f} GB", flush=True)

    results = {"input": {"dir": base.name, "params": n_params, "bytes": size, "layers": args.layers,
                         "kv_shared": args.kv_shared, "vocab": args.vocab, "multimodal": args.multimodal,
                         "streamed": args.streamed},
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rss_floor_gib": floor}
    ours, ref = args.work / "pdqkit-w4a16", args.work / "llmc-w4a16"
    pdq = [sys.executable, "-m", "pack.quantize", str(base), "-o", str(ours), "--force", "--no-progress"]
    runs: dict[str, list[dict]] = {"pdqkit": [], "pdqkit_fp32div": [], "pdqkit_warm": [], "pdqkit_fp32div_warm": [],
                                   "pdqkit_preimported": [], "llmcompressor": []}
    # "cold": empty caches every run (a first run: plans with transformers and compressed-tensors, hashes every
    # input file); "warm": caches filled by an earlier run on this input (pack.plancache: neither library
    # imported; pack.hashcache: no input file read for its sha256)
    warm_cache = args.work / "caches"
    shutil.rmtree(args.work / "plan-cache", ignore_errors=True)  # the layout before the hash cache
    shutil.rmtree(warm_cache, ignore_errors=True)
    # the hash cache stores no file changed less than SETTLE_NS before the run: a just-built input must settle
    from pack.hashcache import SETTLE_NS
    shards = sorted(base.glob("*.safetensors"))
    newest = max(f.stat().st_ctime_ns for f in shards)
    time.sleep(max(0.0, (newest + SETTLE_NS - time.time_ns()) / 1e9 + 0.1))
    _run(pdq + ["-o", str(ours) + "-prime"], args.work / "pdqkit-prime.log", warm_cache)
    for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
        for key, rounding, cached in (("pdqkit", "eager", False), ("pdqkit_fp32div", "fp32div", False),
                                      ("pdqkit_warm", "eager", True), ("pdqkit_fp32div_warm", "fp32div", True)):
            _warm(base)
            dst = ours if key == "pdqkit" else Path(f"{ours}-{key}")
            with tempfile.TemporaryDirectory(prefix="pdqkit-cold-cache-") as cold:
                runs[key].append(_run(pdq + ["--rounding", rounding, "-o", str(dst)], args.work / f"{key}.log",
                                      warm_cache if cached else Path(cold)))
            said = (args.work / f"{key}.log").read_text().strip().splitlines()[-1]
            want = ("plan cached", f"{len(shards)} of {len(shards)} input hashes cached") if cached else \
                ("plan built", f"0 of {len(shards)} input hashes cached")
            if not all(w in said for w in want):  # the run measured what its name says
                raise SystemExit(f"{key}: expected {' and '.join(want)}; the run said: {said}")
            print(f"{key}:", runs[key][-1], flush=True)
        _warm(base)
        log = args.work / "pdqkit-preimported.log"
        r = _run([sys.executable, "-c", _PDQ_WORK, *pdq[3:], "--rounding", "eager", "-o", str(ours) + "-pre",
                  "--no-plan-cache", "--no-hash-cache"], log)
        runs["pdqkit_preimported"].append({**r, **{k: round(v, 2) for k, v in _last_json(log).items()}})
        print("pdqkit (eager, imports first, work timed):", runs["pdqkit_preimported"][-1], flush=True)
        if not args.skip_llmc:
            _warm(base)
            r = _run([args.oracle_python, str(ORACLE), str(base), str(ref)], args.work / "llmc.log")
            own = _last_json(args.work / "llmc.log")
            runs["llmcompressor"].append({**r, "imports_s": round(own["imports_s"], 2),
                                          "work_s": round(own["work_s"], 2)})
            print("llmcompressor:", runs["llmcompressor"][-1], flush=True)
    results["runs"] = runs
    results["pdqkit_summary_line"] = (args.work / "pdqkit.log").read_text().strip().splitlines()[-1]
    best = {k: {"wall_s": min(r["wall_s"] for r in v), "cpu_s": min(r["cpu_s"] for r in v),
                "peak_rss_gib": max(r["peak_rss_gib"] for r in v)} for k, v in runs.items() if v}
    results["best"] = best
    if not args.skip_llmc:
        a, b = (ours / "model.safetensors").read_bytes(), (ref / "model.safetensors").read_bytes()
        results["identical_model_safetensors"] = a == b
        p, r = best["pdqkit"], best["llmcompressor"]
        results["speedup"] = round(r["wall_s"] / p["wall_s"], 2)
        results["speedup_fp32div"] = round(r["wall_s"] / best["pdqkit_fp32div"]["wall_s"], 2)
        results["speedup_warm"] = round(r["wall_s"] / best["pdqkit_warm"]["wall_s"], 2)
        results["speedup_fp32div_warm"] = round(r["wall_s"] / best["pdqkit_fp32div_warm"]["wall_s"], 2)
        results["rss_ratio_warm"] = round(best["pdqkit_warm"]["peak_rss_gib"] / r["peak_rss_gib"], 3)
        warm_out = Path(f"{ours}-pdqkit_warm") / "model.safetensors"
        results["identical_model_safetensors_warm"] = warm_out.read_bytes() == b
        results["rss_ratio"] = round(p["peak_rss_gib"] / r["peak_rss_gib"], 3)
        results["cpu_ratio"] = round(r["cpu_s"] / p["cpu_s"], 2)
        # without the import time: both tools' work after their imports, best of the repeats
        w_p = min(x["work_s"] for x in runs["pdqkit_preimported"])
        w_r = min(x["work_s"] for x in runs["llmcompressor"])
        results["work_only"] = {"pdqkit_s": w_p, "llmcompressor_s": w_r, "speedup": round(w_r / w_p, 2),
                                "pdqkit_imports_s": min(x["imports_s"] for x in runs["pdqkit_preimported"]),
                                "llmcompressor_imports_s": min(x["imports_s"] for x in runs["llmcompressor"])}
        print("\n| tool | wall s (best of %d) | CPU s (user+sys) | peak RSS GiB (max) |\n| --- | --- | --- | --- |"
              % args.repeats)
        for k, v in best.items():
            print(f"| {k} | {v['wall_s']} | {v['cpu_s']} | {v['peak_rss_gib']} |")
        print(f"speedup, cold caches (a first run): {results['speedup']}x (eager; fp32div "
              f"{results['speedup_fp32div']}x; "
              f"CPU time {results['cpu_ratio']}x less), peak RSS "
              f"{results['rss_ratio']:.3f} of llmcompressor's, model.safetensors identical (eager): "
              f"{results['identical_model_safetensors']}")
        print(f"speedup, warm caches (a repeat run): {results['speedup_warm']}x (eager; fp32div "
              f"{results['speedup_fp32div_warm']}x), peak RSS {results['rss_ratio_warm']:.3f} of llmcompressor's, "
              f"model.safetensors identical (eager): {results['identical_model_safetensors_warm']}")
        w = results["work_only"]
        print(f"without imports: pdqkit {w['pdqkit_s']} s vs llmcompressor {w['llmcompressor_s']} s of work after "
              f"the imports ({w['pdqkit_imports_s']} s / {w['llmcompressor_imports_s']} s of imports): "
              f"{w['speedup']}x")
    out = args.work / "bench_quantize.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
