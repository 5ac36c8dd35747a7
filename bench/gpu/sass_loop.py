"""Compile the GEMV kernels ahead of time for sm_90a on any machine (no GPU) and count their K loop's SASS.

``python bench/gpu/sass_loop.py [--kernel gemv|gemv_mma|gemv_mma8|gemv_tma|prefill_tma|prefill_wsp] [--block-m 1]
[--block-n 16] [--block-k 1024] [--warps 4] [--stages 2] [--chain]`` prints the registers per thread, the K loop's
instruction count, instructions per int32 word, the top opcodes, and the barriers and shared-memory instructions
inside the loop. It uses Triton's own ``ptxas`` / ``nvdisasm`` (shipped with the triton wheel), so the figures are
those of the installed Triton version: kernels/README.md's come from Triton 3.6.0 (the GPU image's). The loop is the
code between the back-edge label and its branch.

``--kernel gemv_tma`` compiles the TMA-fed GEMV (:mod:`kernels.w4a16_gemv_tma`; ``--stages``: its ring slots) and
counts the K loop like the other GEMVs.

``--kernel prefill_tma`` (or ``prefill_wsp``, the warp-specialised one) compiles a Gluon prefill kernel instead
(``--stages``: its ring slots, ``--split``: its split-K variant) and prints whole-kernel facts: the wgmma form,
waits, barriers and spills.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_SIG_COMMON = {"x_ptr": "*i32", "w_ptr": "*i32", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
               "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_om": "i32",
               "SPLIT_K": "i32", "KB_PER_SPLIT": "i32"}


def compile_gemv(kernel: str, block_m: int, block_n: int, block_k: int, num_warps: int, dtype: str = "bf16",
                 group: int = 128, prefetch: int = 1, chain: bool = False, split: bool = False):
    """The compiled kernel (``triton.compile`` for CUDA sm_90, pointers and strides 16-divisible as at run time);
    ``split``: its split-K variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel == "gemv":
        from kernels.w4a16_gemv import _w4a16_gemv_kernel as fn
        extra = dict(USE_ASM=True, EMU_RN=False)
    elif kernel == "gemv_mma":
        from kernels.w4a16_gemv_mma import _w4a16_gemv_mma_kernel as fn
        extra = dict(CHAIN=chain)
    else:
        from kernels.w4a16_gemv_mma8 import CHUNK_K, _w4a16_gemv_mma8_kernel as fn
        extra = dict(CHAIN=chain, NGC=CHUNK_K // group if group < CHUNK_K else 1)
    if kernel != "gemv_mma8":
        extra["NG"] = block_k // group if group < block_k else 1
    const = dict(HAS_BIAS=False, IS_BF16=dtype == "bf16", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                 GROUP_SIZE=group, PREFETCH=prefetch, SPLIT=split, **extra)
    sig = {name: ("constexpr" if name in const else _SIG_COMMON.get(name, f"*{dtype}")) for name in fn.arg_names}
    args = list(fn.arg_names)
    attrs = {(args.index(a),): [["tt.divisibility", 16]] for a in
             ("x_ptr", "w_ptr", "s_ptr", "bias_ptr", "out_ptr", "K", "stride_xm", "stride_wn", "stride_om")}
    src = ASTSource(fn, sig, const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))


