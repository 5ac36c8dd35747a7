"""Quality harness: perplexity, KL to a teacher and greedy agreement on the bench validation split.

``python -m bench.eval CKPT [CKPT ...] [--teacher CKPT] [--device cpu|cuda] [--json FILE] [--max-tokens N]``

Every checkpoint is loaded the normal HF way, ``AutoModelForCausalLM.from_pretrained`` — bf16 checkpoints
and compressed-tensors ``pack-quantized`` ones alike (transformers + compressed-tensors decompress the
latter on the first forward) — with the tokenizer saved in it (all checkpoints and the teacher must share
one). Metrics, all on the same tokens:

* ``ppl`` — exp(mean next-token NLL) over packed windows of the validation split (``--seq-len`` tokens
  each, default: the ``seq_len`` the base model was trained with, read off its lineage; the first
  ``--max-tokens`` tokens of the split; every window position but the first is a target).
* ``kl`` — mean over those target positions of KL(teacher || student) = sum_v p_t (log p_t - log p_s),
  computed in fp32 from the full softcapped logits.
* ``top1`` — teacher-forced argmax agreement with the teacher on those positions.
* ``greedy`` — ``--prompts`` M validation prompts (``--prompt-len`` tokens, from windows spread over the
  split), ``--new-tokens`` N greedy tokens each (``generate``, EOS suppressed: no early stop); fraction
  of the N×M positions where student and teacher picked the same token, and ``first_div``, the mean
  index of the first differing token (N when none).
* ``unigram_ppl`` (once, for the report) — perplexity of the same targets under train-split unigram
  counts with add-one smoothing: the floor any trained model must beat.
* ``subsets`` (with ``--overlap-ngrams N[,N...]``) — ppl / nll / KL / top1 again on two disjoint parts of the
  targets: ``seenN``, targets that complete an N-token sequence (the N-1 tokens before it in the validation
  stream, and itself) which also occurs somewhere in the *train* split's token stream, and ``novelN``, the
  rest. The corpus is Python source whose model families copy code from each other (see
  :mod:`bench.corpus`): a model that memorised its training text predicts ``seen`` targets by recall, so the
  split tells memorisation apart from generalisation. Exact N-gram membership through a 64-bit rolling hash
  of the whole train stream (collision odds ~1e-12 per target).

Prints one row per checkpoint (name, params, size, ppl, KL, top1, greedy, first_div, tokens) and, with
``--json``, writes every number for scripts. Runs on CPU (fp32 compute) or CUDA (bf16 compute).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "load_model", "eval_windows", "evaluate_model", "greedy_tokens", "greedy_agreement", "unigram_perplexity",
    "perplexity", "kl_divergence", "evaluate", "EvalRow", "num_params", "format_table", "ngram_seen",
    "overlap_masks",
]


# ---------------------------------------------------------------------------------------------- loading
def _is_quantized(model) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "quantization_config", None) is not None


def load_model(path, device="cpu", dtype=None):
    """``(model, tokenizer)`` of checkpoint dir ``path`` via ``AutoModelForCausalLM``/``AutoTokenizer``.

    ``dtype`` None: fp32 on CPU, bf16 on CUDA. A pack-quantized checkpoint is loaded in bf16 and
    decompressed by one forward on ``device`` (compressed-tensors' hook) before being cast to ``dtype``. In bf16 the
    model computes as ``from_pretrained(dtype=torch.bfloat16)`` gives it: the RoPE ``inv_freq`` buffers stay fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    dtype = dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    if _is_quantized(model):
        with torch.no_grad():
            model(input_ids=torch.tensor([[tok.bos_token_id or 0]], device=device))
    if dtype == torch.bfloat16:
        # as loaded: bf16 weights, RoPE inv_freq buffers in fp32 (transformers computes them so); a plain
        # model.to(bf16) would round those frequencies and score every model at shifted positions
        from distill.models import to_bf16_layout

        return to_bf16_layout(model), tok
    return model.to(dtype), tok


def base_seq_len(path, default: int | None = 512) -> int | None:
    """The ``seq_len`` the model's base step was trained with (lineage), else ``default``."""
    from pack.checkpoint import read_lineage

    for step in read_lineage(path):
        if step.get("kind") == "base" and "seq_len" in step.get("recipe", {}):
            return int(step["recipe"]["seq_len"])
    return default


# ---------------------------------------------------------------------------------------------- data
def eval_windows(tokenizer, seq_len: int, max_tokens: int | None, split: str = "valid") -> torch.Tensor:
    """The evaluation windows: int64 ``[N, seq_len]``, the first ``max_tokens`` tokens of ``split``."""
    from bench.corpus import packed_sequences

    return packed_sequences(split, tokenizer, seq_len, max_tokens)


def prompt_windows(tokenizer, prompt_len: int, n_prompts: int, split: str = "valid") -> torch.Tensor:
    """``n_prompts`` prompts of ``prompt_len`` tokens spread evenly over ``split`` (int64 ``[M, P]``)."""
    from bench.corpus import token_stream

    if n_prompts < 1 or prompt_len < 1:
        raise ValueError(f"greedy agreement needs at least one prompt of at least one token, got {n_prompts} "
                         f"prompts of {prompt_len}; pass --new-tokens 0 to skip it")
    stream = token_stream(split, tokenizer)
    if len(stream) < n_prompts * prompt_len:
        raise ValueError(f"split {split} has {len(stream)} tokens, too few for {n_prompts}×{prompt_len} prompts")
    starts = np.linspace(0, len(stream) - prompt_len, n_prompts).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s:s + prompt_len] for s in starts]).astype(np.int64))


