"""Oracle: quantize a bf16 checkpoint with llmcompressor's ``oneshot`` (W4A16 g128 recipe R, spec §5).

Runs ONLY in the isolated oracle venv (``.oracle-venv``: llmcompressor 0.14.0.1, compressed-tensors 0.19.0,
transformers 5.17.0, CPU torch); pdqkit never imports llmcompressor. The test suite starts this script as a
subprocess with the interpreter named by ``PDQKIT_ORACLE_PYTHON``; bench/bench_quantize.py times it.

    python tests/oracle/llmc_oneshot.py BASE_DIR OUT_DIR [--ignore PATTERN ...]
    python tests/oracle/llmc_oneshot.py BASE_DIR --jobs JOBS.json   # [{"out": DIR, "ignore": [...]}, ...]

``--jobs`` runs several recipes in one process (the model is reloaded for each; imports are paid once); a job
without ``"ignore"`` uses this script's own copy of recipe R's list (as no ``--ignore`` does), not pdqkit's.
On CPU llmcompressor can only produce the "eager" rounding mode (spec §1.3). Prints one JSON line with
the wall time (from before the imports to the end of the last job; ``imports_s`` + ``work_s``) and peak RSS of
this process.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# recipe R's default ignore list (spec pack-quantized.md, "The recipe this spec targets"), copied from the spec
# here rather than imported from pack.qconfig, so that the default-ignore oracle case checks pdqkit's own list too
DEFAULT_IGNORE = ["re:.*vision_tower.*", "re:.*audio_tower.*", "re:.*per_layer_input_gate.*",
                  "re:.*per_layer_projection.*", "re:.*embed_vision.*", "re:.*embed_audio.*", "lm_head"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--ignore", nargs="*", default=DEFAULT_IGNORE)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--jobs", help="JSON file: a list of {\"out\": dir, \"ignore\": [patterns]}")
    args = ap.parse_args(argv)
    if args.jobs:
        with open(args.jobs) as fh:
            jobs = json.load(fh)
    elif args.out:
        jobs = [{"out": args.out, "ignore": args.ignore}]
    else:
        ap.error("give OUT or --jobs")
    for job in jobs:
        job.setdefault("ignore", DEFAULT_IGNORE)

    t0 = time.perf_counter()
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    t_imported = time.perf_counter()  # bench_quantize reports the work after the imports separately
    with open(os.path.join(args.base, "config.json")) as fh:
        arch = json.load(fh)["architectures"][0]
    for job in jobs:
        model = getattr(transformers, arch).from_pretrained(args.base, dtype=torch.bfloat16)
        recipe = QuantizationModifier(
            config_groups={"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": args.group_size, "observer": "minmax", "actorder": None,
                            "dynamic": False},
                "input_activations": None, "output_activations": None}},
            ignore=list(job["ignore"]))
        oneshot(model=model, recipe=recipe, output_dir=job["out"])
        del model
    t_end = time.perf_counter()
    wall = t_end - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall_s": wall, "imports_s": t_imported - t0, "work_s": t_end - t_imported,
                      "peak_rss_bytes": peak, "llmcompressor": _version("llmcompressor"),
                      "compressed_tensors": _version("compressed_tensors"), "torch": torch.__version__}))
    return 0


def _version(mod: str) -> str:
    from importlib.metadata import version

    return version(mod.replace("_", "-"))


if __name__ == "__main__":
    sys.exit(main())
