"""``python -m prune CKPT -o OUT``: calibrated structural pruning of the language stack's MLP width."""
from __future__ import annotations

import argparse
import sys

from .config import AGGREGATIONS, CRITERIA, PruneConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"prune: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    d = PruneConfig()
    ap = _Parser(prog="python -m prune", description=__doc__.split(": ", 1)[1])
    ap.add_argument("ckpt", metavar="CKPT", help="input HF checkpoint directory (Gemma-4 text-only or "
                                                  "multimodal, or Llama)")
    ap.add_argument("-o", "--out", required=True, metavar="OUT", help="output checkpoint directory")
    ap.add_argument("--ratio", type=float, default=d.ratio,
                    help=f"fraction of MLP channels to remove, in [0, 1); the kept width is rounded to a multiple "
                         f"of 128; 0 keeps every channel (identity run) (default {d.ratio})")
    ap.add_argument("--criterion", choices=CRITERIA, default=d.criterion,
                    help=f"channel importance (default {d.criterion}); taylor runs the whole model forward and "
                         "backward on --device once per calibration batch (prune/taylor.py); magnitude and random "
                         "need no data")
    ap.add_argument("--agg", dest="aggregation", choices=AGGREGATIONS, default=d.aggregation,
                    help=f"reduction of a channel's activations over calibration tokens, or for taylor of its loss "
                         f"changes over calibration windows: l2 = sqrt(sum x^2), mean = mean |x| (default "
                         f"{d.aggregation})")
    ap.add_argument("--calib", metavar="FILE", default=None,
                    help="calibration text: .jsonl with a 'text' field per line, or a plain text file, or "
                         "bench:train for the bench corpus train split (what the bench teacher was trained on) "
                         "(default: bench:calib, the bench corpus calib split, bench.corpus.split_path('calib'))")
    ap.add_argument("--samples", type=int, default=d.samples, help=f"calibration windows (default {d.samples})")
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    ap.add_argument("--batch-size", type=int, default=d.batch_size,
                    help=f"windows per forward call (default {d.batch_size})")
    ap.add_argument("--device", default=d.device, help="where calibration runs: cpu, cuda, cuda:N (default cpu)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the random criterion (default 0)")
    ap.add_argument("--refit", action="store_true",
                    help="after slicing, refit each layer's kept down_proj columns by least squares to reproduce "
                         "the unpruned down_proj output on the calibration tokens (calibrates with any "
                         "criterion). Costs one float64 I x I Gram matrix on --device, one layer at a time "
                         "(E4B, I=10240: 0.84 GB; double-wide layers 3.4 GB) and about 2.6 times that at the peak of "
                         "its Cholesky solve (E4B about 2.2 GB, double-wide layers about 8.7 GB)")
    ap.add_argument("--refit-damp", type=float, default=d.refit_damp,
                    help=f"ridge damping of --refit relative to the mean diagonal of the kept channels' Gram "
                         f"matrix, > 0; pulls the refit towards plain slicing (default {d.refit_damp})")
    ap.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .run import prune_checkpoint

    if args.no_progress:  # transformers' own bars too (loading / writing the model)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    from pack.stopsignals import report_failure, stop_signals_interrupt

    # SIGTERM (a timeout, Slurm, docker stop) cleans up like Ctrl-C: no temp dir left, one line, exit 130
    with stop_signals_interrupt() as interrupted:
        try:
            cfg = PruneConfig(ratio=args.ratio, criterion=args.criterion, aggregation=args.aggregation,
                              calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                              batch_size=args.batch_size, device=args.device, seed=args.seed, refit=args.refit,
                              refit_damp=args.refit_damp)
            result = prune_checkpoint(args.ckpt, args.out, cfg, force=args.force, progress=not args.no_progress)
        except BaseException as e:   # one line and the exit status (pack.stopsignals.report_failure), or a bug's
            rc = report_failure("prune", e, interrupted, (ValueError, OSError, RuntimeError))   # traceback
            if rc is None:
                raise
            return rc
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
