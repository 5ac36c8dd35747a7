"""``python -m kernels.verify``: pdqkit's Marlin-order kernel against vLLM 0.26.0 Marlin, bit for bit (GPU only).

For every case the SAME logical weights (random int4 codes, scales, bias) go to both kernels:

* pdqkit: ``w4a16_gemm_exact(x, weight_packed, weight_scale, bias)`` on the compressed-tensors tensors as stored.
* Marlin: what vLLM 0.26.0's ``MarlinLinearKernel`` does to the checkpoint tensors —
  ``gptq_marlin_repack(weight_packed.T, perm=[], K, N, 4, False)``, ``marlin_permute_scales(weight_scale.T)``,
  ``marlin_permute_bias(bias)`` — then ``marlin_gemm`` with the arguments ``apply_gptq_marlin_linear`` passes
  (empty zero-point / g_idx / perm tensors, ``is_k_full=True``, ``use_atomic_add=False``, ``use_fp32_reduce``,
  ``is_zp_float=False``, a zeroed int32 workspace of ``sms`` locks).

It prints one line per case (mismatching elements, max ulp), a summary per shape, writes JSON (``--json``) and the
golden file (``--golden``), and exits 1 on any mismatch or error. Random inputs come from torch's CUDA generator
(seeded per case: reproducible on a GPU); the eight ``exact`` cases are integer data from a CPU generator whose
Marlin output a CPU can reproduce (tests/test_marlin_exact_interp.py checks the recorded hashes).

Run it on the GPU machine from the repository root, carrying vLLM's extension (kernels/vllm_ops.py):
``run(command="python -m kernels.verify --sms 114 --json $OUT/v.json", carry=[".vso"])``.

``--sms 114 100``: Marlin 0.26.0 takes the SM count from ``cudaDeviceGetAttribute`` and has no argument for it.
The harness then re-runs a reduced sweep in a subprocess with a tiny LD_PRELOAD shim (compiled on the spot) that
makes ``cudaDevAttrMultiProcessorCount`` report the given value, and compares with pdqkit's kernel at the same
``sms`` (and, as a control, at the real SM count).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from pack.packing import marlin_permute_bias, marlin_permute_scales, pack_int4

M_VALUES = (1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1000, 1024, 2048, 4096)
E4B_PRUNED = {"qkv": (3072, 2560), "o": (2560, 2048), "gate_up": (16384, 2560), "down": (2560, 8192)}
E4B_FULL = {"gate_up_full": (20480, 2560), "down_full": (2560, 10240)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Launch choices re-run on the M <= 16 cases that no other tiling re-runs (``--decode-variant``): same bits.
# The default re-checks the decode path the defaults leave out: pass 2 instead of the fused fold, the untransposed
# MMA, chain programs launched apart, two tiles of prefetch, 2 warps.
DECODE_VARIANT = {"num_warps": 2, "fuse": False, "swap": False, "wr_fast": False, "prefetch": 2}


def scalar_type_id(exponent: int, mantissa: int, signed: bool, bias: int, finite_only: bool = False,
                   nan_repr: int = 1) -> int:
    """vLLM ``ScalarType.id``: exponent 8b | mantissa 8b | signed 1b | bias 32b | finite_only 1b | nan_repr 8b."""
    val, off = 0, 0
    for member, width in ((exponent, 8), (mantissa, 8), (int(signed), 1), (bias, 32), (int(finite_only), 1),
                          (nan_repr, 8)):
        val |= (member & ((1 << width) - 1)) << off
        off += width
    return val


U4B8_ID = scalar_type_id(0, 4, False, 8)  # scalar_types.uint4b8 = ScalarType.uint(4, 8) -> 1125899907892224


@dataclass(frozen=True)
class Case:
    id: int
    n: int
    k: int
    m: int
    dtype: str
    group: int
    bias: bool
    fp32_reduce: bool
    seed: int
    shape: str = ""
    data: str = "random"  # "random" (CUDA generator) or "exact" (CPU generator, integer data: CPU-reproducible)


# ----------------------------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------------------------
def full_cases(seed: int = 0) -> list[Case]:
    """>= 500 cases: every M on the six E4B shapes, sampled M on 10 random shapes, plus group 32/64."""
    rng = random.Random(seed)
    cases: list[Case] = []

    def add(shape, n, k, m, dt, g, **kw):
        i = len(cases)
        cases.append(Case(i, n, k, m, dt, g, kw.get("bias", i % 2 == 1), kw.get("fp32_reduce", i % 7 != 3),
                          seed * 100003 + i, shape))

    for name, (n, k) in {**E4B_PRUNED, **E4B_FULL}.items():
        for dt in DTYPES:
            for g in (128, -1):
                for m in M_VALUES:
                    add(name, n, k, m, dt, g)
    shapes = [(64 * rng.randint(1, 96), 128 * rng.randint(1, 48)) for _ in range(7)]
    shapes += [(64 * (2 * rng.randint(0, 40) + 1), 128 * (2 * rng.randint(0, 20) + 1))]  # N % 128, K % 256 != 0
    shapes += [(128 * (2 * rng.randint(1, 30) + 1), 128 * rng.randint(1, 48))]  # N % 256 != 0
    shapes += [(64, 128 * rng.randint(1, 80))]  # a single 64-column tile
    for n, k in shapes:
        ms = sorted({1, rng.choice(M_VALUES[-4:]), *rng.sample(M_VALUES, 4)})
        for dt in DTYPES:
            for g in (128, -1):
                for m in ms:
                    add(f"rand{n}x{k}", n, k, m, dt, g)
    for n, k in ((3072, 2560), (2560, 2048)):
        for g in (32, 64):
            for m in (1, 16, 65, 256):
                add(f"g{g}", n, k, m, "bf16", g)
    return cases


def reduced_cases(seed: int = 0) -> list[Case]:
    """A quick sweep (CI on a GPU, the sms experiment): the four pruned E4B shapes, 6 M values."""
    cases: list[Case] = []
    for name, (n, k) in E4B_PRUNED.items():
        for j, m in enumerate((1, 7, 16, 33, 65, 256)):
            i = len(cases)
            dt, g = ("bf16", "fp16")[i % 2], (128, -1)[(i // 2) % 2]
            cases.append(Case(i, n, k, m, dt, g, i % 3 == 0, i % 5 != 4, seed * 100003 + 50000 + i, name))
    return cases


def exact_cases() -> list[Case]:
    """Tiny integer-data cases whose Marlin bits a CPU can reproduce (every sum is exact before the epilogue)."""
    spec = [(1, 128, 256, 128, "bf16", False, True), (5, 128, 256, -1, "bf16", True, True),
            (9, 192, 256, 128, "fp16", True, False), (17, 256, 128, 128, "bf16", False, False),
            (33, 64, 256, -1, "fp16", False, True), (65, 128, 128, 128, "bf16", True, True),
            (2, 256, 512, 64, "fp16", True, False), (70, 192, 384, 128, "bf16", True, False)]
    return [Case(9000 + i, n, k, m, dt, g, b, r, 777 + i, "exact", "exact")
            for i, (m, n, k, g, dt, b, r) in enumerate(spec)]


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def make_weights(n: int, k: int, group: int, dtype: torch.dtype, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes and positive scales spread over ~7 binades, compressed-tensors layout."""
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen, device=device, dtype=torch.int16)
    groups = 1 if group == -1 else k // group
    mag = torch.rand((n, groups), generator=gen, device=device) + 0.5
    exp = torch.randint(-3, 4, (n, groups), generator=gen, device=device).to(torch.float32)
    scale = (mag * torch.exp2(exp) * 0.01).to(dtype)
    return pack_int4(codes), scale


