"""CPU test of bench/gpu/read_pattern.py's two read-only kernels (Triton interpreter, in a subprocess).

A bandwidth probe is only worth its number if it reads every byte it claims to: each program's XOR must equal a
numpy XOR of exactly the words it was given (tile kernel: its rows over its split's K blocks; flat kernel: its
contiguous chunk). Words are random, so a skipped or doubled word changes the XOR.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    import triton
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {repo!r} + "/bench/gpu")
    import read_pattern as rp

    rng = np.random.default_rng(0)
    n, k = 96, 1024
    kw = k // 8
    w_np = rng.integers(-2**31, 2**31 - 1, size=(n, kw), dtype=np.int64).astype(np.int32)
    w = torch.from_numpy(w_np)
    for bn, bk, split in ((32, 256, 2), (16, 128, 3), (32, 1024, 1)):
        wpb, kb_total = bk // 8, k // bk
        kbs = triton.cdiv(kb_total, split)
        grid = (triton.cdiv(n, bn), triton.cdiv(kb_total, kbs))
        out = torch.zeros(grid[1] * n, dtype=torch.int32)
        rp._tile_read[grid](w, out, n, kw, kbs, kb_total, BLOCK_N=bn, WPB=wpb)
        for s in range(grid[1]):
            lo, hi = s * kbs * wpb, min((s + 1) * kbs, kb_total) * wpb
            ref = np.bitwise_xor.reduce(w_np[:, lo:hi], axis=1)
            assert np.array_equal(out[s * n:(s + 1) * n].numpy(), ref), (bn, bk, split, s)
    flat = w.reshape(-1)
    for progs, block in ((4, 256), (12, 128)):
        wpp = flat.numel() // progs
        out = torch.zeros(progs, dtype=torch.int32)
        rp._flat_read[(progs,)](flat, out, wpp, BLOCK=block)
        ref = np.bitwise_xor.reduce(w_np.reshape(progs, wpp), axis=1)
        assert np.array_equal(out.numpy(), ref), (progs, block)
    print("OK")
""")


def test_read_pattern_kernels_read_every_word_once():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(repo=str(REPO))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
