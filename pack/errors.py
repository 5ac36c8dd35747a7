"""The one exception type for expected, user-fixable problems of ``pack.quantize``.

A :class:`QuantizeError` message is one line that names the file or tensor at fault and says how to fix it;
the CLI prints it without a traceback and exits with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["QuantizeError"]


class QuantizeError(Exception):
    """Bad input or options: the message names the file/tensor and the fix."""
