"""Marlin's host-side schedule (vLLM 0.26.0), reproduced in pure Python.

vLLM 0.26.0's ``marlin_gemm`` (csrc/libtorch_stable/quantization/marlin/marlin.cu + marlin_template.h) does not
compute an output element in one sequential pass over K. Its bits depend on decisions taken on the host and in
each thread block's prologue (spec marlin-arithmetic.md §6):

1. ``marlin_mm`` splits the M rows into *launches* (64-row multiples, capped at ``max_par`` 64-row blocks, then
   the remainder) and picks a thread config ``(thread_k, thread_n, threads)`` and ``thread_m_blocks`` per launch,
   including the "few tiles" override to ``(128, 64, 128)``.
2. Every launch runs ``sms`` thread blocks. The ``T = par * n_tiles`` output tiles are split into a *part 1*
   (whole tiles, each computed by one block over all of K) and a *part 2* whose ``T2 * k_tiles`` k-tile units
   are cut into stripes of ``iters`` units, one stripe per block (``init_part1_slice`` / ``init_part2_slice``).
3. A tile cut into several pieces ("slices") is folded sequentially in fp32 from the bottom piece (largest k,
   ``slice_idx`` 0) to the top piece (k from 0), which writes the output.

This module reproduces 1-3 for given ``(M, N, K, group size, dtype, sms)`` and returns frozen dataclasses: the
launches, and for every launch a *job table* (one job = one piece of one tile = what one Marlin block computes
for that tile) and the *fold order* of every tile. The job table is derived by walking each block exactly as
``init_slice`` does (``slice_count``/``slice_idx`` formulas included), not from a closed form; the Triton kernel
(kernels/w4a16_marlin.py) uses a closed form and the tests check the two agree.

Scope: 16-bit activations (bf16/fp16), ``uint4b8`` weights, no act-order, no zero points, no atomics,
group size -1 (channelwise), 32, 64 or 128, shapes Marlin accepts without padding (N % 64 == 0, K % 64 == 0 and
a valid thread config; vLLM pads other shapes, which changes K and therefore the partition).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

__all__ = [
    "ThreadConfig",
    "SMALL_BATCH_CONFIGS",
    "LARGE_BATCH_CONFIGS",
    "FEW_TILES_CONFIG",
    "H100_MAX_SHARED_MEM",
    "MarlinProblem",
    "Job",
    "Launch",
    "LaunchGroup",
    "Schedule",
    "build_schedule",
    "kernel_cache_size",
    "is_valid_config",
]

STAGES = 4  # cp.async pipeline depth on sm_80+ (marlin_mm: stages = 4 unless sm_75)
MIN_THREAD_N = 64
MIN_THREAD_K = 64
MAX_THREAD_M_BLOCKS = 4
H100_MAX_SHARED_MEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (H100 and H200)
SUPPORTED_GROUPS = (-1, 32, 64, 128)
DTYPES = ("bfloat16", "float16")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ThreadConfig:
    """One Marlin thread-block tile: ``thread_k`` x ``thread_n`` of the weight, ``num_threads`` threads."""

    thread_k: int
    thread_n: int
    num_threads: int

    def __post_init__(self):
        if (self.thread_k, self.thread_n, self.num_threads) not in _KNOWN_CONFIGS:
            raise ValueError(f"unknown Marlin thread config {self}; vLLM 0.26.0 builds {_KNOWN_CONFIGS}")

    @property
    def kw(self) -> int:
        """Warp-rows along k: each accumulates 32 consecutive k (two k16 MMAs) of every tile."""
        return self.thread_k // 32

    @property
    def k_blocks(self) -> int:
        return self.thread_k // 16

    @property
    def n_blocks(self) -> int:
        return self.thread_n // 16

    def label(self) -> str:
        return f"{self.thread_k}x{self.thread_n}/{self.num_threads}"


_KNOWN_CONFIGS = ((128, 128, 256), (64, 256, 256), (64, 128, 128), (128, 64, 128))  # generate_kernels.py
SMALL_BATCH_CONFIGS = (ThreadConfig(128, 128, 256), ThreadConfig(64, 128, 128), ThreadConfig(128, 64, 128))
LARGE_BATCH_CONFIGS = (ThreadConfig(64, 256, 256), ThreadConfig(64, 128, 128), ThreadConfig(128, 64, 128))
FEW_TILES_CONFIG = ThreadConfig(128, 64, 128)


def _kernel_instantiated(cfg: ThreadConfig, tmb: int, m8: bool) -> bool:
    """Whether vLLM 0.26.0 compiled a Marlin kernel for this 16-bit x uint4b8 combination (generate_kernels.py).

    ``thread_m_blocks`` in {0.5 (m_block_size_8), 1, 2, 3, 4}; 256-thread configs only as (128, 128) for
    m_blocks <= 1 and (64, 256) for m_blocks > 1; 128-thread configs for every m_blocks. Group blocks
    {-1, 2, 4, 8} are all built.
    """
    if m8 and tmb != 1:
        return False
    if cfg.num_threads == 256:
        return (cfg.thread_k, cfg.thread_n) == ((128, 128) if tmb <= 1 else (64, 256))
    return True


def kernel_cache_size(cfg: ThreadConfig, tmb: int, group_size: int) -> int:
    """Shared memory a Marlin kernel needs (marlin.cu ``get_kernel_cache_size``, no act-order, no zero points)."""
    tb_k, tb_n, tb_m = cfg.thread_k, cfg.thread_n, tmb * 16
    sh_a = STAGES * tb_m * tb_k * 2
    sh_b = STAGES * (tb_k * tb_n // 8) * 4
    sh_red = tb_m * (tb_n + 8) * 2
    sh_bias = tb_n * 2
    tmp = max(max(sh_b, sh_red), min(sh_b, sh_red) + sh_bias)
    tb_groups = 1 if group_size == -1 else _cdiv(tb_k, group_size)
    sh_s = tb_groups * tb_n * 2 * STAGES
    return tmp + sh_a + sh_s


def is_valid_config(cfg: ThreadConfig, tmb: int, n: int, k: int, group_size: int, max_shared_mem: int) -> bool:
    """marlin.cu ``is_valid_config`` for 16-bit activations x uint4b8."""
    if k % cfg.thread_k or n % cfg.thread_n:
        return False
    if cfg.thread_n < MIN_THREAD_N or cfg.thread_k < MIN_THREAD_K or cfg.num_threads < 128:
        return False
    return kernel_cache_size(cfg, tmb, group_size) <= max_shared_mem


@dataclass(frozen=True)
class MarlinProblem:
    """Inputs that fix Marlin's schedule. ``n`` = out_features, ``k`` = in_features, ``group_size`` -1 = channelwise.

    ``sms`` must be the multiprocessor count of the GPU that runs Marlin (132 on H100 SXM/H200, 114 on H100 PCIe);
    ``dtype`` is the activation dtype name ("bfloat16" or "float16"; both give the same schedule).
    """

    m: int
    n: int
    k: int
    group_size: int
    dtype: str = "bfloat16"
    sms: int = 132
    max_shared_mem: int = H100_MAX_SHARED_MEM

    def __post_init__(self):
        if self.m <= 0:
            raise ValueError(f"M must be positive, got {self.m}")
        if self.n <= 0 or self.n % MIN_THREAD_N:
            raise ValueError(f"Marlin needs N % 64 == 0, got N={self.n} (vLLM would pad it; not supported here)")
        if self.k <= 0 or self.k % 64:
            raise ValueError(f"Marlin needs K % 64 == 0, got K={self.k} (vLLM would pad it; not supported here)")
        if self.group_size not in SUPPORTED_GROUPS:
            raise ValueError(f"group size {self.group_size} not supported; use one of {SUPPORTED_GROUPS}")
        if self.group_size != -1 and self.k % self.group_size:
            raise ValueError(f"K={self.k} is not a multiple of the group size {self.group_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"activation dtype {self.dtype!r} not supported; use one of {DTYPES}")
        if self.sms <= 0:
            raise ValueError(f"sms must be positive, got {self.sms}")

    @property
    def group_blocks(self) -> int:
        """Marlin's ``group_blocks``: k16 blocks per scale group, -1 channelwise. Group == K is channelwise."""
        return -1 if self.group_size in (-1, self.k) else self.group_size // 16


