"""The seeded global shuffle of the shard tools: a keyed bijection of [0, n) that any process evaluates alone.

`Shuffle(n, seed)` maps a row (its index among the manifest's usable rows) to its position in the shuffled
order, and back, for any array of indices, without ever holding the whole permutation. That is what lets
`pack.py --part K/N` find the rows of its shards while streaming the manifest: every part computes the
same positions, so K parts write exactly the shards one run writes.

How: a balanced Feistel network over the smallest even number of bits covering n (8 rounds, each a
splitmix64-style mix of the right half with a round key drawn from the seed), made a permutation of [0, n)
by cycle-walking: a value that lands at or beyond n is encrypted again until it falls inside. The domain is
under 4n, so a value walks fewer than 4 steps on average. Keys come from BLAKE2b of the seed, so the
permutation is the same on every machine, Python and numpy version.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 8
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finalizer of x + key (uint64 arithmetic wraps, as intended)."""
    z = (x + key) * _M1
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


class Shuffle:
    """position = shuffle(row) and row = shuffle.inverse(position): a seeded permutation of [0, n)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a shuffle needs at least one row, got n={n}")
        self.n, self.seed = int(n), int(seed)
        half = max(1, ((self.n - 1).bit_length() + 1) // 2)  # 2 * half bits cover [0, n)
        self._half, self._mask = np.uint64(half), np.uint64((1 << half) - 1)
        digest = hashlib.blake2b(f"stream-ssl shuffle v1 seed={self.seed}".encode(), digest_size=8 * ROUNDS).digest()
        self._keys = [np.uint64(int.from_bytes(digest[8 * i: 8 * i + 8], "little")) for i in range(ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._mask)
        return (left << self._half) | right

    def _decrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in reversed(self._keys):
            left, right = right ^ (_mix(left, key) & self._mask), left
        return (left << self._half) | right

    def _walk(self, values, step) -> np.ndarray:
        x = np.array(values, dtype=np.uint64, ndmin=1)
        if x.size and int(x.max()) >= self.n:
            raise ValueError(f"indices must be in [0, {self.n}), got {int(x.max())}")
        x = step(x)
        outside = np.flatnonzero(x >= self.n)
        while outside.size:  # cycle-walking: stays a bijection of [0, n)
            x[outside] = step(x[outside])
            outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)

    def __call__(self, rows) -> np.ndarray:
        """The shuffled positions of `rows` (an int or array of ints in [0, n))."""
        return self._walk(rows, self._encrypt)

    def inverse(self, positions) -> np.ndarray:
        """The rows at `positions`: `inverse(arange(n))` is the whole shuffled order."""
        return self._walk(positions, self._decrypt)

    def order(self) -> np.ndarray:
        """Every row in shuffled order (n int64 values: for runs that hold the whole manifest anyway)."""
        return self.inverse(np.arange(self.n, dtype=np.uint64))