def make_activations(case: Case, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator(device=device).manual_seed(case.seed)
    row_scale = torch.exp2(torch.randint(-3, 4, (case.m, 1), generator=gen, device=device).to(torch.float32))
    x = (torch.randn((case.m, case.k), generator=gen, device=device) * row_scale).to(dtype)
    bias = (torch.randn((case.n,), generator=gen, device=device) * 0.5).to(dtype) if case.bias else None
    return x, bias


def exact_inputs(case: Case):
    """CPU-generated integer data (see :func:`kernels.marlin_emulate.exact_chunk_inputs`) + integer bias."""
    from .marlin_emulate import exact_chunk_inputs

    dtype = DTYPES[case.dtype]
    x, wp, ws = exact_chunk_inputs(case.m, case.n, case.k, case.group, dtype, case.seed)
    gen = torch.Generator().manual_seed(case.seed + 1)
    bias = torch.randint(-64, 65, (case.n,), generator=gen).to(dtype) if case.bias else None
    return x, wp, ws, bias


# ----------------------------------------------------------------------------------------------------------------
# The two kernels
# ----------------------------------------------------------------------------------------------------------------
class MarlinWeights:
    """vLLM MarlinLinearKernel.process_weights_after_loading for a compressed-tensors W4A16 layer."""

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, group: int):
        n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
        dev = weight_packed.device
        self.n, self.k = n, k
        self.empty = torch.empty(0, dtype=torch.int32, device=dev)
        self.qweight = torch.ops._C.gptq_marlin_repack(weight_packed.t().contiguous(), self.empty, k, n, 4, False)
        self.scales = marlin_permute_scales(weight_scale.t().contiguous(), k, group)
        self.workspace = torch.zeros(torch.cuda.get_device_properties(dev).multi_processor_count, dtype=torch.int32,
                                     device=dev)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, use_fp32_reduce: bool) -> torch.Tensor:
        b = marlin_permute_bias(bias) if bias is not None else None
        return torch.ops._C.marlin_gemm(x, None, self.qweight, b, self.scales, None, None, self.empty, self.empty,
                                        self.empty, self.workspace, U4B8_ID, x.shape[0], self.n, self.k, True,
                                        False, use_fp32_reduce, False)


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(mismatching elements, max distance in units in the last place) of two bf16/fp16 tensors."""
    ia, ib = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)

    def ordered(v):
        return torch.where(v < 0, -(v & 0x7FFF), v)

    diff = (ordered(ia) - ordered(ib)).abs()
    return int((ia != ib).sum()), int(diff.max()) if diff.numel() else 0


def out_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.int16).cpu().numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Running a sweep
# ----------------------------------------------------------------------------------------------------------------
def run_cases(cases: list[Case], sms: int | None = None, control_sms: int | None = None, variants: bool = True,
              sanity: int = 3, log=print, device: str = "cuda", marlin_factory=None,
              decode_variant: dict | None = None) -> list[dict]:
    """Run ``cases``; returns one result dict per case.

    ``sms``: the SM count given to pdqkit's kernel (default: the device's). ``control_sms``: also run pdqkit's
    kernel with this SM count and record its mismatches (expected > 0 when Marlin used another count).
    ``variants``: on every 3rd case also run another tiling (BLOCK_M 16 <-> 64, i.e. mma.sync vs wgmma, or the
    per-warp-row split toggled): the bits must not change.
    ``device``/``marlin_factory`` exist for a CPU dry run of this harness (interpreter + emulated Marlin).
    """
    from .marlin_schedule import build_schedule
    from .w4a16_marlin import w4a16_gemm_exact

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    marlin_factory = marlin_factory or MarlinWeights
    sms = sms or torch.cuda.get_device_properties(dev).multi_processor_count
    results = []
    key, wts = None, None
    order = sorted(cases, key=lambda c: (c.data, c.n, c.k, c.dtype, c.group, c.id))
    for case in order:
        dtype = DTYPES[case.dtype]
        res = asdict(case)
        res["sms"] = sms
        try:
            if case.data == "exact":
                x, wp, ws, bias = (t.to(dev) if t is not None else None for t in exact_inputs(case))
                wts, key = (wp, ws, marlin_factory(wp, ws, case.group)), None
            else:
                if key != (case.n, case.k, case.dtype, case.group):
                    key, wts = (case.n, case.k, case.dtype, case.group), None
                    if cuda:
                        torch.cuda.empty_cache()
                    wseed = (case.n * 100003 + case.k * 31 + case.group % 1000) % 2**31
                    wp, ws = make_weights(case.n, case.k, case.group, dtype, wseed, dev)
                    wts = (wp, ws, marlin_factory(wp, ws, case.group))
                x, bias = make_activations(case, dtype, dev)
            wp, ws, marlin = wts
            t0 = time.perf_counter()
            ref = marlin(x, bias, case.fp32_reduce)
            out = w4a16_gemm_exact(x, wp, ws, bias, case.fp32_reduce, sms)
            if cuda:
                torch.cuda.synchronize()
            res["seconds"] = round(time.perf_counter() - t0, 4)
            res["mismatches"], res["max_ulp"] = compare(out, ref)
            res["marlin_sha"], res["ours_sha"] = out_hash(ref), out_hash(out)
            g = -1 if case.group in (-1, case.k) else case.group
            res["schedule_sha"] = build_schedule(case.m, case.n, case.k, g, "bfloat16" if dtype == torch.bfloat16
                                                 else "float16", sms).sha256()[:16]
            if variants and case.id % 3 == 0:  # other tilings must give the same bits
                first = build_schedule(case.m, case.n, case.k, g, "bfloat16", sms).launches[0]
                bm = 16 if first.mb <= 16 else 64
                bm, sp = (64 if bm == 16 else 16, None) if case.id % 6 == 0 else (bm, bm != 16)
                alt = w4a16_gemm_exact(x, wp, ws, bias, case.fp32_reduce, sms, block_m=bm, split=sp)
                res["variant"] = f"bm{bm}" + ("" if sp is None else f"-split{int(sp)}")
                res["variant_mismatches"], _ = compare(alt, ref)
            elif variants and case.m <= 16:  # other decode launch shapes (the same bits by design; checked)
                dv = DECODE_VARIANT if decode_variant is None else decode_variant
                alt = w4a16_gemm_exact(x, wp, ws, bias, case.fp32_reduce, sms, **dv)
                res["variant"] = "decode-" + "-".join(f"{k}{v}" for k, v in sorted(dv.items()))
                res["variant_mismatches"], _ = compare(alt, ref)
            if control_sms:
                ctl = w4a16_gemm_exact(x, wp, ws, bias, case.fp32_reduce, control_sms)
                res["control_sms"], (res["control_mismatches"], res["control_max_ulp"]) = control_sms, compare(ctl, ref)
            if case.data == "exact":
                from .marlin_emulate import emulate_marlin

                emu = emulate_marlin(x.cpu(), wp.cpu(), ws.cpu(), bias.cpu() if bias is not None else None,
                                     case.fp32_reduce, sms)
                res["emulation_mismatches"], _ = compare(emu, ref.cpu())
            if sanity > 0:  # both agree with a plain fp32 product of the dequantised weights (not a bit check)
                sanity -= 1
                from pack.packing import dequantize

                w = dequantize(wp, ws, (case.n, case.k)).float()
                full = x.float() @ w.t() + (bias.float() if bias is not None else 0)
                res["rel_err_vs_fp32"] = float((ref.float() - full).norm() / full.norm().clamp_min(1e-30))
        except Exception as exc:  # keep going: one broken case must not hide the others
            res["error"] = f"{type(exc).__name__}: {exc}"[:400]
        results.append(res)
        log(_case_line(res))
    return sorted(results, key=lambda r: r["id"])


def _case_line(r: dict) -> str:
    if "error" in r:
        return f"{r['id']:>5} {r['n']:>5}x{r['k']:<5} M={r['m']:<4} {r['dtype']} g={r['group']:<3} ERROR {r['error']}"
    extra = ""
    if "variant_mismatches" in r:
        extra += f" {r['variant']}:{r['variant_mismatches']}"
    if "control_mismatches" in r:
        extra += f" ctl{r['control_sms']}:{r['control_mismatches']}"
    if "emulation_mismatches" in r:
        extra += f" emu:{r['emulation_mismatches']}"
    return (f"{r['id']:>5} {r['n']:>5}x{r['k']:<5} M={r['m']:<4} {r['dtype']} g={r['group']:<3} "
            f"bias={int(r['bias'])} f32red={int(r['fp32_reduce'])} mism={r['mismatches']:<6} ulp={r['max_ulp']:<3}"
            f"{extra}")


def failures(results: list[dict], sms_rows: list[dict] = ()) -> int:
    """Failing cases, plus failing rows of the SM-count experiment: a worker or shim error, any mismatch, or a shim
    that did not make the worker see the SM count it was asked for (then the experiment showed nothing)."""
    bad = 0
    for r in results:
        bad += int("error" in r or r.get("mismatches", 1) != 0 or r.get("variant_mismatches", 0) != 0
                   or r.get("emulation_mismatches", 0) != 0)
    for r in sms_rows:
        bad += int("error" in r or r.get("mismatches", 1) != 0 or r.get("errors", 1) != 0
                   or r.get("reported_by_shim") != r.get("sms"))
    return bad


def summary(results: list[dict]) -> str:
    rows = {}
    for r in results:
        s = rows.setdefault(r["shape"] or f"{r['n']}x{r['k']}", {"cases": 0, "mism": 0, "ulp": 0, "err": 0,
                                                                   "var": 0, "elems": 0})
        s["cases"] += 1
        s["err"] += int("error" in r)
        s["mism"] += r.get("mismatches", 0)
        s["ulp"] = max(s["ulp"], r.get("max_ulp", 0))
        s["var"] += int("variant_mismatches" in r)
        s["elems"] += r["m"] * r["n"]
    lines = [f"{'shape':<16} {'cases':>5} {'elements':>12} {'mismatches':>10} {'max_ulp':>7} {'tilings':>11} "
             f"{'errors':>6}"]
    for name, s in rows.items():
        lines.append(f"{name:<16} {s['cases']:>5} {s['elems']:>12} {s['mism']:>10} {s['ulp']:>7} {s['var']:>11} "
                     f"{s['err']:>6}")
    tot = {k: sum(s[k] for s in rows.values()) for k in ("cases", "elems", "mism", "var", "err")}
    lines.append(f"{'TOTAL':<16} {tot['cases']:>5} {tot['elems']:>12} {tot['mism']:>10} "
                 f"{max((s['ulp'] for s in rows.values()), default=0):>7} {tot['var']:>11} {tot['err']:>6}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The SM-count experiment
# ----------------------------------------------------------------------------------------------------------------
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
/* LD_PRELOAD shim: cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount = 16) reports $PDQKIT_FAKE_SMS. */
typedef int (*fn_t)(int *, int, int);
int cudaDeviceGetAttribute(int *value, int attr, int device) {
    static fn_t real = 0;
    if (!real) real = (fn_t)dlsym(RTLD_NEXT, "cudaDeviceGetAttribute");
    if (!real) { fprintf(stderr, "sms shim: no real cudaDeviceGetAttribute\n"); abort(); }
    int rc = real(value, attr, device);
    const char *s = getenv("PDQKIT_FAKE_SMS");
    if (rc == 0 && attr == 16 && s && *s) { int v = atoi(s); if (v > 0 && v < *value) *value = v; }
    return rc;
}
"""