@dataclass(frozen=True)
class Job:
    """One piece of one output tile: what Marlin block ``block`` accumulates for tile ``tile`` of its launch.

    Rows ``[par_id*mb, par_id*mb + mb)`` of the launch, columns ``[col*thread_n, (col+1)*thread_n)``, k-tiles
    ``[t0, t0 + nt)`` (a k-tile is ``thread_k`` wide). ``slice_idx`` 0 is the bottom piece (largest k).
    ``slot`` indexes the fp32 partial buffer of the Triton kernel (part-2 pieces only, else -1).
    """

    tile: int
    par_id: int
    col: int
    block: int
    t0: int
    nt: int
    slice_idx: int
    slice_count: int
    slot: int


@dataclass(frozen=True)
class Launch:
    """One ``Marlin<<<sms, threads>>>`` launch of ``marlin_mm`` on rows ``[row_off, row_off + m_split)``."""

    row_off: int
    m_split: int
    tmb: int  # thread_m_blocks
    m8: bool  # m_block_size_8
    cfg: ThreadConfig
    sms: int
    n: int
    k: int
    group_blocks: int
    par: int  # 64-row sub-blocks in this launch
    mb: int  # rows per m-block: 8 if m8 else 16 * tmb
    k_tiles: int
    n_tiles: int
    tiles: int  # T = par * n_tiles
    part2_tiles: int  # T2
    part1_iters: int  # P1: whole tiles per block in part 1
    iters: int  # k-tile units per block stripe in part 2
    max_pieces_per_block: int  # MAXB: part-2 tiles one block can touch (slot stride)
    jobs: tuple[Job, ...]
    folds: tuple[tuple[int, ...], ...]  # per tile: job indices, bottom (slice_idx 0) first

    @property
    def part1_tiles(self) -> int:
        return self.tiles - self.part2_tiles

    @property
    def active_blocks(self) -> int:
        """Blocks whose part-2 stripe is not empty (the others only do part-1 tiles, or nothing)."""
        return min(self.sms, _cdiv(self.part2_tiles * self.k_tiles, self.iters))

    @property
    def slots(self) -> int:
        """Size of the part-2 partial buffer: slot ``block * MAXB + r`` is block's r-th part-2 tile."""
        return self.active_blocks * self.max_pieces_per_block

    def pieces(self) -> tuple[int, ...]:
        """Sorted distinct ``slice_count`` values over part-2 tiles (the spec §6.7 "pieces" column)."""
        return tuple(sorted({len(self.folds[q]) for q in range(self.part1_tiles, self.tiles)}))

    def same_shape(self, other: "Launch") -> bool:
        return (self.m_split, self.tmb, self.m8, self.cfg) == (other.m_split, other.tmb, other.m8, other.cfg)


