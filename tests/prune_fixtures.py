"""Fixtures the prune tests share (tests/test_prune.py, test_prune_refit.py, test_prune_taylor.py): the bench
`micro` tokenizer and random micro checkpoints of every supported kind (a pytest plugin, see tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.factory import save_random_checkpoint


def save_prune_checkpoints(d: Path, tok, seed: int = 1) -> dict[str, Path]:
    """Text-only, multimodal, text-only with double-wide KV-shared MLPs (Gemma-4 micro, seeds ``seed`` ..
    ``seed + 2``), a 2-layer Llama (seed ``seed + 3``) and the same Llama with random MLP biases (seed ``seed + 4``),
    bf16, each with ``tok``, under ``d``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {
        "text": save_random_checkpoint("micro", d / "text", tokenizer=tok, seed=seed),
        "mm": save_random_checkpoint("micro", d / "mm", multimodal=True, tokenizer=tok, seed=seed + 1),
        "wide": save_random_checkpoint("micro", d / "wide", tokenizer=tok, seed=seed + 2, use_double_wide_mlp=True),
    }
    torch.manual_seed(seed + 3)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=640, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=2048,
                                         max_position_embeddings=512)).to(torch.bfloat16)
    llama.save_pretrained(d / "llama")
    tok.save_pretrained(d / "llama")
    out["llama"] = d / "llama"
    # a Llama with MLP biases (mlp_bias=True), drawn non-zero: the gate/up biases must follow their channels (the
    # MLP weights drawn wider than the init's 0.02 too, so that pruning visibly moves the logits)
    torch.manual_seed(seed + 4)
    biased = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=640, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=2048,
                                          max_position_embeddings=512, mlp_bias=True))
    with torch.no_grad():
        for layer in biased.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.normal_(0, 0.1)
                lin.bias.normal_(0, 0.5)
    biased.to(torch.bfloat16).save_pretrained(d / "llama_bias")
    tok.save_pretrained(d / "llama_bias")
    out["llama_bias"] = d / "llama_bias"
    return out


@pytest.fixture(scope="session")
def micro_tok():
    from bench.tokenizer import get_tokenizer

    return get_tokenizer("micro")


@pytest.fixture(scope="session")
def prune_ckpts(tmp_path_factory, micro_tok):
    """:func:`save_prune_checkpoints` with seed 1: kinds text, mm, wide, llama, llama_bias."""
    return save_prune_checkpoints(tmp_path_factory.mktemp("prune_base"), micro_tok, seed=1)
