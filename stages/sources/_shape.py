"""Reading the fields of a parsed JSON answer by what they should be, whatever they are.

An API (or a damaged or hand-edited page) may put an array or null where an object belongs, a
number where text belongs, an object where a list of strings belongs. A parser reads each
field through these, so a field of the wrong type counts as absent instead of crashing the
parse or leaking a Python repr ("{'a': 1}") into an example; what a record cannot do without
(its id) the parser checks itself and skips the record, counted (Source.skip).
"""
from __future__ import annotations

import math
from typing import Any


def obj(value: Any) -> dict:
    """An object, or {} for anything else."""
    return value if isinstance(value, dict) else {}


def objs(value: Any) -> list[dict]:
    """The objects of a list ([] for anything but a list)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def text(value: Any, strip: bool = True) -> str:
    """A string, or a number written as one (stripped unless told not to: Markdown's leading spaces mean
    something); "" for null, true/false, lists and objects."""
    if isinstance(value, str):
        return value.strip() if strip else value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return ""


def texts(value: Any) -> list[str]:
    """The non-empty texts of a list (a lone string is a list of one)."""
    values = value if isinstance(value, list) else [value]
    return [t for t in (text(v) for v in values) if t]


def number(value: Any, default: float = 0) -> float:
    """A finite number (not true/false), else `default`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return default


def key(value: Any) -> str | int | None:
    """An id usable as a key (a string or an integer), else None."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None
