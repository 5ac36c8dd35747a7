"""Access to vLLM 0.26.0's compiled W4A16 ops (Marlin, Machete, ...) for verification and benchmarks only.

pdqkit never needs vLLM to run; this loader exists so that ``kernels.verify`` and ``bench/`` can call vLLM's
``torch.ops._C.*`` kernels side by side with ours. Two ways to get them, tried in order:

1. ``import vllm._custom_ops`` when vLLM is installed (registers ``torch.ops._C``);
2. the bare extension ``vllm/_C_stable_libtorch.abi3.so`` taken from the vLLM 0.26.0 wheel, loaded with
   ``torch.ops.load_library``: path in ``$PDQKIT_VLLM_C_SO`` or an xz-compressed copy at
   ``.vso/vllm_C_stable_libtorch.abi3.so.xz`` (carried to the GPU machine; never committed).
"""
from __future__ import annotations

import importlib.util
import lzma
import os
import shutil
from pathlib import Path

import torch

_XZ = Path(__file__).resolve().parent.parent / ".vso" / "vllm_C_stable_libtorch.abi3.so.xz"
_loaded = False


def load_vllm_ops() -> str:
    """Make ``torch.ops._C.marlin_gemm`` & co. available; returns where they came from. Raises if impossible."""
    global _loaded
    if _loaded or hasattr(torch.ops._C, "marlin_gemm"):
        _loaded = True
        return "already loaded"
    if importlib.util.find_spec("vllm") is not None:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

        _loaded = True
        return "vllm " + __import__("vllm").__version__
    so = os.environ.get("PDQKIT_VLLM_C_SO")
    if not so and _XZ.exists():
        so = "/tmp/pdqkit_vllm_C_stable_libtorch.abi3.so"
        if not os.path.exists(so):
            with lzma.open(_XZ) as src, open(so + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            os.replace(so + ".part", so)
    if not so:
        raise RuntimeError("vLLM ops unavailable: install vllm==0.26.0, or set PDQKIT_VLLM_C_SO to its "
                           "_C_stable_libtorch.abi3.so, or place the xz copy at " + str(_XZ))
    torch.ops.load_library(so)
    _loaded = True
    return so
