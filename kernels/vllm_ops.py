"""Access to vLLM 0.26.0's compiled W4A16 ops (Marlin, Machete, ...) for verification and benchmarks only.

pdqkit never needs vLLM to run; this loader exists so that ``kernels.verify`` and ``bench/`` can call vLLM's
``torch.ops._C.*`` kernels side by side with ours. Two ways to get them, tried in order:

1. ``import vllm._custom_ops`` when vLLM is installed (registers ``torch.ops._C``);
2. the bare extension ``vllm/_C_stable_libtorch.abi3.so`` taken from the vLLM 0.26.0 wheel, loaded with
   ``torch.ops.load_library``: path in ``$PDQKIT_VLLM_C_SO`` or an xz-compressed copy at
   ``.vso/vllm_C_stable_libtorch.abi3.so.xz`` (carried to the GPU machine; never committed).
"""
from __future__ import annotations

import hashlib
import importlib.util
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import torch

_XZ = Path(__file__).resolve().parent.parent / ".vso" / "vllm_C_stable_libtorch.abi3.so.xz"
_loaded = False
_sha256: str | None = None  # of the library that was loaded (None: not known, or loaded by someone else)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_xz(xz: Path) -> str:
    """Decompress ``xz`` into a fresh private directory (mkdtemp: 0700, a unique name), load it, delete it.

    Never a fixed path in a shared /tmp: another user could plant a library there, a copy from an older xz would
    be reused silently, and two processes decompressing at once would truncate each other's file. The loaded
    mapping outlives the file (unlinking an open shared object is fine on Linux). Returns its sha256."""
    global _sha256
    h = hashlib.sha256()
    tmpdir = tempfile.mkdtemp(prefix="pdqkit-vllm-ops-")
    try:
        so = os.path.join(tmpdir, "_C_stable_libtorch.abi3.so")
        with lzma.open(xz) as src, open(so, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 24), b""):
                h.update(chunk)
                dst.write(chunk)
        torch.ops.load_library(so)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    _sha256 = h.hexdigest()
    return f"{xz} (sha256 {_sha256[:12]}...)"


def loaded_sha256() -> str | None:
    """sha256 of the vLLM ops library this process loaded through :func:`load_vllm_ops`: the installed vLLM's
    ``_C_stable_libtorch.abi3.so``, ``$PDQKIT_VLLM_C_SO`` or the decompressed xz copy (None if unknown)."""
    return _sha256


def load_vllm_ops() -> str:
    """Make ``torch.ops._C.marlin_gemm`` & co. available; returns where they came from. Raises if impossible."""
    global _loaded, _sha256
    if _loaded or hasattr(torch.ops._C, "marlin_gemm"):
        _loaded = True
        return "already loaded"
    spec = importlib.util.find_spec("vllm")
    if spec is not None:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

        lib = Path(spec.origin).parent / "_C_stable_libtorch.abi3.so"
        _sha256 = _sha256_file(str(lib)) if lib.is_file() else None
        _loaded = True
        return "vllm " + __import__("vllm").__version__
    so = os.environ.get("PDQKIT_VLLM_C_SO")
    if so:
        torch.ops.load_library(so)
        _sha256 = _sha256_file(so)
        _loaded = True
        return so
    if _XZ.exists():
        where = _load_xz(_XZ)
        _loaded = True
        return where
    raise RuntimeError("vLLM ops unavailable: install vllm==0.26.0, or set PDQKIT_VLLM_C_SO to its "
                       "_C_stable_libtorch.abi3.so, or place the xz copy at " + str(_XZ))
