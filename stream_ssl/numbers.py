"""Sample counts as users write them: `1M`, `500K`, `2.5B`, `12000`, `1e6`, or a fraction of a pool
(`0.1`, `10%`).

Parsing is exact (decimal arithmetic), so `1.1M` is 1100000, not a float that is "not a whole number".
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def _bad(text, what: str) -> ValueError:
    return ValueError(
        f"{what}: cannot read {text!r}; write a count (12000, 500K, 1M, 2.5B) or a fraction of the pool (0.1, 10%)"
    )


def parse_count(text: str | int | float, available: int | None = None, what: str = "count") -> int:
    """Turn `text` into a sample count.

    Integers, suffixed numbers (`500K`, `2.5B`) and exponents (`1e6`) are counts. A number written with a
    decimal point in (0, 1] (`0.1`, `1.0`), a Python float <= 1, or a percentage (`10%`) is a fraction of
    `available`, rounded down, at least 1. `what` names the option in error messages.
    """
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number, got {text!r}")
    fraction = False
    if isinstance(text, int):
        value = Decimal(text)
    elif isinstance(text, float):
        if not math.isfinite(text):
            raise ValueError(f"{what}: must be positive, got {text!r}")
        value, fraction = Decimal(repr(text)), text <= 1.0
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        if not s:
            raise ValueError(f"{what}: empty value")
        try:
            if s.endswith("%"):
                value, fraction = Decimal(s[:-1]) / 100, True
            elif s[-1].upper() in _SUFFIXES:
                value = Decimal(s[:-1]) * _SUFFIXES[s[-1].upper()]
            else:
                value = Decimal(s)
                fraction = "." in s and "e" not in s.lower() and value <= 1
        except InvalidOperation:
            raise _bad(text, what) from None
        if not value.is_finite():
            raise _bad(text, what)
    if value <= 0:
        raise ValueError(f"{what}: must be positive, got {text!r}")
    if fraction:
        if available is None:
            raise ValueError(f"{what}: {text!r} is a fraction, but the pool size is unknown here")
        if value > 1:
            raise ValueError(f"{what}: fraction {text!r} is above 1")
        return max(1, int(value * available))  # Decimal product is exact: floor without float error
    if value != value.to_integral_value():
        raise ValueError(f"{what}: {text!r} is not a whole number of samples")
    return int(value)


def format_count(n: int) -> str:
    """Short human form: 1234567 -> '1.23M'."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            v = n / scale
            return f"{v:.3g}{suffix}"
    return str(n)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def parse_bytes(text: str | int | None) -> int | None:
    """`20G`, `512M`, `1.5T`, `100000` -> bytes (binary multiples for K/M/G/T, optional trailing B/iB)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("_", "")
    if s.endswith("IB"):
        s = s[:-2]
    elif s.endswith("B"):
        s = s[:-1]
    scale = 1
    if s and s[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(s[-1]) + 1)
        s = s[:-1]
    try:
        value = Decimal(s) * scale
    except InvalidOperation:
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 20G, 512M, 1.5T") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return int(value)
