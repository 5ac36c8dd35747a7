"""Call 6 (twenty-ninth session), as run from the repository root: HEAD's kernels/w4a16_prefill_wsp.py (before
stream-K) saved as kernels/_old_wsp.py beside the first stream-K version (v1), the same tilings timed in one process.
Kept as a record; kernels/_old_wsp.py was not committed."""
import math, sys, torch
from kernels.w4a16_autotune import graph_time_us, rotated_problem, check_tolerance
from kernels._old_wsp import w4a16_prefill_wsp as old
from kernels.w4a16_prefill_wsp import w4a16_prefill_wsp as new
dt = torch.bfloat16
for (n, k), m, bm, bn, st in (((16384, 2560), 1024, 256, 128, 3), ((16384, 2560), 1024, 256, 128, 2),
                              ((8192, 8192), 1024, 256, 128, 3), ((8192, 8192), 1024, 256, 128, 2),
                              ((3072, 2560), 256, 128, 64, 5), ((2560, 8192), 256, 128, 64, 5),
                              ((16384, 2560), 256, 256, 128, 3), ((2560, 2048), 1024, 256, 128, 3)):
    wps, ss, nb = rotated_problem(n, k, dt, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dt)
    calls = {tag: (lambda i, f=f: f(x, wps[i % len(wps)], ss[i % len(ss)], None, 128, block_m=bm, block_n=bn,
                                    block_k=128, num_stages=st)) for tag, f in (("old", old), ("new", new))}
    assert torch.equal(calls["old"](0), calls["new"](0))
    t = {tag: math.inf for tag in calls}
    for order in (("old", "new"), ("new", "old"), ("old", "new")):
        for tag in order:
            t[tag] = min(t[tag], graph_time_us(calls[tag], len(wps), replays=5))
    print(f"{n}x{k} M={m} bm{bm} bn{bn} st{st}: old {t['old']:7.2f} new {t['new']:7.2f} new/old speed x{t['old']/t['new']:.3f}", flush=True)
