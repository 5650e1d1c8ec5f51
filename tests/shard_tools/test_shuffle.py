"""shard_tools/shuffle.py: the seeded bijection of [0, n) behind every pack (and each of its parts)."""

from __future__ import annotations

import numpy as np
import pytest

from shard_tools.shuffle import Shuffle


@pytest.mark.parametrize("n", [*range(1, 70), 255, 256, 257, 1000, 4097, 65537])
def test_a_permutation_of_0_to_n_with_its_inverse(n):
    s = Shuffle(n, seed=7)
    positions = s(np.arange(n))
    assert np.array_equal(np.sort(positions), np.arange(n))  # every position taken once
    assert np.array_equal(s.inverse(positions), np.arange(n))
    assert np.array_equal(s.order()[positions], np.arange(n))  # order(): the row at each position
    assert s(3 % n).tolist() == [positions[3 % n]]  # one index at a time gives the same answer


def test_same_seed_same_order_other_seed_other_order():
    n = 1000
    a, b, c = Shuffle(n, 1).order(), Shuffle(n, 1).order(), Shuffle(n, 2).order()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(n))
    # Pinned: the keys come from BLAKE2b of the seed and the arithmetic is 64-bit unsigned, so every machine,
    # Python and numpy version gets this order; a change here changes every packed shard set (PACK_VERSION).
    assert Shuffle(10, 0).order().tolist() == [5, 2, 6, 3, 1, 8, 0, 7, 9, 4]


def test_out_of_range_and_empty_domains_are_refused():
    with pytest.raises(ValueError, match="at least one row"):
        Shuffle(0, 0)
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        Shuffle(5, 0)(np.array([5]))


def _chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_any_prefix_is_a_uniform_sample():
    """Over many seeds, each row lands in the first 10 of 100 positions equally often (chi-square with 99
    degrees of freedom under its 0.1% critical value, 148.2), and at position 0 of 10 (9 d.o.f.: 27.9)."""
    first10 = np.zeros(100)
    first = np.zeros(10)
    for seed in range(600):
        first10[Shuffle(100, seed).order()[:10]] += 1
        first[Shuffle(10, seed).order()[0]] += 1
    assert _chi2(first10) < 148.2 and _chi2(first) < 27.9
    # Neighbours do not stay together: rows 0 and 1 are adjacent in about 2/n of the orders, as in a random one.
    adjacent = sum(abs(int(np.diff(Shuffle(100, seed)(np.array([0, 1])))[0])) == 1 for seed in range(600))
    assert adjacent < 40  # expected 12 (2/100 x 600)
