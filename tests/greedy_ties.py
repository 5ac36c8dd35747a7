"""Greedy generation of two transformers models that should compute the same function, compared up to numerical ties.

Used by the HF test of the fast kernel (``tests/test_kernels_fast_gpu.py``: the reference is compressed-tensors'
decompressed bf16 path, "ours" the same checkpoint on ``W4A16Linear``) and checked on the CPU by
``tests/test_greedy_ties.py`` (another summation order in place of our kernel, and injected kernel errors).

Two bf16 GEMMs with different fp32 summation orders differ in the last bit of some outputs; through a whole model
that moves the logits a little (the *path noise*). Where the reference's logit of our token is within that noise
of its own top-1, either token is a correct greedy choice. The noise scale ``tau`` is taken from the reference
alone, so that an error of ours cannot widen it: 2 x the larger of

* the reference's own path noise: its top-1 logit in generation (the prompt's prefill, then one-token decode
  GEMMs) against the same position teacher-forced (whole-sequence GEMMs, another kernel path and summation
  order), over all steps;
* one bf16 step (ulp) at the largest top-1 logit: the logits are bf16, so exact ties of two or more tokens occur.

Per prompt the rules are:

1. teacher-forced on the reference's tokens, our logits are within ``SPAN_FRAC`` (2 %) of the reference's
   largest |logit| at every position (a wrong column, scale or group moves them far more; an error that moves
   no logit that far and flips no token outside a tie is not caught: on the trained ``micro`` a per-channel
   error of about 1 % on the decode path was the smallest caught);
2. the same bound on the decode-step logits over the steps whose prefixes are identical in both generations
   (covers the one-token decode path, which rule 1 never runs);
3. every teacher-forced argmax disagreement is a tie: the reference scores our argmax within ``tau`` of its own;
4. the free-running greedy tokens are identical up to a first divergence that is itself such a tie in the decode
   step's logits (generation stops being comparable after it).
"""
from __future__ import annotations

import torch

__all__ = ["SPAN_FRAC", "bf16_ulp", "greedy_tie_check"]

SPAN_FRAC = 0.02


def bf16_ulp(x: float) -> float:
    """Spacing of bf16 values at magnitude ``|x|`` (8 significant bits)."""
    m = max(abs(x), torch.finfo(torch.bfloat16).tiny)
    return float(2.0 ** (torch.tensor(m).log2().floor().item() - 7))


@torch.no_grad()
def greedy_tie_check(ref, ours, prompts: list[list[int]], device: str, new_tokens: int = 32) -> tuple[list, list]:
    """Compare greedy generation of ``ref`` and ``ours`` (transformers causal LMs) on ``prompts`` (token id lists).

    Returns ``(rows, bad)``: one report dict per prompt, and the rows / positions that break a rule (module doc).
    Both models must have no logits processors active in greedy generation and ``eos_token_id`` None (``new_tokens``
    plain argmax steps).
    """
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    rows, bad = [], []
    for p in prompts:
        n = len(p)
        ids = torch.tensor([p], device=device)
        g_ref, g_ours = ref.generate(ids, **gen), ours.generate(ids, **gen)
        t_ref, t_ours = g_ref.sequences, g_ours.sequences
        lr, lo = ref(t_ref).logits[0].float(), ours(t_ref).logits[0].float()  # teacher-forced on ref's tokens
        sr, so = torch.cat(g_ref.logits).float(), torch.cat(g_ours.logits).float()  # decode steps [steps, vocab]
        steps = sr.shape[0]
        # steps 0..agree-1 chose the same token in both runs; step `agree` (if any) is the first divergence, whose
        # logits still come from identical prefixes
        agree = int((t_ref[0, n:] == t_ours[0, n:]).long().cumprod(0).sum())
        same_prefix = min(agree + 1, steps)

        span = float(lr.abs().max())
        top1 = sr.argmax(-1, keepdim=True)
        # the reference's decode logits predict positions n-1 .. n+steps-2 of the teacher-forced pass
        noise_ref = float((sr.gather(1, top1) - lr[n - 1:n - 1 + steps].gather(1, top1)).abs().max())
        tau = 2 * max(noise_ref, bf16_ulp(float(lr.max(-1).values.abs().max())))
        row = dict(prompt_len=n, tau=tau, noise_ref=noise_ref,
                   tf_max_diff=float((lr - lo).abs().max()) / span,
                   decode_max_diff=float((sr[:same_prefix] - so[:same_prefix]).abs().max()) / span)
        if row["tf_max_diff"] > SPAN_FRAC:
            bad.append(dict(row, rule=f"1: teacher-forced logits differ by more than {SPAN_FRAC:.0%} of the max"))
        if row["decode_max_diff"] > SPAN_FRAC:
            bad.append(dict(row, rule=f"2: decode-step logits differ by more than {SPAN_FRAC:.0%} of the max"))

        arg_r, arg_o = lr.argmax(-1), lo.argmax(-1)
        gap = lr.gather(1, arg_r[:, None])[:, 0] - lr.gather(1, arg_o[:, None])[:, 0]
        tf = (arg_r != arg_o).nonzero().flatten().tolist()
        row["tf_disagree"] = [(i, float(gap[i])) for i in tf]
        bad += [dict(row, rule="3: teacher-forced disagreement is not a tie", pos=i) for i in tf
                if float(gap[i]) > tau]
        if agree < steps:
            a, b = int(t_ref[0, n + agree]), int(t_ours[0, n + agree])
            g = float(sr[agree, a] - sr[agree, b])  # the reference's logit gap between its token and ours
            row.update(first_diff=agree, gap_at_diff=g, ref=t_ref[0, n:n + agree + 2].tolist(),
                       ours=t_ours[0, n:n + agree + 2].tolist())
            if g > tau:
                bad.append(dict(row, rule="4: greedy divergence is not a tie"))
        rows.append(row)
    return rows, bad
