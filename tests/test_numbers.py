"""Counts and sizes as users write them."""

from __future__ import annotations

import pytest

from stream_ssl.numbers import format_bytes, format_count, parse_bytes, parse_count


@pytest.mark.parametrize("text, available, want", [
    ("12000", None, 12000), ("500K", None, 500_000), ("500k", None, 500_000), ("1M", None, 10**6),
    ("1.1M", None, 1_100_000), ("2.5B", None, 2_500_000_000), ("1e6", None, 10**6), ("1_000", None, 1000),
    ("1,000", None, 1000), (7, None, 7), (2.0, None, 2),
    ("0.1", 1000, 100), ("10%", 1000, 100), ("1.0", 999, 999), ("0.333", 1000, 333), (0.25, 10, 2),
    ("0.0001", 100, 1), ("100%", 37, 37), ("0.07", 100, 7),
])
def test_parse_count(text, available, want):
    assert parse_count(text, available) == want


@pytest.mark.parametrize("text, available, match", [
    ("", 10, "empty"), ("abc", 10, "cannot read"), ("-5", 10, "positive"), ("0", 10, "positive"),
    ("1.5", 10, "whole number"), ("0.1", None, "pool size is unknown"), ("150%", 10, "above 1"),
    (True, 10, "expected a number"), ("nan", 10, "cannot read"), (float("inf"), 10, "positive"),
    ("1.5K5", 10, "cannot read"),
])
def test_parse_count_errors_name_the_option(text, available, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_count(text, available, "--unique-samples")
    assert "--unique-samples" in str(info.value)


def test_format_and_sizes():
    assert format_count(1_234_567) == "1.23M" and format_count(999) == "999" and format_count(2 * 10**9) == "2B"
    assert parse_bytes("20G") == 20 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5K") == 1536
    assert parse_bytes("100") == 100 and parse_bytes("100B") == 100 and parse_bytes(None) is None
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(10) == "10 B"
    with pytest.raises(ValueError):
        parse_bytes("lots")
