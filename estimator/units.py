"""Bytes are integers everywhere; units live here and only here.

Parsing follows pytest-memray's ``parse_memory_string``: a number and a unit, unknown
units rejected with a message that lists the valid ones. GiB = 2**30, GB = 10**9
(IEC 80000-13 binary vs SI decimal prefixes), never mixed.
"""
from __future__ import annotations

import re

GiB = 2**30
MiB = 2**20
KiB = 2**10
GB = 10**9

#: Bytes of one element: float32 (softmax and norm statistics, loss upcasts, fp32 states)
#: and the 16-bit types (fp16, bf16).
FP32 = 4
HALF = 2
#: Parameter counts in billions, as the rules of thumb speak (a count, not bytes).
BILLION = 10**9

#: Unit -> bytes. Binary (IEC) and decimal (SI) prefixes, case-insensitive on input.
UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """``"24GiB"`` -> 25769803776. A bare number is bytes. Raises ``ValueError``."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(
            f"cannot read {text!r} as a size: write a number and a unit, e.g. 24GiB or 80GB"
        )
    number, unit = match.groups()
    unit = unit.lower() or "b"
    if unit not in UNITS:
        valid = ", ".join(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
        raise ValueError(f"unknown size unit {match.group(2)!r} in {text!r}; valid units: {valid}")
    try:
        return int(round(float(number) * UNITS[unit]))
    except OverflowError:  # float("9" * 400) is infinity: no integer holds it
        raise ValueError(f"size {text!r} is too large to be a number of bytes") from None


def format_gib(n_bytes: int, digits: int = 2) -> str:
    """``format_gib(2**31)`` -> ``"2.00 GiB"``."""
    return f"{n_bytes / GiB:.{digits}f} GiB"


def format_bytes(n_bytes: int) -> str:
    """Human size with binary units: B, KiB, MiB, GiB, TiB."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
