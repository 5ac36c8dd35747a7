"""Compile as the runtime would specialise the demo launches (ints ==1 -> constexpr, %16 -> divisibility)."""
import sys, os
sys.path.insert(0, "/tmp/rc-investigate/src"); sys.path.insert(0, "/tmp/rc-investigate/src/bench/gpu")
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from kernels.w4a16_prefill_tma import descriptors
from kernels.w4a16_prefill_wsp import _w4a16_prefill_wsp_kernel as fn
from sass_loop import sass_text
bm, bn, bk, st, m, split_k = [int(a) for a in sys.argv[1:7]]
n, k = 3072, 2560
kb = k // bk; kbps = -(-kb // split_k)
xd, wd = descriptors(torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k // 8, dtype=torch.int32), bm, bn, bk)
const = dict(HAS_BIAS=False, IS_BF16=True, BM=bm, BN=bn, BK=bk, GROUP_SIZE=128, STAGES=st, GROUP_M=8,
             CONSUMER_REGS=232, SPLIT=split_k > 1, STREAM=False)
ints = dict(M=m, N=n, K=k, stride_sn=k // 128, stride_om=n, split_k=split_k, kb_per_split=kbps)
for name, v in ints.items():
    if v == 1: const[name] = 1
sig = {"x_desc": mangle_type(xd), "w_desc": mangle_type(wd), "s_ptr": "*bf16", "bias_ptr": "*bf16",
       "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", **{a: "i32" for a in ints},
       **{name: "constexpr" for name in const}}
args = list(fn.arg_names)
div = ["s_ptr", "bias_ptr", "out_ptr", "ws_ptr", "cnt_ptr"] + [a for a, v in ints.items() if v % 16 == 0]
attrs = {(args.index(a),): [["tt.divisibility", 16]] for a in div}
c = triton.compile(GluonASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
tag = f"exact_bm{bm}_bn{bn}_bk{bk}_st{st}_m{m}_sk{split_k}"
for kk in ("ttgir", "ptx"): open(f"out/{tag}.{kk}", "w").write(c.asm[kk])
open(f"out/{tag}.cubin", "wb").write(c.asm["cubin"]); open(f"out/{tag}.sass", "w").write(sass_text(c))
print(tag, "shared", c.metadata.shared, hex(c.metadata.shared))
