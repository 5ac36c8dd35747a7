"""Produce the bytes of each output tensor in file order, computed ahead of the writer by a thread pool.

An output file is a sequence of **pieces** (one quantized Linear's packed words, one 4 MiB chunk of a
passthrough tensor, a scale, a shape). Pieces are submitted to ``workers`` threads in file order, at most
``max_inflight`` pieces / ``max_bytes`` bytes ahead of the writer, and written as they come back in order.
Torch ops, ``pread`` and numpy release the GIL, so the threads run in parallel; each uses one intra-op torch
thread (the caller sets it): coarse-grained parallelism over weights instead of per-op thread barriers, which
cost more than the op itself on small tensors and a lot on a busy machine.

Quantizing a Linear (:class:`Quantizer`): one piece per block of rows (~4 MB in fp32), read straight from
the file (rows are contiguous in safetensors and independent in the math: same bytes), observed and rounded
(:func:`pack.observer.quantize_weight`) and packed (:func:`pack.packing.pack_int4`); its scales wait in memory
for their turn in the file (1/64 of the bf16 weights). Small blocks matter on CPU: every buffer is a few MB,
so the allocator reuses freed memory instead of mapping fresh pages for each temporary (page faults are
expensive in a VM) or retaining large freed blocks (peak RSS). On CUDA a piece is the whole weight.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .errors import QuantizeError
from .observer import QuantScheme, quantize_weight
from .packing import pack_int4
from .stio import CHUNK, SafetensorsFileWriter, SourceFiles, TensorEntry, read_bytes, read_tensor, tensor_bytes

__all__ = ["BLOCK_BYTES", "row_blocks", "Piece", "Quantizer", "passthrough_pieces", "stream_file"]

BLOCK_BYTES = 4 << 20  # fp32 bytes of one row block on CPU (256 rows at K = 4096): temporaries stay small


def row_blocks(n: int, k: int, device: str) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` quantized as one piece: whole weight on a GPU, ~``BLOCK_BYTES`` blocks on CPU."""
    if device != "cpu":
        return [(0, n)]
    rows = max(8, BLOCK_BYTES // (4 * max(k, 1)))
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


@dataclass(frozen=True)
class Piece:
    """A part of one output tensor: ``fn()`` returns its bytes; ``cost`` bytes are held while it is in flight."""

    fn: Callable[[], Any]
    cost: int
    pooled: bool = True  # False: trivial, computed on the writer thread when its turn comes


class Quantizer:
    """W4A16 jobs of one run. ``packed(m, e, r0, r1)`` quantizes rows ``[r0, r1)`` of Linear ``m`` (weight entry
    ``e``) and stores their scales for ``scale(m, ...)``: both tensors are written block by block, so every
    temporary stays a few MB and is reused by the allocator (no page-fault storm for fresh pages).

    The scales of all modules live in one buffer allocated up front (:meth:`reserve`): small tensors kept
    alive between the blocks' large temporaries would fragment the heap and keep ~4 bytes per parameter
    of freed memory resident.
    """

    def __init__(self, src: SourceFiles, scheme: QuantScheme, device: str):
        self.src, self.scheme, self.device = src, scheme, torch.device(device)
        self.scales: dict[str, torch.Tensor] = {}
        self.done: set[tuple[str, int]] = set()  # (module, first row) blocks whose scales are filled

    def reserve(self, weights: dict[str, TensorEntry]) -> None:
        """Allocate the scale buffer of every module to be quantized (``module -> weight entry``)."""
        g = self.scheme.group_size
        shapes = {m: (e.shape[0], 1 if g == -1 else e.shape[1] // g) for m, e in weights.items()}
        flat = torch.empty(sum(a * b for a, b in shapes.values()), dtype=torch.bfloat16)
        off = 0
        for m, (a, b) in shapes.items():
            self.scales[m] = flat[off:off + a * b].view(a, b)
            off += a * b

    def quantize(self, e: TensorEntry, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed int32 [r1-r0, K/8], scale [r1-r0, K/g]) of rows ``[r0, r1)`` of weight ``e``, on the CPU."""
        w = read_tensor(self.src, e, (r0, r1)).to(self.device)
        codes, scale = quantize_weight(w, self.scheme)
        if not bool(torch.isfinite(scale).all()):  # amax propagates NaN/Inf: a non-finite scale <=> bad group
            i, j = (~torch.isfinite(w)).nonzero()[0].tolist()
            raise QuantizeError(f"{e.file}: tensor {e.name} holds NaN/Inf (first at {[r0 + i, j]}); the source "
                                f"model diverged or the file is corrupt: fix the checkpoint or --extra-ignore "
                                f"{e.name.removesuffix('.weight')}")
        return pack_int4(codes).cpu(), scale.cpu()

    def packed(self, module: str, e: TensorEntry, r0: int, r1: int):
        packed, scale = self.quantize(e, r0, r1)
        self.scales[module][r0:r1] = scale
        self.done.add((module, r0))
        return tensor_bytes(packed)

    def scale(self, module: str, e: TensorEntry, r0: int, r1: int):
        # safetensors puts I32 before BF16, so the packed words (and these scales) were computed already;
        # should a layout ever put the scale first, quantize the rows again
        if (module, r0) not in self.done:
            self.scales[module][r0:r1] = self.quantize(e, r0, r1)[1]
        return tensor_bytes(self.scales[module][r0:r1])


def _has_nan(buf, dtype: str) -> bool:
    """True if a raw little-endian buffer of float ``dtype`` holds a NaN (bit test: exponent all ones, mantissa
    non-zero): ~4 GB/s with numpy, 6x faster than ``torch.isnan`` on bf16. Infinities are allowed: Gemma-4's
    clipped-linear buffers hold +-inf."""
    if dtype in ("BF16", "F16"):
        x = np.frombuffer(buf, dtype=np.uint16)
        return bool(np.any((x & 0x7FFF) > (0x7F80 if dtype == "BF16" else 0x7C00)))
    if dtype == "F32":
        x = np.frombuffer(buf, dtype=np.uint32)
        return bool(np.any((x & 0x7FFFFFFF) > 0x7F800000))
    if dtype == "F64":
        return bool(np.isnan(np.frombuffer(buf, dtype=np.float64)).any())
    return False  # fp8 and integers: not checked


def _nan_error(e: TensorEntry) -> QuantizeError:
    return QuantizeError(f"{e.file}: tensor {e.name} holds NaN; fix the checkpoint (the source model diverged or "
                         f"the file is corrupt)")


def _checked_chunk(src: SourceFiles, e: TensorEntry, off: int, n: int) -> bytearray:
    buf = read_bytes(src, e, off, n)
    if e.is_float and _has_nan(buf, e.dtype):
        raise _nan_error(e)
    return buf


def _cast_bf16(src: SourceFiles, e: TensorEntry):
    t = read_tensor(src, e)
    if t.isnan().any():
        raise _nan_error(e)
    return tensor_bytes(t.to(torch.bfloat16))


def passthrough_pieces(src: SourceFiles, e: TensorEntry, cast: bool) -> list[Piece]:
    """A passthrough tensor: its bytes unchanged in 4 MiB chunks (NaN-checked), or cast to bf16 whole."""
    if cast:
        return [Piece(lambda: _cast_bf16(src, e), e.nbytes * 2)]
    if e.nbytes == 0:
        return [Piece(lambda: b"", 0, pooled=False)]
    spans = [(off, min(CHUNK, e.nbytes - off)) for off in range(0, e.nbytes, CHUNK)]
    return [Piece(lambda off=off, n=n: _checked_chunk(src, e, off, n), n) for off, n in spans]


def stream_file(writer: SafetensorsFileWriter, pieces: dict[str, list[Piece]], pool: ThreadPoolExecutor,
                max_inflight: int, max_bytes: int, on_tensor: Callable[[str], None] = lambda name: None) -> None:
    """Write every tensor of ``writer`` (in its order) from its pieces, computed ahead by ``pool``."""
    todo = iter([(name, p) for name in writer.order for p in pieces[name]])
    inflight: deque[tuple[str, Piece, Future | None]] = deque()
    held = 0

    def fill() -> None:
        nonlocal held
        while len(inflight) < max_inflight and (held < max_bytes or not inflight):
            nxt = next(todo, None)
            if nxt is None:
                return
            name, p = nxt
            inflight.append((name, p, pool.submit(p.fn) if p.pooled else None))
            held += p.cost

    def chunks(name: str) -> Iterable:
        nonlocal held
        while inflight and inflight[0][0] == name:
            _, p, fut = inflight.popleft()
            data = fut.result() if fut is not None else p.fn()
            held -= p.cost
            fill()
            yield data

    try:
        fill()
        for name in writer.order:
            writer.write(name, chunks(name))
            on_tensor(name)
    finally:
        for _, _, fut in inflight:
            if fut is not None:
                fut.cancel()
