"""What the environment says about how the kernels run (import-light: no torch, no triton)."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """``TRITON_INTERPRET`` read the way Triton 3.6 and 3.9 read it (1 / true / yes / on / y, any case, no
    surrounding blanks; anything else is off; checked against ``triton.knobs.runtime.interpret``):
    the kernels then run in Triton's CPU interpreter, where inline PTX cannot run and bf16 is emulated."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


TABLE_ENV = "PDQKIT_W4A16_TABLE"
CENSUS_ENV = "PDQKIT_W4A16_CENSUS"


def table_override() -> str | None:
    """``$PDQKIT_W4A16_TABLE``: the path of a tuned table (``python -m kernels.w4a16_autotune --out FILE``) to use
    instead of the packaged ``kernels/configs/<GPU>.json``; None when unset or empty."""
    return os.environ.get(TABLE_ENV, "").strip() or None


CENSUS_ON, CENSUS_OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def census_enabled() -> bool:
    """``$PDQKIT_W4A16_CENSUS`` (1 / true / yes / on, any case): :func:`kernels.w4a16.census` counts every launch;
    unset, empty, 0 / false / no / off: it does not. Anything else is a ValueError naming the variable: a typo
    (``=enable``) would otherwise give an empty census that reads as "no kernel of ours ran"."""
    raw = os.environ.get(CENSUS_ENV, "")
    v = raw.strip().lower()
    if v not in CENSUS_ON + CENSUS_OFF:
        raise ValueError(f"{CENSUS_ENV}={raw!r}: use 1 / true / yes / on to count launches, 0 / false / no / off "
                         f"or unset for none")
    return v in CENSUS_ON
