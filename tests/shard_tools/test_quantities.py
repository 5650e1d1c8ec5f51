"""Counts and sizes as users write them."""

from __future__ import annotations

import pytest

from shard_tools.quantities import format_bytes, format_count, parse_bytes, parse_count, plural


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


def test_format_count():
    assert format_count(1_234_567) == "1.23M" and format_count(999) == "999" and format_count(2 * 10**9) == "2B"


@pytest.mark.parametrize("text, want", [
    ("1G", 10**9), ("1GB", 10**9), ("1g", 10**9), ("500MB", 5 * 10**8), ("1.5k", 1500), ("1.5K", 1500),
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1kib", 1024), ("1TiB", 2**40), ("3T", 3 * 10**12),
    ("4096", 4096), ("100B", 100), ("0", 0), (7, 7), ("1_000", 1000), (None, None), ("", None),
])
def test_parse_bytes_one_rule(text, want):
    """K, M, G, T are powers of 1000, as for counts; KiB, MiB, GiB, TiB are powers of 1024."""
    assert parse_bytes(text) == want


@pytest.mark.parametrize("text", ["lots", "G", "-1G", "1.5X", "nan", "1GG"])
def test_parse_bytes_errors_name_the_option(text):
    with pytest.raises(ValueError, match="--cache-size"):
        parse_bytes(text, "--cache-size")


def test_counts_and_sizes_share_the_suffixes():
    for suffix in ("K", "M", "G", "T"):
        assert parse_bytes(f"3{suffix}") == parse_count(f"3{suffix}")


def test_format_bytes_reads_back():
    assert format_bytes(10) == "10 B" and format_bytes(1500) == "1.5 KB" and format_bytes(2.5e9) == "2.5 GB"
    for n in (999, 12_345, 7_654_321, 3 * 10**9 + 10**8, 4 * 10**12):
        text = format_bytes(n).replace(" ", "")
        assert abs(parse_bytes(text) - n) <= 0.05 * n, text


def test_count_arg():
    import argparse

    from shard_tools.quantities import count_arg

    assert count_arg("1K") == 1000 and count_arg("2.5M") == 2_500_000 and count_arg("12") == 12
    for bad in ("0", "0.5", "10%", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            count_arg(bad)


def test_plural():
    assert [plural(n, "shard") for n in (0, 1, 2)] == ["0 shards", "1 shard", "2 shards"]
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"
