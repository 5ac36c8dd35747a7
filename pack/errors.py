"""The one exception type for expected, user-fixable problems of ``pack.quantize``, and the exit statuses of
pdqkit's command lines.

A :class:`QuantizeError` message is one line that names the file or tensor at fault and says how to fix it;
the CLI prints it without a traceback and exits with status 2. Anything else is a bug and keeps its traceback.
``prune`` and ``distill`` report their own errors in one line too, with the same statuses (:func:`cli_status`).
"""
from __future__ import annotations

__all__ = ["QuantizeError", "cli_status"]


class QuantizeError(Exception):
    """Bad input or options: the message names the file/tensor and the fix."""


def cli_status(e: BaseException) -> int:
    """Exit status of ``python -m prune`` and ``python -m distill`` for an error they report in one line, by
    ``pack.quantize``'s rule: 2 when the input or the invocation is at fault (a ValueError from a check, a path
    that does not exist, an output that does: FileNotFoundError / FileExistsError, which their checks raise),
    1 when the machine is (any other OSError: disk full, permission denied; a RuntimeError: out of memory)."""
    return 2 if isinstance(e, (QuantizeError, ValueError, FileNotFoundError, FileExistsError)) else 1
