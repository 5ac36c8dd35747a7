"""``python -m pack.quantize CKPT``: bf16 HF checkpoint -> W4A16 compressed-tensors pack-quantized checkpoint.

Byte-identical to llmcompressor's ``oneshot`` with the W4A16 group-128 min-max recipe (``--rounding fp32div``:
its CUDA run; ``--rounding eager``: its CPU run), streamed shard by shard (one tensor in memory at a time).
``--demo`` builds a tiny random multimodal Gemma-4 checkpoint (no download) and quantizes it.
Expected errors print one line (file/tensor + fix) and exit 2, leaving nothing behind.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from .errors import QuantizeError
from .gcpause import gc_paused
from .stopsignals import interrupted_message, stop_signals_interrupt

DEMO_DIR = Path("out")


def build_parser() -> argparse.ArgumentParser:
    # torch-free: the input files start hashing before torch is imported
    from .qconfig import DEFAULT_IGNORE, ROUNDING_MODES

    ap = argparse.ArgumentParser(
        prog="python -m pack.quantize",
        description="Quantize a bf16 Hugging Face checkpoint to W4A16 (int4 weights, symmetric min-max, "
                    "group 128) as a compressed-tensors pack-quantized checkpoint that HF Transformers and vLLM "
                    "load unmodified; byte-identical to llmcompressor oneshot with the same recipe.",
        epilog="Example: python -m pack.quantize google-gemma-4-E4B-it -o gemma-4-E4B-it-w4a16")
    ap.add_argument("ckpt", nargs="?", type=Path, help="input checkpoint dir (config.json + *.safetensors)")
    ap.add_argument("-o", "--out", type=Path, help="output dir (default: CKPT-w4a16 next to CKPT)")
    ap.add_argument("--group-size", type=int, default=128, help="quantization group along K (default 128; "
                    "-1 = one scale per output channel)")
    ap.add_argument("--ignore", nargs="+", metavar="PATTERN", default=list(DEFAULT_IGNORE),
                    help="modules left in bf16: exact module names or 're:' regexes (Python re.match on the "
                    "module name); REPLACES the default list: %(default)s")
    ap.add_argument("--extra-ignore", nargs="+", metavar="PATTERN", default=[],
                    help="more modules to leave in bf16, added to --ignore (same syntax)")
    ap.add_argument("--rounding", choices=ROUNDING_MODES, default="fp32div",
                    help="fp32div (default) = llmcompressor 0.14 on CUDA; eager = llmcompressor on CPU / "
                    "CT_ENFORCE_EAGER=1 / llmcompressor <= 0.12")
    ap.add_argument("--device", default="cpu", help="where the observer runs: cpu or cuda (same bytes)")
    ap.add_argument("--max-shard-size", default="20GB", help="largest output file (default 20GB, like "
                    "llmcompressor: a single model.safetensors up to that size)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--no-plan-cache", action="store_true",
                    help="plan afresh (import transformers and compressed-tensors, ~1.5 s) and store nothing; by "
                    "default the model plan is kept in $PDQKIT_PLAN_CACHE, else $PDQKIT_CACHE/plans "
                    "(~/.cache/pdqkit/plans), under a key of config.json, the recipe and the library versions "
                    "and sources")
    ap.add_argument("--no-hash-cache", action="store_true",
                    help="hash every input file for the lineage (~1 s per 2 GB) and store nothing; by default the "
                    "sha256 of an unchanged file is taken from $PDQKIT_HASH_CACHE, else $PDQKIT_CACHE/hashes "
                    "(~/.cache/pdqkit/hashes), under a key of its path, inode, size and times")
    ap.add_argument("--no-fsync", action="store_true",
                    help="do not wait for the output to reach the disk before renaming it into place (by default "
                    "every file and the rename are fsynced, so that a crash or power loss just after the run cannot "
                    "leave a complete-looking checkpoint with unwritten blocks; the disk writes start while the "
                    "files are streamed, so the wait at the end is short); the bytes written are the same")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--demo", nargs="?", const="micro", choices=("micro", "small"), metavar="SCALE",
                    help="build a random multimodal Gemma-4 checkpoint of SCALE (micro|small, default micro; "
                    "no download) under ./out and quantize it")
    return ap


def _demo_base(scale: str) -> Path:
    """The demo's bf16 input: a random multimodal Gemma-4 of ``scale`` (seed 0), built once and reused."""
    from bench.factory import save_random_checkpoint

    base = DEMO_DIR / f"demo-{scale}-mm-bf16"
    if not (base / "config.json").is_file():
        print(f"building a random multimodal Gemma-4 '{scale}' checkpoint at {base} ...", file=sys.stderr)
        save_random_checkpoint(scale, base, multimodal=True, seed=0, force=True)
    return base


