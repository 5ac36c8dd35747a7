"""Launch configurations of the fast W4A16 kernels: the dataclass, the tuned per-GPU tables, the fallback heuristic.

Tables live in ``kernels/configs/<device name>.json`` (e.g. ``NVIDIA_H200.json``), written by
``python -m kernels.w4a16_autotune`` on that GPU. Layout::

    {"device": "NVIDIA H200", "sm_count": 132, "triton": "3.6.0", "date": "...", "dtype": "bfloat16",
     "shapes": {"16384x2560": {"1": {<W4A16Config fields>}, "2": {...}, ..., "4096": {...}}}}

Lookup for (M, N, K): the table of the current GPU, the entry "NxK", then the smallest tuned M >= M (the largest
if M is beyond the table). A GPU without a table, or a shape not in it, gets :func:`heuristic_config`.
``$PDQKIT_W4A16_TABLE=FILE`` replaces the packaged table with one written by ``kernels.w4a16_autotune --out FILE``
(it must name this GPU in its ``device`` field).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

from .env import TABLE_ENV, table_override

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KERNELS = ("decode", "prefill", "dequant_mm", "gemv", "gemv_mma", "gemv_mma8", "prefill_tma", "prefill_wsp")
GEMV_KERNELS = ("gemv", "gemv_mma", "gemv_mma8")
CHUNK_K = 128   # gemv_mma8: weights of K per word-tile row (16 int32 words: 4 lanes x one 16-byte vector)


@dataclasses.dataclass(frozen=True)
class W4A16Config:
    """One launch of the fast W4A16 GEMM.

    * ``kernel``: ``decode`` (split-K, :mod:`kernels.w4a16_decode`), ``prefill`` (full-K tiles,
      :mod:`kernels.w4a16_prefill`) or ``dequant_mm`` (dequantize the weight to the activation dtype, then
      ``torch.matmul``; only worth it when the GEMM is far into the compute-bound regime) or ``gemv`` (CUDA cores,
      :mod:`kernels.w4a16_gemv`; for a few activation rows) or ``gemv_mma`` (the same tiling on tensor
      cores via ``mma.sync`` from registers, :mod:`kernels.w4a16_gemv_mma`; where inline PTX cannot run, the
      dispatcher runs ``gemv`` with the same tiling) or ``gemv_mma8`` (the same on tensor cores with every MMA
      column an activation row, :mod:`kernels.w4a16_gemv_mma8`; for 5..16 rows; without inline PTX: ``gemv``) or
      ``prefill_tma`` (full-K tiles in Gluon: TMA ring, weights dequantized into wgmma's register operand,
      :mod:`kernels.w4a16_prefill_tma`; sm_90 only, elsewhere the dispatcher runs ``prefill``) or ``prefill_wsp``
      (the same arithmetic warp-specialised: a TMA producer warp and two consumer warpgroups of 64 weight rows
      each, which split the CTA's weight rows or its K blocks; optional serial split-K or stream-K,
      :mod:`kernels.w4a16_prefill_wsp`; sm_90 only, elsewhere ``prefill``).
    * ``block_m``/``block_n``/``block_k``: tile; ``block_k`` in {64, 128, 256}. For ``gemv``: ``block_m`` (activation
      rows per program) in {1, 2, 4, 8}, ``block_n`` (weight rows per program) a power of two <= 64, ``block_k`` in
      {256, 512, 1024, 2048}; ``num_stages`` 2 or 3: K blocks of words held in registers (the one computed and
      ``num_stages - 1`` in flight). ``gemv_mma``: the same, with ``block_m`` in {1, 2, 4} and ``block_n`` >= 2.
      ``gemv_mma8``: ``block_m`` 8 or 16, ``block_n`` 16..128, ``block_k`` 128..2048, :func:`mma8_ok`.
      ``prefill_tma``: ``block_m`` 64, 128 or 256, ``block_n`` 64 or 128 with ``num_warps = block_n / 16``,
      ``block_k`` 64 or 128, ``num_stages`` (TMA ring slots) 2..6. ``prefill_wsp``: the same but ``num_warps`` 4 (the
      default partition; the kernel runs 12 warps) and ``block_n`` 128 (two warpgroups of 64 rows) or 64 (two
      warpgroups on the same rows, every other K block each).
    * ``split_k``: K slices per output tile (decode, the GEMVs and the Gluon prefill kernels; clamped so that no
      slice is empty).
    * ``kperm``/``w_is_a``: K relabelling and weight-as-A-operand (see :mod:`kernels.w4a16_mainloop`).
    * ``chain`` (``gemv_mma``, ``gemv_mma8``): the four words of a thread's 16-byte vector share one MMA
      accumulator set instead of one set per word (:func:`chain_ok` says which ``gemv_mma`` tilings allow it; every
      ``gemv_mma8`` tiling does).
    * ``stream_k`` (``prefill_wsp``, without split-K): one CTA per SM, each an equal share of all (tile, K block)
      steps; the tiles shared by CTAs are summed in step order.
    """

    kernel: str
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    kperm: bool = False
    w_is_a: bool = False
    group_m: int = 8
    chain: bool = False
    stream_k: bool = False

    def __post_init__(self):
        if self.stream_k and (self.kernel != "prefill_wsp" or self.split_k != 1):
            raise ValueError(f"stream_k is a prefill_wsp option and replaces split-K (split_k 1): {self}")
        if self.kernel not in KERNELS:
            raise ValueError(f"W4A16Config.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel == "gemv_mma8":
            if self.block_m not in (8, 16) or self.block_k not in (128, 256, 512, 1024, 2048):
                raise ValueError(f"gemv_mma8 needs block_m 8 or 16 and block_k in 128..2048: {self}")
            if self.block_n not in (16, 32, 64, 128) or not mma8_ok(self.block_n, self.block_k, self.num_warps):
                raise ValueError(f"gemv_mma8 needs block_n in 16..128 and (block_n/16)*(block_k/128) >= "
                                 f"num_warps: {self}")
            if self.split_k < 1 or self.kperm or self.w_is_a or self.num_warps not in (1, 2, 4, 8):
                raise ValueError(f"gemv_mma8 has no K relabelling or MMA operands, split_k >= 1 and 1-8 warps: "
                                 f"{self}")
            if self.num_stages not in (2, 3):
                raise ValueError(f"gemv needs num_stages 2 or 3 (register pipeline depth), got {self.num_stages}")
            return
        if self.kernel == "prefill_tma":
            if self.block_m not in (64, 128, 256) or self.block_n not in (64, 128) or self.block_k not in (64, 128):
                raise ValueError(f"prefill_tma needs block_m 64/128/256, block_n 64/128 and block_k 64/128: {self}")
            if self.num_warps != self.block_n // 16 or not 2 <= self.num_stages <= 6:
                raise ValueError(f"prefill_tma needs num_warps = block_n / 16 and num_stages 2..6: {self}")
            if self.split_k < 1 or self.kperm or self.w_is_a or self.chain:
                raise ValueError(f"prefill_tma has no K relabelling, operand choice or chain: {self}")
            return
        if self.kernel == "prefill_wsp":
            if self.block_m not in (64, 128, 256) or self.block_n not in (64, 128) or self.block_k not in (64, 128):
                raise ValueError(f"prefill_wsp needs block_m 64/128/256, block_n 64/128 and block_k 64/128: {self}")
            if self.num_warps != 4 or not 2 <= self.num_stages <= 6:
                raise ValueError(f"prefill_wsp needs num_warps 4 and num_stages 2..6: {self}")
            if self.split_k < 1 or self.kperm or self.w_is_a or self.chain:
                raise ValueError(f"prefill_wsp has no K relabelling, operand choice or chain: {self}")
            return
        if self.kernel in ("gemv", "gemv_mma"):
            if self.kernel == "gemv_mma" and (self.block_m not in (1, 2, 4) or self.block_n < 2):
                raise ValueError(f"gemv_mma needs block_m in (1, 2, 4) and block_n >= 2: {self}")
            if self.block_m not in (1, 2, 4, 8) or self.block_k not in (256, 512, 1024, 2048):
                raise ValueError(f"gemv needs block_m in (1, 2, 4, 8) and block_k in (256, 512, 1024, 2048): {self}")
            if not 1 <= self.block_n <= 64 or self.block_n & (self.block_n - 1):
                raise ValueError(f"gemv needs block_n a power of two <= 64, got {self.block_n}")
            if self.split_k < 1 or self.kperm or self.w_is_a or self.num_warps not in (1, 2, 4, 8):
                raise ValueError(f"gemv has no K relabelling or MMA operands, split_k >= 1 and 1-8 warps: {self}")
            if self.num_stages not in (2, 3):
                raise ValueError(f"gemv needs num_stages 2 or 3 (register pipeline depth), got {self.num_stages}")
            if self.chain and (self.kernel != "gemv_mma" or not chain_ok(self.block_n, self.block_k,
                                                                         self.num_warps)):
                raise ValueError(f"chain is a gemv_mma option and needs 4 words per thread and row half: {self}")
            return
        if self.chain:
            raise ValueError(f"chain is a gemv_mma option: {self}")
        if self.block_k not in (64, 128, 256):
            raise ValueError(f"W4A16Config.block_k must be 64, 128 or 256, got {self.block_k}")
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"W4A16Config.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1 or self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"bad split_k/num_stages/num_warps in {self}")
        if self.kernel == "prefill" and self.split_k != 1:
            raise ValueError("the prefill kernel has no split-K; use kernel='decode'")
        if self.w_is_a and self.block_n < 64:
            raise ValueError("w_is_a needs block_n >= 64 (one wgmma warpgroup tile)")

    def fits(self, k: int, group_size: int) -> bool:
        """Whether this tile can run K (a multiple of block_k) with scale groups of ``group_size`` (K: channelwise)."""
        if k % self.block_k:
            return False
        if self.kernel in ("prefill_tma", "prefill_wsp"):   # one scale per row per K block
            return group_size >= k or group_size % self.block_k == 0
        return group_size >= k or group_size % self.block_k == 0 or self.block_k % group_size == 0

    def to_json(self) -> dict:
        """The fields, without ``stream_k`` when it is off (tables written before it existed read the same)."""
        d = dataclasses.asdict(self)
        if not self.stream_k:
            del d["stream_k"]
        return d

    def brief(self) -> str:
        """One-line label for logs, e.g. ``gemv_mma bm2 bn32 bk512 w4 st2 chain`` (split-K only when > 1,
        ``stream`` for stream-K)."""
        s = f"{self.kernel} bm{self.block_m} bn{self.block_n} bk{self.block_k} w{self.num_warps} st{self.num_stages}"
        return (s + (f" sk{self.split_k}" if self.split_k > 1 else "") + (" chain" if self.chain else "")
                + (" stream" if self.stream_k else ""))


def effective_split(kb_total: int, split_k: int) -> int:
    """The number of K slices a request of ``split_k`` over ``kb_total`` K blocks launches: ``ceil(kb_total / s)``
    blocks per slice for ``s = min(split_k, kb_total)``, and as many slices as that takes (none empty); e.g. 6 over
    8 blocks is 4 slices of 2."""
    return -(-kb_total // -(-kb_total // max(1, min(split_k, kb_total))))


def chain_ok(block_n: int, block_k: int, num_warps: int) -> bool:
    """Whether a ``gemv_mma`` tiling gives every thread whole 16-byte vectors (4 words) of each row half, so that
    the words of a vector can share one accumulator set (``chain``) without moving data between threads."""
    return (block_n // 2) * (block_k // 8) >= 4 * 32 * num_warps


def mma8_ok(block_n: int, block_k: int, num_warps: int) -> bool:
    """Whether a ``gemv_mma8`` tiling fills its ``[TR, 16]`` word tiles with whole warps of 8 x 4 lanes: 8-row
    groups in each row half (``block_n`` a multiple of 16), whole 128-wide K chunks, and ``TR`` (the tile rows,
    ``(block_n / 16) * (block_k / 128)`` times 8) at least ``8 * num_warps``."""
    return block_n % 16 == 0 and block_k % CHUNK_K == 0 and (block_n // 16) * (block_k // CHUNK_K) >= num_warps


def device_table_name(device_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"NVIDIA_H200.json"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def load_table(device_name: str) -> dict:
    """``shapes`` of the tuned table of ``device_name`` as ``{(N, K): [(M, W4A16Config), ...]}`` (sorted by M):
    ``$PDQKIT_W4A16_TABLE`` when set, else ``kernels/configs/<device name>.json`` (``{}`` when that does not
    exist). A table named by ``$PDQKIT_W4A16_TABLE`` must exist, parse, and have been tuned on a GPU of this name
    (its ``device`` field): else ``ValueError`` naming the file. Read once per (GPU name, override) and process:
    this runs on every eager call of the GEMM."""
    return _load_table(device_name, table_override())


@functools.lru_cache(maxsize=None)
def _load_table(device_name: str, override: str | None) -> dict:
    path = override or str(CONFIG_DIR / device_table_name(device_name))
    explicit = override is not None
    where = f"{TABLE_ENV}={path}" if explicit else path
    if not os.path.isfile(path):
        if explicit:
            raise ValueError(f"{where}: no such file; unset {TABLE_ENV} or point it at a table written by "
                             "python -m kernels.w4a16_autotune --out FILE")
        return {}
    try:
        data = json.loads(Path(path).read_text())
        table = {}
        for shape, by_m in data.get("shapes", {}).items():
            n, k = (int(v) for v in shape.split("x"))
            table[(n, k)] = sorted((int(m), W4A16Config(**cfg)) for m, cfg in by_m.items())
    except (ValueError, TypeError, AttributeError) as e:   # bad JSON, shape key, M key or config field
        raise ValueError(f"{where}: not a tuned table ({type(e).__name__}: {e}); write it with "
                         "python -m kernels.w4a16_autotune --out FILE") from None
    if explicit and data.get("device") != device_name:
        raise ValueError(f"{where}: tuned on {data.get('device')!r}, this GPU is {device_name!r}; tune this GPU "
                         f"(python -m kernels.w4a16_autotune --out FILE) or unset {TABLE_ENV}")
    return table


def heuristic_gemv(m: int, n: int, k: int, group_size: int) -> W4A16Config | None:
    """The tensor-core GEMVs for untuned shapes (``None`` where their tiles cannot run K / the group size, or where
    the split-K kernel is the better guess).

    * M <= 2, the diagonal GEMV (:mod:`kernels.w4a16_gemv_mma`): long K (>= 4096, a multiple of 1024) gets four
      weight rows per program and 1024-wide K blocks over 4 warps, the rest two rows and 512-wide (or 256-wide)
      blocks over one warp. Measured on the H200 (``bench/gpu/heuristic_check.py``, twenty-second session):
      1.14-2.32x the split-K heuristic at M = 1 on the E4B and `small` shapes, 0.86-1.01 of the tuned entries' speed
      on E4B.
    * 3 <= M <= 8, and M <= 16 for matrices of at most 2^23 weights, the full-MMA GEMV
      (:mod:`kernels.w4a16_gemv_mma8`, 8-row programs): 16 rows and 1024-wide K blocks over 8 warps, chained, where
      K is a multiple of 1024; else 512-wide blocks, over 8 warps with 32 rows and chained where N >= 8192, over 4
      warps with 16 rows otherwise; split-K where K is not a multiple of 512. Measured on the H200 (twenty-fourth
      session, ``heuristic_check.py --ms 3 4 8 16 --probe``, seven tilings on the six E4B and six `small` shapes):
      these were the best or within 10 % of the best tiling on every row they are used on, 0.98-1.95x the split-K
      heuristic; at M = 16 on larger matrices (gate_up, down, 8192x8192) these lost to split-K (0.56-0.86x; of the
      probed tilings only a 16-row program won there, on gate_up, 1.07x).
      Re-run on the rules as written (``heuristic_check.py --ms 1 2 3 4 8 16``): 0.96-1.95x the split-K heuristic at
      M = 3..16, 0.80-1.01 of the tuned entries' speed on the E4B shapes.
    * Long K (>= 8192) at M = 3..8 and N < 8192: that GEMV with split-K, 2 slices (3 from K = 16384). Measured on
      the H200 (thirty-sixth session, ``heuristic_check.py --splits 2 3 4 6 8``, the down_proj shapes of E4B,
      Llama-3.2-1B / 3B, Llama-3-8B, Llama-2-13B and Qwen2-7B at M = 4 and 8): 1.01-1.69x the unsplit GEMV on all
      twelve rows, 0.97-1.24x the split-K heuristic (below 1 on 4096x14336, 5120x13824 and 3584x18944 at M = 8:
      0.97-0.98x; the unsplit GEMV was 0.61-0.97x there). Splitting at M <= 2 was slower on five of the six shapes.
    """
    if m <= 2:
        if k >= 4096 and k % 1024 == 0:
            cfg = W4A16Config("gemv_mma", block_m=m, block_n=4, block_k=1024, num_warps=4, num_stages=3)
        else:
            bk = 512 if k % 512 == 0 else 256
            cfg = W4A16Config("gemv_mma", block_m=m, block_n=2, block_k=bk, num_warps=1, num_stages=3)
    elif m <= 8 or (m <= 16 and n * k <= 1 << 23):
        if k % 1024 == 0:
            cfg = W4A16Config("gemv_mma8", block_m=8, block_n=16, block_k=1024, num_warps=8, num_stages=3,
                              chain=True)
        elif k % 512:
            return None
        elif n >= 8192:
            cfg = W4A16Config("gemv_mma8", block_m=8, block_n=32, block_k=512, num_warps=8, num_stages=2,
                              chain=True)
        else:
            cfg = W4A16Config("gemv_mma8", block_m=8, block_n=16, block_k=512, num_warps=4, num_stages=3)
        if m <= 8 and k >= 8192 and n < 8192:   # measured on N = 2048..5120 (below 8192: 16-row programs)
            cfg = dataclasses.replace(cfg, split_k=2 if k < 16384 else 3)
    else:
        return None
    return cfg if cfg.fits(k, group_size) and n % cfg.block_n == 0 else None


def heuristic_tma(m: int, n: int, k: int, group_size: int, sm_count: int) -> W4A16Config | None:
    """The Gluon prefill kernel (:mod:`kernels.w4a16_prefill_tma`) for untuned shapes at 32 < M < 1024, where its
    tiles run K and the group size (``None`` elsewhere): 64 weight rows and 128-wide K blocks on four warps; 64
    activation rows (4 ring slots) up to M = 64 and wherever 128-row tiles would leave SMs idle, else 128 (3 slots).

    Read off six tilings timed on the H200 (twenty-fifth session, ``bench/gpu/heuristic_check.py --ms 32 64 128 256
    512 1000 --tma``, the six E4B and six `small` shapes) beside :func:`heuristic_config`'s split-K and Triton tiles;
    at M = 32 the kernel lost on five of the twelve shapes (0.57-0.98x), so the rule starts above 32. Re-run as
    written (``--ms 33 64 128 256 512 1000``): 0.71-3.05x the rule it replaces, geomean 1.51x over 72 rows, below 1x
    on 2560x8192 at M = 33 and 64, 5120x512 at M = 512 and 1000, and 512x2560 at M = 33."""
    if not 32 < m < 1024 or n % 64 or k % 128 or not (group_size >= k or group_size % 128 == 0):
        return None
    bm = 64 if m <= 64 or -(-m // 128) * (n // 64) < sm_count else 128
    return W4A16Config("prefill_tma", block_m=bm, block_n=64, block_k=128, num_warps=4,
                       num_stages=4 if bm == 64 else 3)


def heuristic_config(m: int, n: int, k: int, group_size: int, sm_count: int, gemv: bool = False,
                     tma: bool = False) -> W4A16Config:
    """Fallback for GPUs/shapes without a tuned entry: the rules the H200 tuning (2026-11-28) mostly followed.

    * With ``gemv`` (the caller's word that the GEMVs' inline PTX runs on this GPU and dtype, see
      :func:`kernels.w4a16.asm_ok`): the tensor-core GEMVs where :func:`heuristic_gemv` gives one (M <= 16).
    * With ``tma`` (the caller's word that the Gluon prefill kernel runs: Hopper, aligned operands, see
      :func:`kernels.w4a16.tma_ok`): that kernel where :func:`heuristic_tma` gives one (32 < M < 1024).
    * M <= 256: split-K kernel, weights as the wgmma A operand with relabelled K; K split until there are ~4
      (M <= 16) or ~2 programs per SM, keeping >= 2 K blocks per split.
    * 256 < M < 1024: 128x128 wgmma tiles, BLOCK_K 64, 8 warps, 3 stages, no split.
    * M >= 1024: dequantize + cuBLAS (compute-bound; the dequant pass is < 20% of the GEMM).
    """
    cfg = heuristic_gemv(m, n, k, group_size) if gemv else None
    if cfg is None and tma:
        cfg = heuristic_tma(m, n, k, group_size, sm_count)
    if cfg is not None:
        return cfg
    bk = 128 if k % 128 == 0 else 64
    if group_size < k and group_size % bk and bk % group_size:
        bk = 64
    if m <= 256:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        bn = 128 if n % 128 == 0 else 64
        tiles = -(-m // bm) * -(-n // bn)
        want = -(-(4 if m <= 16 else 2) * sm_count // tiles)
        split = max(1, min(want, k // bk // 2))
        return W4A16Config("decode", block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4,
                           num_stages=3 if m <= 16 else 4, kperm=True, w_is_a=True)
    if m < 1024:
        return W4A16Config("prefill", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return W4A16Config("dequant_mm")


def select_config(m: int, n: int, k: int, group_size: int, device_name: str, sm_count: int,
                  gemv: bool = False, tma: bool = False) -> W4A16Config:
    """Tuned entry for (M, N, K) on ``device_name`` if there is one that fits, else :func:`heuristic_config`
    (``gemv``, ``tma``: see there)."""
    entries = load_table(device_name).get((n, k))
    if entries:
        cfg = next((c for mm, c in entries if mm >= m), entries[-1][1])
        if cfg.fits(k, group_size):
            return cfg
    return heuristic_config(m, n, k, group_size, sm_count, gemv, tma)
