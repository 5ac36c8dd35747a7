"""``gc_paused()``: the cyclic garbage collector off for a block (import-light: used before torch is imported).

Importing torch and transformers and building the meta model create ~10^6 objects that all live to the end of a
``pack.quantize`` run and hardly any garbage (~10^4 small objects, no tensor memory); the collector would traverse
them again and again (~0.5 s of CPU, a fifth of the import time). Nested use is fine: the outer state is restored.
"""
from __future__ import annotations

import contextlib
import gc

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