def main(argv: list[str] | None = None) -> int:
    with gc_paused():  # the whole run: imports and meta model are ~10^6 long-lived objects (pack/gcpause.py)
        return _main(argv)


def _prefetch_hashes(ckpt: Path | None, use_cache: bool):
    """Start hashing ``ckpt``'s safetensors files now, on another core, while this one imports torch and
    transformers (~2 s); None when ``ckpt`` is not a checkpoint dir (the real checks report that, in order).
    ``use_cache``: take unchanged files' hashes from pack.hashcache."""
    from .checkpoint import FileHasher, safetensors_files

    if ckpt is None or not (ckpt / "config.json").is_file():
        return None
    try:
        files, _ = safetensors_files(ckpt)
    except QuantizeError:
        return None
    return FileHasher(files, use_cache=use_cache)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # resolved as the writer resolves it, so that the writer takes this hasher instead of starting another
    hasher = None if args.demo or args.ckpt is None else _prefetch_hashes(args.ckpt.resolve(),
                                                                           not args.no_hash_cache)
    try:
        with stop_signals_interrupt() as interrupted:   # SIGTERM cleans up like Ctrl-C (pack/stopsignals.py)
            return _run(args, hasher, interrupted)
    finally:
        if hasher is not None:
            hasher.close()  # a no-op once quantize_checkpoint has closed it; stops it on an early error


def _run(args: argparse.Namespace, hasher, interrupted) -> int:
    try:
        from .qconfig import QuantRecipe
        from .writer import quantize_checkpoint  # imports torch

        force = args.force
        if args.demo:
            if args.ckpt is not None:
                raise QuantizeError("--demo builds its own input checkpoint: drop CKPT or drop --demo")
            args.ckpt = _demo_base(args.demo)
            if args.out is None:
                args.out, force = DEMO_DIR / f"demo-{args.demo}-mm-w4a16", True
        if args.ckpt is None:
            swallowed = [x for x in (*args.ignore, *args.extra_ignore) if (Path(x) / "config.json").is_file()]
            hint = (f"; {swallowed[0]} was read as an --ignore pattern: put CKPT before --ignore/--extra-ignore"
                    if swallowed else "")
            raise QuantizeError(f"no input checkpoint: pass CKPT (a Hugging Face checkpoint dir) or --demo{hint}")
        out = args.out or args.ckpt.resolve().parent / f"{args.ckpt.resolve().name}-w4a16"
        recipe = QuantRecipe(ignore=(*args.ignore, *args.extra_ignore), group_size=args.group_size, rounding=args.rounding)
        result = quantize_checkpoint(args.ckpt, out, recipe, device=args.device, force=force,
                                     max_shard_size=args.max_shard_size, progress=not args.no_progress,
                                     input_hasher=hasher, plan_cache=not args.no_plan_cache,
                                     hash_cache=not args.no_hash_cache, fsync=not args.no_fsync)
    except BaseException as e:
        from .checkpoint import InterruptedAfterCommit, OutputAppeared, UnsyncedAfterCommit

        if isinstance(e, InterruptedAfterCommit):   # the output is complete: say so, not "nothing was written"
            print(f"error: interrupted: {e}", file=sys.stderr)
            return 130
        if isinstance(e, UnsyncedAfterCommit):      # likewise
            print(f"error: {e.strerror}", file=sys.stderr)
            return 1
        if isinstance(e, KeyboardInterrupt) or interrupted.is_set():  # whatever the signal turned into
            print(f"error: {interrupted_message(e)}", file=sys.stderr)
            return 130
        if isinstance(e, QuantizeError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OutputAppeared):   # like the output dir found at the start: the invocation, not the machine
            print(f"error: {e.strerror}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):  # the machine, not the input: disk full, permission denied, a dir for a file
            print(f"error: {e}; nothing was written", file=sys.stderr)
            return 1
        raise
    print(result.summary())
    return 0


def cli() -> None:
    """The command (``python -m pack.quantize`` and the ``pdq-quantize`` script): :func:`main`, then a fast exit.

    The collector stays off for good (main()'s gc_paused then leaves it off): objects allocated while it is
    paused all sit in the youngest generation, so the first collection after re-enabling it would traverse the
    ~10^6 objects of torch and transformers (measured: 0.24 s, after the work is done)."""
    gc.disable()
    rc = main()
    # Leave without the interpreter's teardown: a last full garbage collection over the ~10^6 objects of torch and
    # transformers and their finalizers cost ~0.9 s, a fifth of a 1B-parameter run. Nothing is pending: every
    # output file is closed and renamed, the worker threads are joined; only stdout/stderr need a flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    cli()