def compile_prefill_tma(block_m: int, block_n: int, block_k: int, num_stages: int, dtype: str = "bf16",
                        group: int = 128, k: int = 2560, split: bool = False, wsp: bool = False,
                        stream: bool = False):
    """A Gluon prefill kernel compiled for CUDA sm_90 (its TMA descriptors' types taken from descriptors built on CPU
    tensors of the launch's shapes): :mod:`kernels.w4a16_prefill_tma`, or with ``wsp`` the warp-specialised
    :mod:`kernels.w4a16_prefill_wsp` (``block_n`` 128: two 64-row halves; 64: two K halves); ``split``: the serial
    split-K variant; ``stream``: ``prefill_wsp``'s stream-K variant."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from kernels.w4a16_prefill_tma import _w4a16_prefill_tma_kernel, descriptors
    from kernels.w4a16_prefill_wsp import _w4a16_prefill_wsp_kernel

    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    xd, wd = descriptors(torch.zeros(block_m, k, dtype=tdt), torch.zeros(block_n, k // 8, dtype=torch.int32),
                         block_m, block_n, block_k)
    const = dict(HAS_BIAS=False, IS_BF16=dtype == "bf16", BM=block_m, BK=block_k, GROUP_SIZE=group,
                 STAGES=num_stages, GROUP_M=8, SPLIT=split)
    const["BN"] = block_n
    if wsp:
        fn, const["CONSUMER_REGS"], const["STREAM"] = _w4a16_prefill_wsp_kernel, 232, stream
    else:
        fn = _w4a16_prefill_tma_kernel
    sig = {"x_desc": mangle_type(xd), "w_desc": mangle_type(wd), "s_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
           "out_ptr": f"*{dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "stride_sn": "i32", "stride_om": "i32", "split_k": "i32", "kb_per_split": "i32",
           **{name: "constexpr" for name in const}}
    args = list(fn.arg_names)
    attrs = {(args.index(a),): [["tt.divisibility", 16]] for a in ("s_ptr", "bias_ptr", "out_ptr", "K", "stride_om")}
    return triton.compile(GluonASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4 if wsp else block_n // 16))


def compile_gemv_tma(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
                     dtype: str = "bf16", group: int = 128, k: int = 2560, bias: bool = False):
    """The TMA-fed GEMV (:mod:`kernels.w4a16_gemv_tma`) compiled for CUDA sm_90 (its word descriptor's type taken
    from a descriptor built on a CPU tensor of the launch's shape); ``group`` 0: channelwise."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from kernels.w4a16_gemv_tma import _w4a16_gemv_tma_kernel as fn, word_descriptor

    wd = word_descriptor(torch.zeros(block_n, k // 8, dtype=torch.int32), block_n, block_k)
    const = dict(HAS_BIAS=bias, IS_BF16=dtype == "bf16", BM=block_m, BN=block_n, BK=block_k, GROUP_SIZE=group,
                 STAGES=num_stages)
    sig = {"w_desc": mangle_type(wd), "x_ptr": "*i32", "s_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
           "out_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_sn": "i32",
           "stride_om": "i32", **{name: "constexpr" for name in const}}
    args = list(fn.arg_names)
    attrs = {(args.index(a),): [["tt.divisibility", 16]] for a in
             ("x_ptr", "s_ptr", "bias_ptr", "out_ptr", "K", "stride_xm", "stride_om")}
    return triton.compile(GluonASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def sass_text(compiled) -> str:
    """nvdisasm of the compiled kernel's cubin."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def prefill_tma_stats(compiled) -> dict:
    """Whole-kernel SASS facts of the Gluon prefill kernel: its wgmma instructions (``hgmma``: all, ``hgmma_reg_a``:
    with the A operand in registers), the wgmma waits (``waits``: their ``gsb0`` thresholds), CTA barriers, and
    local-memory traffic (``local``: spills)."""
    sass = sass_text(compiled)
    return {"hgmma": len(re.findall(r"\bHGMMA\.", sass)),
            "hgmma_reg_a": len(re.findall(r"\bHGMMA\.\w+\.F32(?:\.BF16)? R\d+, R\d+, gdesc", sass)),
            "waits": re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x\d+)", sass),
            "barriers": len(re.findall(r"\bBAR\.SYNC", sass)),
            "local": len(re.findall(r"\b(?:LDL|STL)\b", sass))}


def loop_stats(compiled, needle: str | None = None) -> dict:
    """SASS of the K loop: ``{"instructions", "opcodes" (Counter), "sequence" (the opcodes in order), "barriers",
    "shared"}``. The loop is the longest backward branch, or with ``needle`` (an opcode, e.g. ``"HMMA"``) the one
    whose body holds the most of it, the earliest-starting among those (the Gluon kernels' out-of-line mbarrier
    retry paths branch back to the wait inside the loop, from past the epilogue)."""
    lines = sass_text(compiled).splitlines()
    branches = [(i, m.group(1)) for i, ln in enumerate(lines) for m in [re.search(r"BRA `\((\.L_x_\d+)\)", ln)] if m]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\.L_x_\d+:$", ln)}
    back = [(labels[lab], i) for i, lab in branches if lab in labels and labels[lab] < i]
    if not back:
        raise RuntimeError("no backward branch: the kernel has no loop")

    def opcodes(start, end):
        return [m.group(1) for ln in lines[start:end]
                for m in [re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", ln)] if m]
    if needle is None:
        start, end = max(back, key=lambda se: se[1] - se[0])
    else:
        # the loop proper starts first: a retry path's back edge lands on the mbarrier wait inside it
        start, end = max(back, key=lambda se: (opcodes(*se).count(needle), -se[0], se[0] - se[1]))
    ops = opcodes(start, end)
    c = collections.Counter(ops)
    return {"instructions": len(ops), "opcodes": c, "sequence": ops, "barriers": c["BAR"],
            "shared": sum(v for k, v in c.items() if k in ("LDS", "STS", "LDSM", "STSM"))}


def registers(compiled) -> int:
    """Registers per thread of the compiled kernel (``cuobjdump -res-usage`` of its cubin): what limits how many
    warps an SM holds (65,536 registers per SM)."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("gemv", "gemv_mma", "gemv_mma8", "gemv_tma", "prefill_tma", "prefill_wsp"),
                    default="gemv_mma")
    ap.add_argument("--split", action="store_true", help="the split-K variant")
    ap.add_argument("--block-m", type=int, default=1)
    ap.add_argument("--block-n", type=int, help="default: 16 (GEMVs), 64 (prefill_tma), 128 (prefill_wsp)")
    ap.add_argument("--block-k", type=int, default=1024)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--stages", type=int, default=2, help="register pipeline depth (prefetch = stages - 1)")
    ap.add_argument("--chain", action="store_true", help="gemv_mma: one accumulator set per 4-word vector")
    args = ap.parse_args()
    if args.block_n is None:
        args.block_n = {"prefill_tma": 64, "prefill_wsp": 128}.get(args.kernel, 16)
    if args.kernel in ("prefill_tma", "prefill_wsp"):   # --block-m/n/k, --stages: the ring slots
        wsp = args.kernel == "prefill_wsp"
        if args.block_n not in (64, 128):
            ap.error(f"--kernel {args.kernel} needs --block-n 64 or 128, got {args.block_n}")
        compiled = compile_prefill_tma(args.block_m, args.block_n, args.block_k, args.stages, args.dtype,
                                       split=args.split, wsp=wsp)
        print(f"{args.kernel} bm{args.block_m} bn{args.block_n} bk{args.block_k} st{args.stages} {args.dtype}: "
              f"{registers(compiled)} registers; whole kernel: {prefill_tma_stats(compiled)}")
        return 0
    if args.kernel == "gemv_tma":   # --stages: the ring slots
        compiled = compile_gemv_tma(args.block_m, args.block_n, args.block_k, args.warps, args.stages, args.dtype)
        st = loop_stats(compiled, "HMMA")
    else:
        compiled = compile_gemv(args.kernel, args.block_m, args.block_n, args.block_k, args.warps, args.dtype,
                                prefetch=args.stages - 1, chain=args.chain, split=args.split)
        st = loop_stats(compiled)
    words = args.block_n * args.block_k // 8 // (32 * args.warps)
    print(f"{args.kernel} bm{args.block_m} bn{args.block_n} bk{args.block_k} w{args.warps} {args.dtype}: "
          f"{registers(compiled)} registers, {st['instructions']} loop instructions, {words} words per thread, "
          f"{st['instructions'] / words:.1f} per word; barriers {st['barriers']}, shared-memory ops {st['shared']}; "
          f"top {dict(st['opcodes'].most_common(10))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