def build_shim(directory: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler for the SM-count shim")
    src, lib = os.path.join(directory, "sms_shim.c"), os.path.join(directory, "sms_shim.so")
    with open(src, "w") as f:
        f.write(SHIM_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", lib, src, "-ldl"], check=True, capture_output=True)
    return lib


def sms_experiment(values: list[int], seed: int, log=print) -> list[dict]:
    real = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            shim = build_shim(tmp)
        except Exception as exc:
            log(f"sms experiment skipped: {exc}")
            return [{"error": str(exc)}]
        for v in values:
            path = os.path.join(tmp, f"sms{v}.json")
            env = dict(os.environ, LD_PRELOAD=shim, PDQKIT_FAKE_SMS=str(v))
            cmd = [sys.executable, "-m", "kernels.verify", "--worker-sms", str(v), "--control-sms", str(real),
                   "--seed", str(seed), "--json", path, "--sweep", "reduced", "--no-sms-run"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode not in (0, 1) or not os.path.exists(path):
                out.append({"sms": v, "error": (proc.stderr or proc.stdout)[-800:]})
                log(f"sms={v}: worker failed: {out[-1]['error']}")
                continue
            with open(path) as f:
                rep = json.load(f)
            res = rep["results"]
            row = {"sms": v, "reported_by_shim": rep.get("shim_sms"), "cases": len(res),
                   "mismatches": sum(r.get("mismatches", 0) for r in res),
                   "errors": sum("error" in r for r in res),
                   "control_sms": real,
                   "control_cases_differing": sum(r.get("control_mismatches", 0) > 0 for r in res),
                   "control_mismatches": sum(r.get("control_mismatches", 0) for r in res)}
            out.append(row)
            log(f"sms={v}: shim reports {row['reported_by_shim']}; ours(sms={v}) vs Marlin: {row['mismatches']} "
                f"mismatching elements in {row['cases']} cases ({row['errors']} errors); control ours(sms={real}) "
                f"vs Marlin: {row['control_mismatches']} elements in {row['control_cases_differing']} cases")
    return out


def _shim_sms() -> int | None:
    """SM count as seen through the process's global symbol scope (i.e. through the shim, if preloaded)."""
    try:
        fn = ctypes.CDLL(None).cudaDeviceGetAttribute
    except AttributeError:
        return None
    v = ctypes.c_int(0)
    return v.value if fn(ctypes.byref(v), 16, 0) == 0 else None


# ----------------------------------------------------------------------------------------------------------------
# Golden file
# ----------------------------------------------------------------------------------------------------------------
def golden(results: list[dict], meta: dict) -> dict:
    """Input seeds + output hashes + schedule hashes; ``exact`` cases are re-checked on CPU by the tests."""
    keep = [r for r in results if r.get("data") == "exact"]
    small = [r for r in results if r.get("data") == "random" and r["n"] * r["k"] <= 2**23 and r["m"] <= 256]
    keep += small[:: max(1, len(small) // 40)][:40]
    fields = ("id", "n", "k", "m", "dtype", "group", "bias", "fp32_reduce", "seed", "data", "sms", "schedule_sha",
              "marlin_sha", "mismatches")
    return {"meta": meta, "cases": [{f: r.get(f) for f in fields} for r in keep if "error" not in r]}


def _meta(lib: str) -> dict:
    import triton

    from .vllm_ops import loaded_sha256

    so_sha = loaded_sha256()  # the library actually loaded (not whatever sits at some path)
    props = torch.cuda.get_device_properties(0)
    return {"date": datetime.date.today().isoformat(), "device": props.name, "sms": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "marlin_library": lib,
            "marlin_so_sha256": so_sha, "marlin": "vLLM 0.26.0 _C_stable_libtorch.abi3.so (torch.ops._C.marlin_gemm)"}


def lowering_check() -> dict:
    """Which MMA instructions pass 1 compiles to for BLOCK_M 16 and 64 (mma.sync / wgmma expected on sm_90)."""
    from .w4a16_marlin import LAST_COMPILED, w4a16_gemm_exact

    wp, ws = make_weights(256, 512, 128, torch.bfloat16, 1, "cuda")
    x = torch.randn(64, 512, device="cuda").to(torch.bfloat16)
    out = {}
    for bm in (16, 64):
        w4a16_gemm_exact(x, wp, ws, None, True, block_m=bm)
        ptx = LAST_COMPILED["pass1"].asm["ptx"]
        out[f"BM{bm}"] = [name for name, key in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync.aligned"))
                          if key in ptx]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", choices=("full", "reduced", "none"), default="full")
    ap.add_argument("--sms", type=int, nargs="*", default=[], help="fake SM counts for Marlin (LD_PRELOAD shim)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--golden", help="write the golden file here (tests/golden/marlin_golden.json)")
    ap.add_argument("--quiet", action="store_true", help="no per-case lines")
    ap.add_argument("--max-cases", type=int, default=0)
    ap.add_argument("--decode-variant", type=json.loads, default=DECODE_VARIANT, metavar="JSON",
                    help=f'launch kwargs re-checked on M <= 16 cases (default {json.dumps(DECODE_VARIANT)})')
    ap.add_argument("--worker-sms", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--control-sms", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--no-sms-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.verify needs a CUDA GPU", file=sys.stderr)
        return 2
    from .vllm_ops import load_vllm_ops

    lib = load_vllm_ops()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    cases = {"full": full_cases, "reduced": reduced_cases, "none": lambda seed: []}[args.sweep](args.seed)
    if args.max_cases:
        cases = cases[: args.max_cases]
    report: dict = {"meta": _meta(lib)}
    t0 = time.time()
    if args.worker_sms:
        report["shim_sms"] = _shim_sms()
        results = run_cases(cases, sms=args.worker_sms, control_sms=args.control_sms or None, variants=False,
                            sanity=0, log=log)
    else:
        cases += exact_cases()
        results = run_cases(cases, log=log, decode_variant=args.decode_variant)
        try:
            report["lowering"] = lowering_check()
        except Exception as exc:
            report["lowering"] = f"{type(exc).__name__}: {exc}"
    report["results"] = results
    report["seconds"] = round(time.time() - t0, 1)
    if args.sms and not args.no_sms_run:
        report["sms_experiment"] = sms_experiment(args.sms, args.seed, log=log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.golden:
        with open(args.golden, "w") as f:
            json.dump(golden(results, report["meta"]), f, indent=1)
    bad = failures(results, report.get("sms_experiment", []))
    if not args.worker_sms:
        m = report["meta"]
        print(summary(results))
        print(f"pass-1 MMA lowering: {report.get('lowering')}")
        for row in report.get("sms_experiment", []):
            print(f"sms experiment: {row}")
        print(f"device {m['device']} ({m['sms']} SMs), torch {m['torch']}, triton {m['triton']}, Marlin: {m['marlin']}"
              f" from {lib}; {len(results)} cases in {report['seconds']} s; failing cases: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
