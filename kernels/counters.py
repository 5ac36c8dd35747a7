"""Per-device int32 counter buffers for in-kernel arrival counting (split-K tickets, the fused Marlin fold).

Import-light (torch only): the kernels that use it import triton, this module does not.
"""
from __future__ import annotations

import torch


def grow_zeros(pool: dict, device: torch.device, n: int, min_n: int) -> torch.Tensor:
    """int32 zeros on ``device``, at least ``n`` (and at least ``min_n``) of them, kept in ``pool``.

    ``pool`` maps a device to every buffer ever handed out there, the newest last. The kernels that count arrivals
    in these buffers return every counter they touch to zero, so one buffer serves every call, CUDA-graph replays
    included. When a call needs more, a larger buffer is appended and the older ones are kept alive: a captured
    CUDA graph still holds their addresses. Calls on concurrent streams of one device must not share a pool:
    launch them in order (as a model's layers are).
    """
    bufs = pool.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, min_n), dtype=torch.int32, device=device))
    return bufs[-1]
