"""Shared pytest set-up: `gpu` tests skip without CUDA, `vllm` tests skip without vLLM."""
from __future__ import annotations

import importlib.util

import pytest
import torch

# session fixtures: `trained_micro` (bench evaluation bed); `micro_tok`, `prune_ckpts` (prune tests)
pytest_plugins = ["tests.bench_fixtures", "tests.prune_fixtures"]


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_vllm = importlib.util.find_spec("vllm") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_vllm = pytest.mark.skip(reason="needs vLLM")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not (has_vllm and has_cuda):
            item.add_marker(skip_vllm)
