"""What the environment says about how the kernels run (import-light: no torch, no triton)."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """``TRITON_INTERPRET`` read the way Triton reads it (1 / true / yes / on, any case; anything else is off):
    the kernels then run in Triton's CPU interpreter, where inline PTX cannot run and bf16 is emulated."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