_MASKS: dict = {}  # evaluate()'s overlap masks of the last (tokenizer, seq_len, max_tokens, ngrams)
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio): a polynomial hash mod 2^64


def _ngram_hashes(stream: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every length-``n`` run of ``stream`` (1-D ints): ``out[k]`` hashes ``stream[k:k+n]``;
    ``len(stream) - n + 1`` values (none when the stream is shorter). ``sum_i (x_i + 1) * MUL^(n-1-i) mod 2^64``
    (the ``+1`` keeps token 0 from vanishing), built in ``n`` vectorised passes."""
    x = np.asarray(stream, dtype=np.uint64) + np.uint64(1)
    m = len(x) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * _HASH_MUL + x[i:i + m]
    return h


def ngram_seen(stream: np.ndarray, reference: np.ndarray, n: int) -> np.ndarray:
    """bool ``[len(stream)]``: ``out[k]`` is True when ``stream[k-n+1 : k+1]`` (the ``n`` tokens ending at ``k``)
    occurs contiguously in ``reference``; False for ``k < n - 1`` (too little history)."""
    if n < 1:
        raise ValueError(f"ngram_seen: n must be >= 1, got {n}")
    out = np.zeros(len(stream), dtype=bool)
    q = _ngram_hashes(stream, n)
    if len(q):
        # sort the small side (the queries), look every reference gram up in it: no sort of the train split
        uq = np.unique(q)
        r = _ngram_hashes(reference, n)
        i = np.minimum(np.searchsorted(uq, r), len(uq) - 1)
        hit = np.zeros(len(uq), dtype=bool)
        hit[i[uq[i] == r]] = True
        out[n - 1:] = hit[np.searchsorted(uq, q)]
    return out


def overlap_masks(windows: torch.Tensor, reference: np.ndarray, ngrams) -> dict[str, torch.Tensor]:
    """``{"seenN": mask, "novelN": ~mask}`` per N in ``ngrams``; masks are bool ``[W, L-1]`` over the targets
    ``windows[:, 1:]`` of packed windows ``[W, L]`` (consecutive pieces of one stream, as
    :func:`eval_windows` cuts them, so a target's history may reach into the window before it)."""
    flat = windows.reshape(-1).numpy()
    out = {}
    for n in ngrams:
        seen = torch.from_numpy(ngram_seen(flat, reference, int(n))).view(windows.shape)[:, 1:]
        out[f"seen{n}"], out[f"novel{n}"] = seen, ~seen
    return out


# ---------------------------------------------------------------------------------------------- metrics
def _logits(model, x):
    return model(input_ids=x, use_cache=False).logits.float()


def kl_divergence(teacher_logits, student_logits):
    """Per-position KL(teacher || student) from logits ``[..., V]`` (fp32): ``sum p_t (log p_t - log p_s)``."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


@torch.no_grad()
def evaluate_model(model, windows, teacher=None, batch_size: int = 8, device=None, masks=None) -> dict:
    """Sums over all target positions of ``windows`` (``[N, L]``; targets = ``windows[:, 1:]``): ``nll``,
    and with a teacher ``kl`` (teacher || model) and ``top1`` (argmax matches); plus ``tokens``.
    ``masks`` (``{name: bool [N, L-1]}``, e.g. :func:`overlap_masks`): the same sums over each mask's targets,
    under ``out["subsets"][name]``."""
    device = device or next(model.parameters()).device
    masks = {name: m.to(device) for name, m in (masks or {}).items()}
    keys = ("nll", "tokens") + (("kl", "top1") if teacher is not None else ())
    tot = dict.fromkeys(keys, 0.0)
    sub = {name: dict.fromkeys(keys, 0.0) for name in masks}
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)
        logits = _logits(model, x)[:, :-1]
        y = x[:, 1:]
        per = {"nll": F.cross_entropy(logits.transpose(1, 2), y, reduction="none"), "tokens": torch.ones_like(y)}
        if teacher is not None:
            t_logits = _logits(teacher, x)[:, :-1]
            per["kl"] = kl_divergence(t_logits, logits)
            per["top1"] = t_logits.argmax(-1) == logits.argmax(-1)
        for k, v in per.items():  # fp64 sums: exact token counts, no fp32 drift over a quarter-million targets
            v = v.double()
            tot[k] += v.sum().item()
            for name, m in masks.items():
                sub[name][k] += v[m[i:i + batch_size]].sum().item()
    out = {**tot, "tokens": int(tot["tokens"])}
    if masks:
        out["subsets"] = {name: {**d, "tokens": int(d["tokens"])} for name, d in sub.items()}
    return out


def perplexity(model, windows, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of ``model`` over ``windows``."""
    r = evaluate_model(model, windows, batch_size=batch_size)
    return math.exp(r["nll"] / r["tokens"])


@torch.no_grad()
def greedy_tokens(model, prompts, new_tokens: int, pad_token_id: int = 0) -> torch.Tensor:
    """Greedy continuation ``[M, new_tokens]`` of ``prompts`` ``[M, P]`` (HF ``generate``). EOS is suppressed
    (``min_new_tokens``) so that every prompt yields exactly ``new_tokens`` tokens: the argmax over the other
    tokens wherever EOS would have won."""
    device = next(model.parameters()).device
    x = prompts.to(device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id)
    return out[:, x.shape[1]:].cpu()


def greedy_agreement(student_tokens, teacher_tokens) -> tuple[float, float]:
    """(fraction of identical positions, mean index of the first differing token — N when none)."""
    same = student_tokens == teacher_tokens
    n = same.shape[1]
    first = torch.where(same.all(1), torch.full((same.shape[0],), n), (~same).int().argmax(1))
    return same.double().mean().item(), first.double().mean().item()   # (fp64: 5/9 is 5/9, not fp32's 0.5555555820)


def unigram_counts(train_stream: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.bincount(train_stream, minlength=vocab_size).astype(np.float64)


def unigram_perplexity(counts: np.ndarray, windows: torch.Tensor) -> float:
    """Perplexity of the targets ``windows[:, 1:]`` under add-one-smoothed unigram ``counts``."""
    logp = np.log(counts + 1.0) - math.log(counts.sum() + len(counts))
    y = windows[:, 1:].reshape(-1).numpy()
    return math.exp(-logp[y].mean())


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class EvalRow:
    name: str
    path: str
    params: int
    size_mb: float
    quantized: bool
    ppl: float
    nll: float
    tokens: int
    kl: float | None = None
    top1: float | None = None
    greedy: float | None = None
    first_div: float | None = None
    seconds: float = 0.0
    subsets: dict | None = None  # --overlap-ngrams: {name: {ppl, nll, tokens, kl, top1}} (means per target)


def num_params(model) -> int:
    """Parameters of the (decompressed) model, without compressed-tensors' leftovers (``weight_scale``,
    ``weight_shape``, ...) that stay registered after decompression."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.rsplit(".", 1)[-1].startswith("weight_"))


def _size_mb(path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2 ** 20


def evaluate(ckpts, teacher=None, device="cpu", dtype=None, max_tokens: int | None = 65536,
             seq_len: int | None = None, batch_size: int = 8, prompts: int = 16, prompt_len: int = 32,
             new_tokens: int = 32, unigram: bool = True, log=print, overlap_ngrams=()) -> dict:
    """Evaluate checkpoint dirs ``ckpts`` (and ``teacher``); returns the report dict (see module doc)."""
    from bench.corpus import corpus_sha256, token_stream, tokenizer_sha256

    ckpts = [Path(c) for c in ckpts]
    ref = Path(teacher) if teacher else ckpts[0]
    for c in (ref, *ckpts):
        if not (c / "config.json").is_file():
            raise FileNotFoundError(f"{c}: not a checkpoint directory (no config.json)")
    if seq_len is None:
        trained = base_seq_len(ref, default=None)
        seq_len = trained or 512
        log(f"windows of {seq_len} tokens: " + (f"{ref}'s training length (its lineage)" if trained else
                                                f"{ref}'s lineage names no training length (--seq-len)"))
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"--max-tokens {max_tokens}: fewer than one window of {seq_len} tokens (--seq-len)")
    dtype = dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)
    t_model, tok = load_model(ref, device, dtype) if teacher else (None, None)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ref)
    tok_sha = tokenizer_sha256(tok)
    windows = eval_windows(tok, seq_len, max_tokens)
    prompt_ids = prompt_windows(tok, prompt_len, prompts) if teacher and new_tokens > 0 else None
    t_greedy = greedy_tokens(t_model, prompt_ids, new_tokens, tok.pad_token_id) if prompt_ids is not None else None
    report = {"schema": "pdqkit_bench_eval/1", "corpus_sha256": corpus_sha256(), "tokenizer_sha256": tok_sha,
              "split": "valid", "seq_len": seq_len, "windows": len(windows), "max_tokens": max_tokens,
              "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "teacher": str(ref) if teacher else None, "prompts": prompts, "prompt_len": prompt_len,
              "new_tokens": new_tokens, "rows": []}
    masks = {}
    train = token_stream("train", tok) if overlap_ngrams or unigram else None
    if overlap_ngrams:
        key = (tok_sha, seq_len, max_tokens, tuple(overlap_ngrams))  # the windows depend on nothing else
        if key not in _MASKS:  # the quality pipeline evaluates checkpoint after checkpoint in one process
            _MASKS.clear()
            _MASKS[key] = overlap_masks(windows, train, overlap_ngrams)
        masks = _MASKS[key]
        report["overlap_ngrams"] = list(overlap_ngrams)
        report["subset_fraction"] = {k: m.float().mean().item() for k, m in masks.items()}
        log("train-split n-gram overlap of the targets: " + ", ".join(
            f"{k} {v:.1%}" for k, v in report["subset_fraction"].items() if k.startswith("seen")))
    if unigram:
        counts = unigram_counts(train, len(tok))
        report["unigram_ppl"] = unigram_perplexity(counts, windows)
        log(f"unigram baseline ppl (train-split counts, add-one): {report['unigram_ppl']:.2f}")
    for c in ckpts:
        t0 = time.time()
        model, ctok = load_model(c, device, dtype)
        if tokenizer_sha256(ctok) != tok_sha:
            raise ValueError(f"{c}: its tokenizer differs from {ref}'s; all checkpoints must share one tokenizer")
        r = evaluate_model(model, windows, t_model, batch_size, masks=masks)
        m = _means(r)
        row = EvalRow(name=c.name, path=str(c), params=num_params(model), size_mb=_size_mb(c),
                      quantized=_is_quantized(model), ppl=m["ppl"], nll=m["nll"], tokens=r["tokens"])
        if t_model is not None:
            row.kl, row.top1 = m["kl"], m["top1"]
            if t_greedy is not None:
                row.greedy, row.first_div = greedy_agreement(
                    greedy_tokens(model, prompt_ids, new_tokens, tok.pad_token_id), t_greedy)
        if masks:
            row.subsets = {name: _means(d) for name, d in r["subsets"].items()}
        row.seconds = time.time() - t0
        report["rows"].append(asdict(row))
        del model
    return report


def _means(sums: dict) -> dict:
    """Per-target means of :func:`evaluate_model`'s sums (``ppl`` = exp(mean nll); None on an empty subset)."""
    n = sums["tokens"]
    out = {"tokens": n, "ppl": math.exp(sums["nll"] / n) if n else None, "nll": sums["nll"] / n if n else None}
    for k in ("kl", "top1"):
        if k in sums:
            out[k] = sums[k] / n if n else None
    return out


def format_table(report: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"{'checkpoint':28} {'params':>10} {'MB':>8} {'ppl':>9} {'KL':>8} {'top1':>6} {'greedy':>6} "
             f"{'1st div':>7} {'tokens':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['name'][:28]:28} {r['params']:10d} {r['size_mb']:8.1f} {r['ppl']:9.3f} "
                     f"{f(r['kl'], '8.4f')} {f(r['top1'], '6.3f')} {f(r['greedy'], '6.3f')} "
                     f"{f(r['first_div'], '7.1f')} {r['tokens']:8d}")
    if report.get("unigram_ppl") is not None:
        lines.append(f"{'(unigram baseline)':28} {'':10} {'':8} {report['unigram_ppl']:9.3f}")
    for name in (report.get("subset_fraction") or {}):
        lines.append(f"  targets {name} ({report['subset_fraction'][name]:.1%}):")
        for r in report["rows"]:
            d = (r.get("subsets") or {}).get(name)
            if d is None:  # a row evaluated without this subset (an earlier call)
                continue
            lines.append(f"  {r['name'][:26]:26} {'':10} {'':8} {f(d['ppl'], '9.3f')} {f(d.get('kl'), '8.4f')} "
                         f"{f(d.get('top1'), '6.3f')} {'':6} {'':7} {d['tokens']:8d}")
    return "\n".join(lines)


def parse_ngrams(text: str) -> tuple[int, ...]:
    """``"8,32"`` -> (8, 32): the argparse type of ``--overlap-ngrams`` (here and in the quality pipeline)."""
    try:
        ns = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        ns = ()
    if not ns or min(ns) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give n-gram lengths >= 1, comma-separated (e.g. 8,32)")
    return ns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n")[0])
    ap.add_argument("ckpts", nargs="+", metavar="CKPT", help="checkpoint directories (bf16 or pack-quantized)")
    ap.add_argument("--teacher", metavar="CKPT", help="reference for KL / top1 / greedy agreement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ap.add_argument("--max-tokens", type=int, default=65536, help="validation tokens to evaluate, from the split's "
                    "start (0: all 248,969 / 297,111 of small / micro; the results tables use 0)")
    ap.add_argument("--seq-len", type=int, help="window length (default: the base model's training seq_len)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16, help="greedy-agreement prompts (M)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (N); 0 skips")
    ap.add_argument("--no-unigram", action="store_true", help="skip the unigram baseline (encodes the train split)")
    ap.add_argument("--overlap-ngrams", type=parse_ngrams, default=(), metavar="N[,N...]",
                    help="also report every metric on the targets that complete an N-gram of the train split "
                         "(seenN) and on the others (novelN)")
    args = ap.parse_args(argv)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        report = evaluate(args.ckpts, args.teacher, args.device, dtype, args.max_tokens or None, args.seq_len,
                          args.batch, args.prompts, args.prompt_len, args.new_tokens, not args.no_unigram,
                          overlap_ngrams=args.overlap_ngrams)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        from bench.cache import write_json_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
