"""Reused memory for large CPU batch tensors.

A fresh 64 x 3 x 224 x 224 float batch is 38.5 MB. glibc serves allocations over 32 MB with mmap and unmaps
them on free, so every batch pays ~9,400 page faults again: ~15 ms on one core of the development machine,
as much as the whole color transform of that batch. `empty` hands out tensors backed by numpy arrays that
it keeps, and reuses an array once nothing refers to it any more: the array's reference count tells, since
a tensor made by `torch.from_numpy`, its views, and autograd's saved copies all keep the array referenced
until the storage is freed. So reuse is never visible to a caller.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch

_KEEP = 16  # arrays remembered (DINO: 2 global + 8 local views a step); beyond, the oldest are forgotten

_lock = threading.Lock()
_arrays: list[np.ndarray] = []


def _refcounts(arrays: list[np.ndarray]) -> list[int]:
    return [sys.getrefcount(a) for a in arrays]


# What `_refcounts` says of an array that only its list refers to. Measured, not assumed: reference counts
# differ between Python versions (3.14 borrows some references).
_FREE_REFS = _refcounts([np.empty(1)])[0]


def _free(arrays: list[np.ndarray]) -> list[int]:
    """Positions of the arrays that nothing but the list refers to."""
    return [i for i, c in enumerate(_refcounts(arrays)) if c == _FREE_REFS]


def empty(shape: tuple[int, ...], dtype=np.float32) -> torch.Tensor:
    """An uninitialized CPU tensor of `shape`, in memory reused from an earlier batch of the same size."""
    n = math.prod(shape)
    with _lock:
        for i in _free(_arrays):
            a = _arrays[i]
            if a.size == n and a.dtype == dtype:
                return torch.from_numpy(a).view(shape)
        out = np.empty(n, dtype)
        _arrays.append(out)
        if len(_arrays) > _KEEP:
            free = _free(_arrays)
            del _arrays[free[0] if free else 0]
        return torch.from_numpy(out).view(shape)
