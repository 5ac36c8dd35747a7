"""distill.parallel.init resolves a bare ``cuda`` to an indexed device before ``torch.cuda.set_device``.

Found on the H200 (2026-11-29): ``python -m distill --device cuda`` died with "Expected a torch.device with a
specified index or an integer, but got:cuda" — torch.cuda.set_device refuses an index-less device. Checked here
on CPU by standing in for the three CUDA calls init makes (availability, current device, set_device) and
recording what set_device receives; the real call's contract is the same check (``device.index is not None``).
"""
from __future__ import annotations

import pytest
import torch

from distill import parallel


@pytest.mark.parametrize("arg,want", [("cuda", "cuda:0"), ("auto", "cuda:0"), ("cuda:1", "cuda:1")])
def test_single_process_cuda_device_is_indexed(monkeypatch, arg, want):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    seen = []

    def set_device(d):  # torch's own rule: an index is required
        if isinstance(d, torch.device) and d.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{d}")
        seen.append(d)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    env = parallel.init(arg)
    assert str(env.device) == want and [str(d) for d in seen] == [want]
    assert env.world == 1 and not env.is_dist


def test_cpu_device_untouched(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert str(parallel.init("cpu").device) == "cpu"


@pytest.mark.gpu
def test_real_cuda_init_gives_an_indexed_device(monkeypatch):
    """The same on a real GPU, no stand-ins: init('cuda') and init('auto') return the current CUDA device, indexed."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for arg in ("cuda", "auto"):
        env = parallel.init(arg)
        assert env.device == torch.device("cuda", torch.cuda.current_device()) and not env.is_dist


def test_an_explicit_gpu_under_torchrun_is_refused_unless_it_is_the_ranks_own(monkeypatch):
    """``--device cuda:0`` under torchrun would put every rank on GPU 0 (NCCL then fails or oversubscribes it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="--device cuda:0 under torchrun: every rank would use that one GPU"):
        parallel.init("cuda:0")
