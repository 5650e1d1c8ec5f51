"""Sample counts as users write them: `1M`, `500K`, `2.5B`, `12000`, or a fraction of a pool (`0.1`, `10%`)."""

from __future__ import annotations

import math

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str | int | float, available: int | None = None, what: str = "count") -> int:
    """Turn `text` into a sample count.

    Integers and suffixed numbers are counts. A number with a decimal point in (0, 1], or a percentage,
    is a fraction of `available` (rounded down, at least 1). `what` names the option in error messages.
    """
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number, got {text!r}")
    if isinstance(text, int):
        value, fraction = float(text), False
    elif isinstance(text, float):
        value, fraction = text, text <= 1.0
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        if not s:
            raise ValueError(f"{what}: empty value")
        fraction = False
        try:
            if s.endswith("%"):
                value, fraction = float(s[:-1]) / 100.0, True
            elif s[-1].upper() in _SUFFIXES:
                value = float(s[:-1]) * _SUFFIXES[s[-1].upper()]
            elif "." in s or "e" in s.lower():
                value = float(s)
                fraction = value <= 1.0 and "." in s
            else:
                value = float(int(s))
        except ValueError:
            raise ValueError(
                f"{what}: cannot read {text!r}; write a count (12000, 500K, 1M, 2.5B) "
                "or a fraction of the pool (0.1, 10%)"
            ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}: must be positive, got {text!r}")
    if fraction:
        if available is None:
            raise ValueError(f"{what}: {text!r} is a fraction, but the pool size is unknown here")
        if value > 1.0:
            raise ValueError(f"{what}: fraction {text!r} is above 1")
        return max(1, math.floor(value * available + 1e-9))
    if value != math.floor(value):
        raise ValueError(f"{what}: {text!r} is not a whole number of samples")
    return int(value)


def format_count(n: int) -> str:
    """Short human form: 1234567 -> '1.23M'."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            v = n / scale
            return f"{v:.3g}{suffix}"
    return str(n)
