"""``python -m distill --teacher T --student S -o OUT --phase 1|2``: recover a pruned student from its teacher.

Runs as one process (``--device cpu|cuda``) or under ``torchrun --nproc-per-node N`` (FSDP2-sharded student,
replicated frozen teacher). Writes a bf16 HF checkpoint with a ``distill`` lineage step.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import LOSS_IMPLS, PHASE_DEFAULTS, PRECISIONS, TRAINABLE, DistillConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"distill: error: {message}", file=sys.stderr)
        sys.exit(2)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig.__dataclass_fields__
    p1, p2 = PHASE_DEFAULTS[1], PHASE_DEFAULTS[2]

    def dflt(name):
        return d[name].default

    def per_phase(name):
        return f"(default phase 1: {p1[name]}, phase 2: {p2[name]})"

    ap = _Parser(prog="python -m distill", description=__doc__.split(": ", 1)[1].split("\n")[0].capitalize())
    g = ap.add_argument_group("what")
    g.add_argument("--teacher", required=True, metavar="T", help="unpruned teacher checkpoint dir (bf16 HF)")
    g.add_argument("--student", required=True, metavar="S", help="pruned student checkpoint dir (e.g. python -m prune)")
    g.add_argument("-o", "--out", required=True, metavar="OUT", help="output checkpoint dir")
    g.add_argument("--phase", type=int, choices=(1, 2), default=1,
                   help="1: forward KL + hidden-state matching; 2: on-policy GKD with generalized JSD (default 1)")
    g.add_argument("--data", metavar="FILE", default=None,
                   help="training text: .jsonl with {'text': ...} or {'input_ids': [...]} per line, or a text file "
                        "(default: the bench train split, bench.corpus.split_path('train'))")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="use only the first N tokens of the data (default: all); steps sample windows from them, "
                        "in a new random order each epoch")
    g.add_argument("--force", action="store_true", help="overwrite OUT (and discard old training checkpoints)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help=f"optimizer steps {per_phase('steps')}")
    g.add_argument("--batch", type=int, default=None,
                   help=f"global batch in sequences, split over ranks {per_phase('batch')}")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence {per_phase('seq_len')}")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate {per_phase('lr')}")
    g.add_argument("--min-lr-ratio", type=float, default=dflt("min_lr_ratio"),
                   help="cosine decay floor as a fraction of --lr (default %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 10%% of --steps)")
    g.add_argument("--adam-betas", type=_floats, default=list(dflt("adam_betas")), metavar="B1,B2",
                   help=f"AdamW betas (default {','.join(map(str, dflt('adam_betas')))})")
    g.add_argument("--adam-eps", type=float, default=dflt("adam_eps"), help="AdamW eps (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=dflt("weight_decay"), help="AdamW (default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=dflt("grad_clip"),
                   help="global grad-norm clip, 0 = off (default %(default)s)")
    g.add_argument("--ema-decay", type=float, default=dflt("ema_decay"),
                   help="write an exponential moving average of the weights instead of the last ones: after every "
                        "step ema = D * ema + (1 - D) * weights, starting from the student, whose weights keep a "
                        "share of D^steps (about 1 / (1 - D) steps are averaged once steps >> that; 0 = off, the "
                        "default; 4 more bytes per trained weight)")
    g.add_argument("--seed", type=int, default=dflt("seed"), help="data order and sampling seed (default 0)")
    g.add_argument("--train-embeddings", action="store_true",
                   help="also train the token / per-layer embedding tables and the lm_head (tied to the token "
                        "table in Gemma-4; untied in Llama); default frozen")
    g.add_argument("--trainable", choices=TRAINABLE, default=dflt("trainable"),
                   help="all: the whole language stack but its embedding tables (default); mlp: only the decoder "
                        "layers' MLP weights (what pruning changed)")
    g = ap.add_argument_group("phase 1 losses")
    g.add_argument("--temperature", type=float, default=dflt("temperature"),
                   help="KL temperature T (loss scaled by T^2) (default %(default)s)")
    g.add_argument("--ce-weight", type=float, default=dflt("ce_weight"),
                   help="weight of a cross-entropy term on the data's next tokens, added to the forward KL (0 = "
                        "off, the default: pure distillation). The student then also learns from the data where "
                        "it differs from the teacher; each sequence's last position has no label")
    g.add_argument("--hidden-weight", type=float, default=None,
                   help=f"weight of the hidden-state matching term, 0 = off {per_phase('hidden_weight')}")
    g.add_argument("--hidden-layers", type=_ints, default=None, metavar="I,J,...",
                   help="decoder layers whose outputs are matched (default: all)")
    g.add_argument("--hidden-layer-weights", type=_floats, default=None, metavar="W,W,...",
                   help="relative weight per --hidden-layers entry (normalised to sum 1; default uniform)")
    g = ap.add_argument_group("phase 2 (GKD; TRL GKDConfig defaults)")
    g.add_argument("--lmbda", type=float, default=dflt("lmbda"),
                   help="probability that a step's continuations are sampled from the student (default %(default)s)")
    g.add_argument("--beta", type=float, default=dflt("beta"),
                   help="generalized JSD beta: 0 = forward KL, 1 = reverse KL (default %(default)s)")
    g.add_argument("--sample-temperature", type=float, default=dflt("sample_temperature"),
                   help="student sampling temperature (default %(default)s)")
    g.add_argument("--jsd-temperature", type=float, default=dflt("jsd_temperature"),
                   help="temperature of the logits inside the JSD, no T^2 factor (TRL) (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=dflt("max_new_tokens"),
                   help="continuation length; the prompt is the first seq-len - this tokens (default %(default)s)")
    g = ap.add_argument_group("execution")
    g.add_argument("--device", default=dflt("device"), help="auto, cpu, cuda, cuda:N (default auto)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16-mixed: fp32 weights, bf16 autocast compute (default on cuda); bf16-master: bf16 "
                        "weights and compute, AdamW on fp32 master copies (one process only); fp32 (default on cpu)")
    g.add_argument("--chunk", type=int, default=dflt("chunk"),
                   help="tokens per chunk of the vocab-sized logit loss (default %(default)s)")
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the student's layers")
    g.add_argument("--ckpt-layers", type=int, default=None, metavar="N",
                   help="with --grad-ckpt: checkpoint only the first N decoder layers (default all)")
    g.add_argument("--attn", default=dflt("attn"),
                   help="attention implementation: sdpa (default), pdq_hybrid (flex sliding window, GPU), eager")
    g.add_argument("--loss-impl", choices=LOSS_IMPLS, default=dflt("loss_impl"),
                   help="logit-loss gradient: autograd (default) or fused (hand-written forward-KL gradient)")
    g.add_argument("--compile-loss", action="store_true",
                   help="torch.compile the logit loss's chunk math and the hidden-state term (with its gradient)")
    g.add_argument("--compile-layers", action="store_true",
                   help="torch.compile every decoder layer of teacher and student (phase 1)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (torch.use_deterministic_algorithms, a fixed cuBLAS workspace, "
                        "Inductor's deterministic mode): a CUDA run, and a kill -9 + --resume of it, writes the same "
                        "bytes every time (CPU runs always do)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g = ap.add_argument_group("checkpoints and logs")
    g.add_argument("--ckpt-every", type=int, default=0, metavar="N",
                   help="save a training checkpoint every N steps (default 0: only when Ctrl-C or SIGTERM stops "
                        "the run, after the step it runs: exit 130, then --resume continues)")
    g.add_argument("--ckpt-dir", default=None, help="where training checkpoints go (default OUT-ckpt)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --ckpt-dir")
    g.add_argument("--keep-ckpt", action="store_true", help="keep --ckpt-dir after a successful run")
    g.add_argument("--log-every", type=int, default=dflt("log_every"), help="console line every N steps (default 10)")
    g.add_argument("--log-json", default=None, metavar="FILE", help="also write every step as JSON lines to FILE")
    g.add_argument("--peak-tflops", type=float, default=dflt("peak_tflops"),
                   help="per-GPU dense bf16 peak used for MFU (default %(default)s: H100/H200 SXM)")
    return ap


def config_from_args(args) -> DistillConfig:
    kw = {k: v for k, v in vars(args).items()}
    return DistillConfig(**kw)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    from pack.stopsignals import report_failure, stop_signals_interrupt

    from .state import latest_checkpoint
    from .stop import TrainingStopped
    from .train import run

    main_rank = os.environ.get("RANK", "0") == "0"   # (under torchrun, one rank says it)
    # SIGINT / SIGTERM: during the training steps, finish the step and write a training checkpoint (distill/stop.py);
    # before and after them (loading, writing the output), stop at once, leaving nothing half-written
    with stop_signals_interrupt() as interrupted:
        try:
            run(cfg)
        except TrainingStopped as e:
            if main_rank:
                print(f"distill: {e}", file=sys.stderr)
            return 130
        except BaseException as e:   # one line and the exit status (pack.stopsignals.report_failure), or a bug's
            def newest() -> str:     # traceback; an interruption names the checkpoint --resume would continue from
                ck = latest_checkpoint(cfg.ckpt_dir) if os.path.isdir(cfg.ckpt_dir) else None
                return f"; the newest training checkpoint is {ck}: --resume continues from it" if ck else ""

            stopped = isinstance(e, KeyboardInterrupt) or interrupted.is_set()
            rc = report_failure("distill", e, interrupted, (ValueError, OSError), say=main_rank or not stopped,
                                then=newest)
            if rc is None:
                raise
            return rc
    return 0


if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun the process group is destroyed by now (distill.parallel.shutdown) and every output is
        # written and closed, but the interpreter's teardown can still meet a gloo/NCCL thread the destroy left
        # joinable and abort the rank ("terminate called without an active exception", seen once on CPU/gloo
        # after a complete run). Leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
