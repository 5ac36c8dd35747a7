"""Train a bench base model from scratch on the bench corpus.

``python -m bench.train --scale small|micro -o OUT [--steps --batch --seq-len --lr --device --seed ...]``

* Model: :func:`bench.factory.build_model` (Gemma-4, E4B topology) in fp32 — the AdamW master weights —
  with ``attn_implementation="sdpa"``; on CUDA the forward/backward runs under bf16 autocast, with fused
  AdamW and TF32 for the remaining fp32 matmuls; ``--compile`` wraps the model in ``torch.compile``
  (compile time counts against the time budget).
* Data: the corpus train split (:mod:`bench.corpus`) tokenized by the scale's bench tokenizer, packed
  into fixed ``seq_len`` windows across document boundaries, sampled by a seeded permutation per epoch.
* Schedule: AdamW (β 0.9/0.95, weight decay on matrices except the embedding tables), linear warmup then
  cosine decay to ``min_lr_ratio``·lr, gradient clipping at 1.0. ``--time-budget S`` (default 280 s for
  ``small``) shortens the run when, measured after the first steps, it would not finish in S seconds: the
  cosine is re-planned for the steps that fit, and the steps actually run are recorded.
* Output: a bf16 checkpoint (:func:`pack.checkpoint.save_bf16_checkpoint`) with the tokenizer and a
  ``base`` lineage step (recipe, tokens seen, corpus/tokenizer hashes, final losses, validation and
  unigram-baseline perplexity), plus ``train_log.json`` (loss curve, validation curve, tokens/s).
* Determinism: on CPU the same arguments without ``--time-budget`` give the same weight bytes (deterministic
  algorithms; ``torch.manual_seed(seed)`` for the init, a separate seeded generator for the data order); a time
  budget cuts the run at a step count that depends on the measured speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["TrainConfig", "DEFAULTS", "TEST_MICRO", "train", "trained_micro_checkpoint", "main"]

DEFAULTS = {
    # micro: CPU, ~30 s on 2 idle cores (123k tokens); smoke runs and the test suite's model
    "micro": dict(steps=120, batch=8, seq_len=128, lr=3e-3, warmup=12, eval_every=40, eval_tokens=8192),
    # small: one H200, bf16 autocast: 600 × 64 × 1024 = 39M tokens ≈ 4 epochs of the 9.9M-token train split
    "small": dict(steps=600, batch=64, seq_len=1024, lr=2e-3, warmup=60, eval_every=100, eval_tokens=131072,
                  time_budget=280.0),
}


@dataclass
class TrainConfig:
    scale: str = "micro"
    steps: int = 120
    batch: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 12
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    compile: bool = False
    eval_every: int = 40
    eval_tokens: int = 8192
    train_tokens: int | None = None  # train on the split's first N tokens only (tests); None = all
    time_budget: float | None = None  # seconds for the training loop; None = no limit
    log_every: int = 10
    unigram: bool = True  # compute the unigram baseline (encodes the whole train split once)
    mlp_width: int | None = None  # MLP intermediate size (None: the scale's); e.g. the pruned width, from scratch

    def __post_init__(self):
        from bench.tokenizer import TOKENIZER_SCALES

        if self.scale not in TOKENIZER_SCALES:
            raise ValueError(f"--scale {self.scale!r}: trainable scales are {TOKENIZER_SCALES}")
        for k in ("steps", "batch", "seq_len", "eval_tokens", "log_every", "eval_every"):
            if getattr(self, k) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(self, k)}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"--warmup must be in [0, steps), got {self.warmup}")
        if self.mlp_width is not None and self.mlp_width <= 0:
            raise ValueError(f"--mlp-width must be positive, got {self.mlp_width}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--lr must be positive and --min-lr-ratio in [0, 1]")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu")

    @classmethod
    def for_scale(cls, scale: str, **overrides) -> "TrainConfig":
        kw = dict(DEFAULTS.get(scale, {}))
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(scale=scale, **kw)


class _Schedule:
    """lr factor: linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def train(cfg: TrainConfig, out, force: bool = False, log=print) -> dict:
    """Train per ``cfg``, save the checkpoint to ``out``; returns the training log dict (``train_log.json``).

    On CPU, torch's deterministic-algorithms mode is on during the run (restored afterwards)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, out, force, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg: TrainConfig, out, force: bool, log) -> dict:
    from bench import corpus
    from bench.cache import write_json_atomic
    from bench.eval import eval_windows, evaluate_model, unigram_counts, unigram_perplexity
    from bench.factory import build_model, num_params
    from bench.tokenizer import get_tokenizer, vocab_sha256
    from pack.checkpoint import lineage_step, save_bf16_checkpoint

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output directory exists; pass --force to overwrite it")
    if force:
        from pack.checkpoint import check_replaceable

        check_replaceable(out)   # before training, not when the model is written
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.use_deterministic_algorithms(True)

    tok = get_tokenizer(cfg.scale)
    stream_len = len(corpus.token_stream("train", tok, cfg.train_tokens))
    seqs = corpus.packed_sequences("train", tok, cfg.seq_len, cfg.train_tokens).to(device)
    if len(seqs) < cfg.batch:  # a batch would silently shrink, and tokens_seen (steps x batch x seq_len) overstate
        raise ValueError(f"--train-tokens {cfg.train_tokens}: {len(seqs)} windows of {cfg.seq_len} tokens, fewer "
                         f"than one --batch of {cfg.batch}; raise --train-tokens or lower --batch")
    valid = eval_windows(tok, cfg.seq_len, cfg.eval_tokens)
    log(f"train split: {len(seqs)} windows × {cfg.seq_len} = {seqs.numel():,} tokens "
        f"(corpus {corpus.corpus_sha256()[:12]}, tokenizer v{len(tok)}); valid: {valid.numel():,} tokens")

    width = {"intermediate_size": cfg.mlp_width} if cfg.mlp_width else {}
    model = build_model(cfg.scale, seed=cfg.seed, dtype=torch.float32, device=device, **width)
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    model.train()
    n_params = num_params(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2),
                            eps=1e-8, fused=cuda)
    sched = _Schedule(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    fwd = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def loss_of(x):
        with autocast:
            logits = fwd(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    def valid_loss():
        model.eval()
        with autocast:
            r = evaluate_model(model, valid, batch_size=max(1, cfg.batch // 2), device=device)
        model.train()
        return r["nll"] / r["tokens"]

    g = torch.Generator().manual_seed(cfg.seed)
    perm, pos = torch.randperm(len(seqs), generator=g), 0
    losses, curve, vcurve = torch.zeros(cfg.steps, device=device), [], []
    steps_planned, total = cfg.steps, cfg.steps
    first = max(1, min(cfg.warmup, 10))
    probe = (first, first + 10)  # steps 10..20 are timed to project the run's length (after CUDA warm-up)
    log(f"model {cfg.scale}: {n_params / 1e6:.1f}M params; {total} steps × {cfg.batch} × {cfg.seq_len} "
        f"tokens; lr {cfg.lr} (warmup {cfg.warmup}, cosine to {cfg.min_lr_ratio:g}×) on {device}")
    _sync(device)
    t_start = t_log = time.perf_counter()
    t_probe = None
    step = logged = 0
    while step < total:
        if pos + cfg.batch > len(perm):
            perm, pos = torch.randperm(len(seqs), generator=g), 0
        x = seqs[perm[pos:pos + cfg.batch].to(device)]
        pos += cfg.batch
        lr_now = cfg.lr * sched(step)  # what this step runs at (a re-plan below changes later steps only)
        for group in opt.param_groups:
            group["lr"] = lr_now
        loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
        step += 1
        if cfg.time_budget and step in probe:
            _sync(device)
            if step == probe[0]:
                t_probe = time.perf_counter()
            else:
                per_step = (time.perf_counter() - t_probe) / (probe[1] - probe[0])
                left = cfg.time_budget - (time.perf_counter() - t_start)
                fit = step + int(left / per_step)
                if fit < total:
                    total = max(step + 1, fit)
                    sched.total = total
                    # the warm-up shrinks with the run (never below the steps already taken), so a short run
                    # still decays instead of ending mid-warm-up
                    sched.warmup = min(sched.warmup, max(step, cfg.warmup * total // cfg.steps))
                    log(f"time budget {cfg.time_budget:.0f}s: {per_step * 1e3:.0f} ms/step, shortening the run "
                        f"to {total} steps (warmup {sched.warmup})")
        if step % cfg.log_every == 0 or step == total:
            lv, logged = losses[logged:step].tolist(), step
            now = time.perf_counter()
            tps = len(lv) * cfg.batch * cfg.seq_len / (now - t_log)
            t_log = now
            curve.extend([s, v] for s, v in zip(range(step - len(lv) + 1, step + 1), lv))
            log(f"step {step:5d}/{total}  loss {lv[-1]:.4f}  lr {lr_now:.2e}  "
                f"{tps:,.0f} tok/s")
        if step % cfg.eval_every == 0 or step == total:
            vl = valid_loss()
            vcurve.append([step, vl])
            log(f"step {step:5d}  valid loss {vl:.4f}  ppl {math.exp(vl):.2f}")
    _sync(device)
    train_s = time.perf_counter() - t_start
    tokens_seen = total * cfg.batch * cfg.seq_len
    log(f"trained {total} steps, {tokens_seen:,} tokens in {train_s:.1f}s (periodic validation included): "
        f"{tokens_seen / train_s:,.0f} tok/s")

    final = {"train_loss": float(sum(v for _, v in curve[-10:]) / len(curve[-10:])),
             "valid_loss": vcurve[-1][1], "valid_ppl": math.exp(vcurve[-1][1]),
             "valid_tokens": valid.numel() - len(valid)}
    if cfg.unigram:
        counts = unigram_counts(corpus.token_stream("train", tok, cfg.train_tokens), len(tok))
        final["unigram_ppl"] = unigram_perplexity(counts, valid)
        log(f"valid ppl {final['valid_ppl']:.2f} vs unigram baseline {final['unigram_ppl']:.2f}")
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("log_every", "unigram")}
    recipe.update(steps=total, steps_planned=steps_planned, warmup=sched.warmup)
    name = f"pdqkit-bench/{cfg.scale}" + (f"-mlp{cfg.mlp_width}" if cfg.mlp_width else "")
    step_info = lineage_step(
        "base", model=name, init="trained", seed=cfg.seed, recipe=recipe,
        tokens_seen=tokens_seen, params=n_params,
        data={"corpus": f"{corpus.SOURCE}=={corpus.SOURCE_VERSION} sources (bench.corpus)",
              "corpus_sha256": corpus.corpus_sha256(), "split": "train", "train_stream_tokens": stream_len,
              "tokenizer_vocab_sha256": vocab_sha256(tok)},
        final=final)
    model.config.use_cache = True
    model.eval()
    save_bf16_checkpoint(model, out, step=step_info, tokenizer=tok, force=force)
    result = {"schema": "pdqkit_bench_train/1", "config": dataclasses.asdict(cfg), "steps": total,
              "steps_planned": steps_planned, "tokens_seen": tokens_seen, "train_seconds": train_s,
              "tokens_per_s": tokens_seen / train_s, "params": n_params, "loss_curve": curve,
              "valid_curve": vcurve, "final": final, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
    write_json_atomic(result, out / "train_log.json")
    log(f"saved {out}")
    return result


# The test suite's trained micro model: ~40k tokens from the first 256k of the train split (encoding only
# those), no unigram pass; ~10-20 s on 2 CPU cores, then cached.
TEST_MICRO = dict(scale="micro", steps=40, batch=8, seq_len=128, lr=3e-3, warmup=8, eval_every=20,
                  eval_tokens=4096, train_tokens=262144, unigram=False, log_every=10)


def trained_micro_checkpoint(**overrides) -> Path:
    """A trained ``micro`` checkpoint (``TEST_MICRO`` + ``overrides``) from the bench cache, trained on first use.

    The cache key covers the config, the corpus and tokenizer hashes, torch's and transformers' versions (the
    Gemma-4 modelling code trains it) and the sources of the trainer, the model factory, the corpus and tokenizer
    code (how text becomes the token stream, which special tokens the checkpoint's tokenizer gets), the evaluator
    and the checkpoint writer, so a change to any of them retrains."""
    import transformers

    from bench import corpus
    from bench.cache import cached_dir, sha256_text
    from bench.tokenizer import get_tokenizer, vocab_sha256

    cfg = TrainConfig(**{**TEST_MICRO, **overrides})
    repo = Path(__file__).parents[1]  # what the checkpoint and its lineage are made by
    sources = [(repo / f).read_text() for f in ("bench/train.py", "bench/factory.py", "bench/corpus.py",
                                                 "bench/tokenizer.py", "bench/eval.py", "pack/checkpoint.py")]
    key = sha256_text(json.dumps(dataclasses.asdict(cfg), sort_keys=True), corpus.corpus_sha256(),
                      vocab_sha256(get_tokenizer(cfg.scale)), torch.__version__, transformers.__version__,
                      *sources)[:16]
    d = cached_dir(f"trained-micro-{key}", lambda tmp: train(cfg, tmp / "ckpt", log=lambda *a: None))
    return d / "ckpt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=["micro", "small"], default="micro")
    ap.add_argument("-o", "--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--min-lr-ratio", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (compile time counts)")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-tokens", type=int, help="validation tokens for the curve and the final ppl")
    ap.add_argument("--train-tokens", type=int, help="train on the first N tokens of the split only")
    ap.add_argument("--time-budget", type=float, help="seconds for the training loop (0: no limit)")
    ap.add_argument("--mlp-width", type=int, help="MLP intermediate size (default: the scale's), e.g. a pruned "
                    "student's width trained from scratch as a control")
    ap.add_argument("--no-unigram", action="store_true", help="skip the unigram baseline")
    ap.add_argument("--log-json", metavar="FILE", help="also write train_log.json here")
    ap.add_argument("--force", action="store_true", help="overwrite OUT")
    a = ap.parse_args(argv)
    from bench.corpus import CorpusError

    try:
        cfg = TrainConfig.for_scale(
            a.scale, steps=a.steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr, warmup=a.warmup,
            min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay, seed=a.seed, device=a.device,
            compile=a.compile or None, eval_every=a.eval_every, eval_tokens=a.eval_tokens,
            train_tokens=a.train_tokens, time_budget=a.time_budget, unigram=False if a.no_unigram else None,
            mlp_width=a.mlp_width)
        if a.time_budget == 0:
            cfg.time_budget = None
        result = train(cfg, a.out, force=a.force)
    except (ValueError, FileExistsError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.log_json:
        Path(a.log_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.log_json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