@dataclass(frozen=True)
class LaunchGroup:
    """``count`` consecutive launches with identical schedules (e.g. 4 x 1024 rows); launch ``i`` starts at
    ``launches[first].row_off + i * m_split``."""

    first: int
    count: int


@dataclass(frozen=True)
class Schedule:
    problem: MarlinProblem
    launches: tuple[Launch, ...]
    groups: tuple[LaunchGroup, ...]

    def as_dict(self) -> dict:
        """Canonical, JSON-able description (launch parameters, every job, every fold)."""
        out = {"problem": [self.problem.m, self.problem.n, self.problem.k, self.problem.group_size, self.problem.sms],
               "launches": []}
        for ln in self.launches:
            out["launches"].append({
                "row_off": ln.row_off, "m_split": ln.m_split, "tmb": ln.tmb, "m8": ln.m8,
                "cfg": [ln.cfg.thread_k, ln.cfg.thread_n, ln.cfg.num_threads], "par": ln.par, "mb": ln.mb,
                "k_tiles": ln.k_tiles, "n_tiles": ln.n_tiles, "T": ln.tiles, "T2": ln.part2_tiles,
                "P1": ln.part1_iters, "iters": ln.iters,
                "jobs": [[j.tile, j.block, j.t0, j.nt, j.slice_idx, j.slice_count] for j in ln.jobs],
                "folds": [list(f) for f in ln.folds],
            })
        return out

    def sha256(self) -> str:
        """Hash of :meth:`as_dict`: recorded with golden outputs so CI notices any change of the schedule."""
        blob = json.dumps(self.as_dict(), separators=(",", ":"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _choose_config(problem: MarlinProblem, m_split: int, tmb: int, m8: bool) -> ThreadConfig | None:
    """marlin.cu ``determine_exec_config`` + the few-tiles override in ``marlin_mm``."""
    n, k, g, smem = problem.n, problem.k, problem.group_size, problem.max_shared_mem
    g_eff = -1 if problem.group_blocks == -1 else g
    chosen = None
    for cfg in (LARGE_BATCH_CONFIGS if tmb > 1 else SMALL_BATCH_CONFIGS):
        if is_valid_config(cfg, tmb, n, k, g_eff, smem - 512) and _kernel_instantiated(cfg, tmb, m8):
            chosen = cfg
            break
    if chosen is not None and (n // chosen.thread_n) * _cdiv(m_split, tmb * 16) * 4 <= problem.sms:
        if is_valid_config(FEW_TILES_CONFIG, tmb, n, k, g_eff, smem):
            chosen = FEW_TILES_CONFIG
    return chosen


def _walk_blocks(k_tiles: int, n_tiles: int, tiles: int, t2: int, iters: int, sms: int, maxb: int) -> list[Job]:
    """Every block's slices, in the order ``init_slice`` produces them (marlin_template.h)."""
    jobs = []
    p1 = (tiles - t2) // sms if tiles > sms else 0
    t1 = tiles - t2
    for b in range(sms):
        q = b
        for _ in range(p1):  # init_part1_slice: whole tiles b, b + sms, ...
            jobs.append(Job(q, q // n_tiles, q % n_tiles, b, 0, k_tiles, 0, 1, -1))
            q += sms
        col_par, row = (iters * b) // k_tiles, (iters * b) % k_tiles
        first_col_par = col_par
        while True:  # init_part2_slice, one call per slice
            slice_iters = iters * (b + 1) - (k_tiles * col_par + row)
            if slice_iters < 0 or col_par >= t2:
                slice_iters = 0
            if slice_iters == 0:
                break
            if row + slice_iters > k_tiles:
                slice_iters = k_tiles - row
            count, idx = 1, 0
            col_first = iters * _cdiv(k_tiles * col_par, iters)
            if col_first <= k_tiles * (col_par + 1):
                col_off = col_first - k_tiles * col_par
                count = _cdiv(k_tiles - col_off, iters) + (1 if col_off > 0 else 0)
                delta_first = iters * b - col_first
                if delta_first < 0 or (col_off == 0 and delta_first == 0):
                    idx = count - 1
                else:
                    idx = count - 1 - delta_first // iters - (1 if col_off > 0 else 0)
            q = t1 + col_par
            slot = b * maxb + (col_par - first_col_par)
            jobs.append(Job(q, q // n_tiles, q % n_tiles, b, row, slice_iters, idx, count, slot))
            row, col_par = 0, col_par + 1
    return jobs


def _make_launch(problem: MarlinProblem, row_off: int, m_split: int, tmb: int, m8: bool, cfg: ThreadConfig) -> Launch:
    sms, gb = problem.sms, problem.group_blocks
    mb = 8 if m8 else 16 * tmb
    par = m_split // mb if m_split > mb else 1
    k_tiles, n_tiles = problem.k // cfg.thread_k, problem.n // cfg.thread_n
    tiles = par * n_tiles
    if tiles > sms:
        t2 = tiles % sms
        if 3 * t2 <= sms:
            t2 += sms
        p1 = (tiles - t2) // sms
    else:
        t2, p1 = tiles, 0
    iters = _cdiv(k_tiles * t2, sms)
    if gb != -1 and gb >= cfg.k_blocks:  # stripes start on a group boundary
        g = gb // cfg.k_blocks
        iters = g * _cdiv(iters, g)
    maxb = (iters - 1) // k_tiles + 2
    jobs = _walk_blocks(k_tiles, n_tiles, tiles, t2, iters, sms, maxb)
    by_tile: list[list[int]] = [[] for _ in range(tiles)]
    for i, job in enumerate(jobs):
        by_tile[job.tile].append(i)
    folds = tuple(tuple(sorted(ids, key=lambda i: jobs[i].slice_idx)) for ids in by_tile)
    return Launch(row_off, m_split, tmb, m8, cfg, sms, problem.n, problem.k, gb, par, mb, k_tiles, n_tiles,
                  tiles, t2, p1, iters, maxb, tuple(jobs), folds)


@functools.lru_cache(maxsize=128)  # a prefill-sized job table is ~2 MB: bounded under vLLM's varied M
def build_schedule(m: int, n: int, k: int, group_size: int, dtype: str = "bfloat16", sms: int = 132,
                   max_shared_mem: int = H100_MAX_SHARED_MEM) -> Schedule:
    """Marlin's launches, configs, job tables and fold orders for one ``marlin_gemm`` call (``marlin_mm``)."""
    problem = MarlinProblem(m, n, k, group_size, dtype, sms, max_shared_mem)
    max_par = 128 if n <= 4096 else 16
    max_tmb = MAX_THREAD_M_BLOCKS
    launches: list[Launch] = []
    rest, row_off = m, 0
    while rest:
        par_count = min(rest // (max_tmb * 16), max_par)
        m_split = par_count * max_tmb * 16 if par_count > 0 else rest
        tmb = min(_cdiv(m_split, 16), max_tmb)
        m8 = m_split <= 8
        cfg = _choose_config(problem, m_split, tmb, m8)
        if cfg is None:
            if max_tmb > 1:
                max_tmb -= 1
                continue
            raise ValueError(f"Marlin has no valid thread config for M={m}, N={n}, K={k}, group={group_size}")
        launches.append(_make_launch(problem, row_off, m_split, tmb, m8, cfg))
        row_off += m_split
        rest -= m_split
    groups: list[LaunchGroup] = []
    for i, ln in enumerate(launches):
        if groups and launches[groups[-1].first].same_shape(ln):
            groups[-1] = LaunchGroup(groups[-1].first, groups[-1].count + 1)
        else:
            groups.append(LaunchGroup(i, 1))
    return Schedule(problem, tuple(launches), tuple(groups))
