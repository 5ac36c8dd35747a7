"""On-policy continuations for GKD (phase 2): ancestral sampling from the student with a KV cache.

Matches TRL's generation settings (``do_sample``, ``top_k=0``, ``top_p=1``, ``temperature``): a token is drawn
from ``softmax(logits / T)`` of the student's softcapped logits. Sampling is by the Gumbel-max trick with one
``torch.Generator`` per row seeded from (run seed, step, global row index), so a row's continuation does not
depend on which rank holds it or on the other rows of the batch (one or many processes, an interrupted or an
uninterrupted run: same tokens for the same weights). Every row runs exactly ``max_new_tokens`` steps (under
FSDP all ranks must run the same number of forwards); tokens after a row's first EOS are masked out of the
loss, as TRL does.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

__all__ = ["row_seed", "gumbel_sample", "sample_continuations", "continuation_mask", "on_policy_step"]


def row_seed(seed: int, step: int, row: int, salt: str = "gkd-sample") -> int:
    """A 63-bit seed for global row ``row`` of step ``step`` (stable across processes and machines)."""
    h = hashlib.sha256(f"{salt}/{seed}/{step}/{row}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether step ``step`` samples its continuations from the student (probability ``lmbda``; TRL draws
    ``random() <= lmbda``), decided from (seed, step) alone so that every rank and a resumed run agree."""
    u = row_seed(seed, step, -1, salt="gkd-lambda") / float(1 << 63)
    return u < lmbda


def gumbel_sample(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (fp32) from ``softmax(logits / temperature)``: int64 [B].

    Gumbel-max in float64: fp32 uniforms lie on a 2^-24 grid, which caps the noise at ~16 and so never draws a token
    more than ~19 nats below the top one (with a 262k vocabulary such a tail can hold ~1 % of the mass)."""
    b, v = logits.shape
    u = torch.stack([torch.rand(v, generator=g, device=logits.device, dtype=torch.float64) for g in generators[:b]])
    gumbel = -torch.log(-torch.log(u.clamp_(min=1e-300, max=1.0 - 2.0 ** -53)))
    return torch.argmax(logits.double() / temperature + gumbel, dim=-1)


@torch.no_grad()
def sample_continuations(decode: Callable, prompts: torch.Tensor, max_new_tokens: int, temperature: float,
                         seeds: list[int], make_cache: Callable) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens after each prompt row.

    decode(input_ids [B, t], cache) -> fp32 logits [B, V] of the last position (updates ``cache``).
    prompts: int64 [B, P]; seeds: one per row (:func:`row_seed`); make_cache() -> an empty KV cache.
    Returns int64 [B, max_new_tokens].
    """
    gens = [torch.Generator(device=prompts.device).manual_seed(s) for s in seeds]
    cache = make_cache()
    logits = decode(prompts, cache)
    out = []
    for t in range(max_new_tokens):
        tok = gumbel_sample(logits, temperature, gens)
        out.append(tok)
        if t + 1 < max_new_tokens:
            logits = decode(tok[:, None], cache)
    return torch.stack(out, dim=1)


def continuation_mask(tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """bool [B, T]: True up to and including each row's first EOS (all True for rows without one)."""
    if not eos_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~seen_before
