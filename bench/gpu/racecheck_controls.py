"""Control kernels for compute-sanitizer's racecheck: what it reports on correct code built the way ``prefill_wsp``
synchronises (GPU, sm_90; Gluon).

``compute-sanitizer --tool racecheck --racecheck-report all --show-backtrace no python
bench/gpu/racecheck_controls.py [--only capture,capture3,handoff,handoff_cta]``

racecheck reported RAW hazards on two places in :mod:`kernels.w4a16_prefill_wsp` (thirty-second and thirty-third
sessions): the bytes through which ``warp_specialize`` hands the default partition's values to the worker
partitions, and the shared buffer through which the odd-K warpgroup hands its fp32 sum to the even one (K-halves
mode). Both are ordered in the code: the first by Triton's CTA-wide named barrier at the hand-over, the second by
a partition barrier (every writing warp's stores before the one arrive) and an mbarrier arrive (release) / wait
(acquire). These kernels do only that, on values whose result is checked, so each report racecheck prints for
them is one about its own model of the synchronisation, not about a kernel of ours:

- ``capture``: the default partition computes a value per CTA and passes it to a one-warp worker partition as an
  argument (Triton captures it through shared memory); the worker stores it. No shared memory of ours.
- ``capture3``: the same with ``prefill_wsp``'s partitions (a 4-warp default, workers of 4 and 1 warps with
  ``setmaxnreg`` budgets 232 and 24), two computed values captured.
- ``handoff``: a 4-warp partition stores a [64, 64] fp32 tile to shared memory, meets its own warps at the
  partition barrier, and arrives once on an mbarrier; a 4-warp worker partition waits on it, loads the tile and
  stores it to global memory (``prefill_wsp``'s K-halves epilogue, reduced to the hand-over).
- ``handoff_cta``: the same tile written and read by the same 4 warps of a plain kernel around a CTA barrier
  (``bar.sync 0``), no warp specialisation: the pattern racecheck is built for (a report here would mean the
  tool misreads the tile's layouts, not the hand-over).

Each kernel's output is checked against torch; the script prints one line per control and exits 1 on a wrong
value. The racecheck summary lines (one per launch, in this order) are the result. Measured on the H200 (2026-12-01,
compute-sanitizer of the GPU image, Triton 3.6.0, 8 CTAs, one process per control): ``handoff`` 122,908 RAW errors,
about one per byte of its 8 × 16 KiB of tiles; ``handoff_cta``, ``capture`` and ``capture3`` none; synccheck none
(``bench/results/h200-2026-12-01h/commands.md``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.w4a16_prefill_tma import _cta_barrier  # noqa: E402

T = 64   # the tile: [T, T] fp32, 16 KiB, as ``red`` is [64, BM] in prefill_wsp


@gluon.jit
def _tile_values(pid, T: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    r = gl.arange(0, T, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, T, layout=gl.SliceLayout(0, layout))
    return (gl.expand_dims(r, 1) * T + gl.expand_dims(c, 0) + pid * T * T).to(gl.float32)


@gluon.jit
def _store_tile(out_ptr, v, pid, T: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    r = gl.arange(0, T, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, T, layout=gl.SliceLayout(0, layout))
    gl.store(out_ptr + pid * T * T + gl.expand_dims(r, 1) * T + gl.expand_dims(c, 0), v)


# --- capture: a value handed to a worker partition as an argument -------------------------------------------------

@gluon.jit
def _capture_default(value):
    pass


@gluon.jit
def _capture_worker(out_ptr, value):
    gl.store(out_ptr + gl.program_id(0), value)


@gluon.jit
def _capture_kernel(out_ptr):
    value = gl.program_id(0) * 7 + 3          # computed in the kernel: captured through shared memory
    gl.warp_specialize([(_capture_default, (value, )), (_capture_worker, (out_ptr, value))], [1], [24])


@gluon.jit
def _capture3_part(out_ptr, a, b, IDX: gl.constexpr):
    gl.store(out_ptr + gl.program_id(0) * 3 + IDX, a * 1000 + b)


@gluon.jit
def _capture3_kernel(out_ptr):
    # prefill_wsp's shape of the hand-over: a 4-warp default partition, workers of 4 and 1 warps with
    # setmaxnreg budgets, two computed values captured
    a = gl.program_id(0) * 7 + 3
    b = gl.program_id(0) % 5
    gl.warp_specialize([(_capture3_part, (out_ptr, a, b, 0)), (_capture3_part, (out_ptr, a, b, 1)),
                        (_capture3_part, (out_ptr, a, b, 2))], [4, 1], [232, 24])


# --- handoff: a shared tile from one partition to another, partition barrier + mbarrier -------------------------

@gluon.jit
def _handoff_writer(buf, bar, out_ptr, T: gl.constexpr):
    buf.store(_tile_values(gl.program_id(0), T))
    _cta_barrier()                            # this partition's warps: every store before the one arrive
    mbarrier.arrive(bar, count=1)             # release


@gluon.jit
def _handoff_reader(buf, bar, out_ptr, T: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    mbarrier.wait(bar, 0)                     # acquire
    _store_tile(out_ptr, buf.load(layout), gl.program_id(0), T)


@gluon.jit
def _handoff_kernel(out_ptr, T: gl.constexpr):
    buf = gl.allocate_shared_memory(gl.float32, [T, T], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    gl.warp_specialize([(_handoff_writer, (buf, bar, out_ptr, T)), (_handoff_reader, (buf, bar, out_ptr, T))],
                       [4], [232])


# --- handoff_cta: the same tile around a CTA barrier, one partition ----------------------------------------------

@gluon.jit
def _handoff_cta_kernel(out_ptr, T: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    buf = gl.allocate_shared_memory(gl.float32, [T, T], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    v = _tile_values(gl.program_id(0), T)
    buf.store(v)
    _cta_barrier()
    # read it in a column-major layout: each thread loads values other threads stored
    w = buf.load(gl.BlockedLayout([4, 1], [16, 2], [1, 4], [0, 1]))
    _store_tile(out_ptr, gl.convert_layout(w, layout), gl.program_id(0), T)


def _expected_tiles(ctas: int) -> torch.Tensor:
    return torch.arange(ctas * T * T, dtype=torch.float32, device="cuda").view(ctas, T, T)


def run(name: str, ctas: int) -> bool:
    if name == "capture":
        out = torch.full((ctas, ), -1, dtype=torch.int32, device="cuda")
        _capture_kernel[(ctas, )](out, num_warps=4)
        ok = torch.equal(out.cpu(), torch.arange(ctas, dtype=torch.int32) * 7 + 3)
    elif name == "capture3":
        out = torch.full((ctas, 3), -1, dtype=torch.int32, device="cuda")
        _capture3_kernel[(ctas, )](out, num_warps=4)
        pid = torch.arange(ctas, dtype=torch.int32)
        ok = torch.equal(out.cpu(), ((pid * 7 + 3) * 1000 + pid % 5)[:, None].expand(ctas, 3))
    else:
        out = torch.full((ctas, T, T), -1.0, dtype=torch.float32, device="cuda")
        kernel = _handoff_kernel if name == "handoff" else _handoff_cta_kernel
        kernel[(ctas, )](out, T=T, num_warps=4)
        ok = torch.equal(out, _expected_tiles(ctas))
    torch.cuda.synchronize()
    print(f"control {name}: {ctas} CTAs, output {'correct' if ok else 'WRONG'}", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="capture,capture3,handoff,handoff_cta",
                    help="comma-separated controls, run in this order")
    ap.add_argument("--ctas", type=int, default=8, help="CTAs per launch (racecheck's time grows with them)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("error: the controls need a Hopper GPU (sm_90)", file=sys.stderr)
        return 2
    names = args.only.split(",")
    bad = [n for n in names if n not in ("capture", "capture3", "handoff", "handoff_cta")]
    if bad:
        ap.error(f"unknown control(s) {bad}")
    return 0 if all([run(n, args.ctas) for n in names]) else 1


if __name__ == "__main__":
    sys.exit(main())
