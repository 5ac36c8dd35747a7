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
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # inside a capture torch.zeros only records the memset: eager calls and graphs captured later would
            # use the new buffer before this graph ever replays, with garbage tickets (tiles never written)
            raise RuntimeError(f"pdqkit: a launch needs {n} tile counters on {device} but only "
                               f"{bufs[-1].numel() if bufs else 0} exist, and a CUDA graph is being captured; call "
                               f"kernels.counters.reserve({str(device)!r}, {n}) before capturing")
        bufs.append(torch.zeros(max(n, min_n), dtype=torch.int32, device=device))
    return bufs[-1]


# One pool per kernel family (device -> buffers), shared by that family's launches: split-K decode, the Gluon
# prefill kernels (prefill_tma and prefill_wsp share one), and the marlin-order kernel's fused fold.
_POOLS: dict[str, dict] = {}
FAMILIES = ("decode", "prefill", "marlin")


def pool(family: str) -> dict:
    """The counter pool of a kernel family (one of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown counter pool {family!r}: one of {FAMILIES}")
    return _POOLS.setdefault(family, {})


def reserve(device: torch.device, n: int = 1 << 16, zero: bool = False) -> None:
    """Allocate every family's counter buffer on ``device`` now (at least ``n`` counters each, zeroed), e.g. at
    model load, before any CUDA-graph capture. A buffer first allocated inside a capture would be zeroed only when
    that graph replays, and graphs captured after it would reuse it unzeroed. 2^16 counters (256 KiB per family)
    cover a split-K or prefill launch of 65,536 output tiles, far beyond vLLM's largest captured batch on E4B.

    ``zero=True`` also re-zeroes the buffers that already exist there. The kernels leave every counter at zero, so
    this is only needed when the memory may have been lost under them: vLLM's sleep mode (level 2) discards and
    remaps the weights' memory pool, where the plugin allocated them, before weights are loaded again."""
    device = torch.device(device)
    for family in FAMILIES:
        grow_zeros(pool(family), device, n, n)
        if zero:
            for buf in pool(family)[device]:
                buf.zero_()
