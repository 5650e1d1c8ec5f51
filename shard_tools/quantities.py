"""Counts and sizes as users write them, with one rule for every tool.

The rule: **K, M, G, T are powers of 1000** and **KiB, MiB, GiB, TiB are powers of 1024**.
- Counts (`--unique-samples`, `--budget-samples`, `--shard-size`, ...): `12000`, `500K`, `1M`, `2.5B`
  (B = G = 10^9, a billion samples), `1e6`; where a pool is known, also a fraction of it (`0.1`, `10%`).
- Sizes (`--shard-bytes`, `--cache-size`, ...): `1G` = `1GB` = 10^9 bytes, `500MB` = 5 x 10^8, `2GiB` =
  2 x 2^30, `4096` = 4096 bytes; a trailing `B` is optional and letters may be lower case (`1.5k`).
So `1G` means 10^9 everywhere, as `1M` samples means 10^6; sizes print in the same decimal units
(`format_bytes(1.5e9)` is `1.5 GB`), so a printed size can be passed back as an option.

Parsing is exact (decimal arithmetic), so `1.1M` is 1100000, not a float that is "not a whole number".
"""

from __future__ import annotations

import argparse
import math
from decimal import Decimal, InvalidOperation

# Shown in the --help of every option that takes a count or a size.
COUNT_HELP = "a count: 12000, 500K, 1M, 2.5B (K, M, G/B, T are powers of 1000)"
SIZE_HELP = "a size: 1G = 10^9 bytes, 500MB, 2GiB = 2x2^30 (K, M, G, T are powers of 1000; KiB, MiB, GiB, TiB " \
            "of 1024)"

_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_COUNT_SUFFIXES = {**_DECIMAL, "B": 10**9}  # counts: B is a billion samples
_BINARY = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def _bad(text, what: str) -> ValueError:
    return ValueError(
        f"{what}: cannot read {text!r}; write a count (12000, 500K, 1M, 2.5B) or a fraction of the pool (0.1, 10%)"
    )


def _count_value(text, what: str) -> tuple[Decimal, bool]:
    """(value, is a fraction) of a count as written."""
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number, got {text!r}")
    if isinstance(text, int):
        return Decimal(text), False
    if isinstance(text, float):
        if not math.isfinite(text):
            raise ValueError(f"{what}: must be positive, got {text!r}")
        return Decimal(repr(text)), text <= 1.0
    s = str(text).strip().replace("_", "").replace(",", "")
    if not s:
        raise ValueError(f"{what}: empty value")
    try:
        if s.endswith("%"):
            value, fraction = Decimal(s[:-1]) / 100, True
        elif s[-1].upper() in _COUNT_SUFFIXES:
            value, fraction = Decimal(s[:-1]) * _COUNT_SUFFIXES[s[-1].upper()], False
        else:
            value = Decimal(s)
            fraction = "." in s and "e" not in s.lower() and value <= 1
    except InvalidOperation:
        raise _bad(text, what) from None
    if not value.is_finite():
        raise _bad(text, what)
    return value, fraction


def parse_count(text: str | int | float, available: int | None = None, what: str = "count") -> int:
    """Turn `text` into a sample count.

    Integers, suffixed numbers (`500K`, `2.5B`) and exponents (`1e6`) are counts. A number written with a
    decimal point in (0, 1] (`0.1`, `1.0`), a Python float <= 1, or a percentage (`10%`) is a fraction of
    `available`, rounded down, at least 1. `what` names the option in error messages.
    """
    value, fraction = _count_value(text, what)
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


def parse_bytes(text: str | int | None, what: str = "size") -> int | None:
    """`1G` (10^9), `500MB`, `2GiB` (2 x 2^30), `1.5k`, `4096` -> bytes; None or "" -> None. See the module
    doc for the rule. `what` names the option in error messages."""
    if text is None or text == "":
        return None
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a size, got {text!r}")
    if isinstance(text, int):
        value = Decimal(text)
    else:
        s = str(text).strip().upper().replace("_", "")
        s = s[:-1] if s.endswith("B") else s
        scale = 1
        for table in (_BINARY, _DECIMAL):
            suffix = next((k for k in table if s.endswith(k)), None)
            if suffix:
                s, scale = s[: -len(suffix)], table[suffix]
                break
        try:
            value = Decimal(s.strip()) * scale
        except InvalidOperation:
            raise ValueError(f"{what}: cannot read a size from {text!r}; write e.g. 1G, 500MB, 2GiB") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{what}: a size must be >= 0, got {text!r}")
    return int(value)


def count_arg(text: str) -> int:
    """argparse type for a count of samples (>= 1, no fraction): `1000`, `1K`, `2.5M`."""
    try:
        value, fraction = _count_value(text, "count")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("count: ")) from None
    if fraction or value < 1 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected a whole count >= 1 (1000, 1K, 2.5M), got {text!r}")
    return int(value)


def size_arg(text: str) -> int:
    """argparse type for a size in bytes: `1G`, `500MB`, `2GiB`."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def format_count(n: int) -> str:
    """Short human form: 1234567 -> '1.23M'."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            v = n / scale
            return f"{v:.3g}{suffix}"
    return str(n)


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """A count with its noun, singular for exactly one: plural(1, "shard") is '1 shard', plural(0, "shard") '0
    shards'. `nouns` is the plural form where adding an s is wrong (plural(2, "class", "classes"))."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def format_bytes(n: float) -> str:
    """In the units `parse_bytes` reads back: 1500 -> '1.5 KB', 2.5e9 -> '2.5 GB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
