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
_FREE_REFS = 3  # references of an array nobody uses: the list, the loop variable, getrefcount's argument

_lock = threading.Lock()
_arrays: list[np.ndarray] = []


def empty(shape: tuple[int, ...], dtype=np.float32) -> torch.Tensor:
    """An uninitialized CPU tensor of `shape`, in memory reused from an earlier batch of the same size."""
    n = math.prod(shape)
    with _lock:
        for a in _arrays:
            if a.size == n and a.dtype == dtype and sys.getrefcount(a) == _FREE_REFS:
                return torch.from_numpy(a).view(shape)
        out = np.empty(n, dtype)
        _arrays.append(out)
        if len(_arrays) > _KEEP:
            free = [i for i, a in enumerate(_arrays) if sys.getrefcount(a) == _FREE_REFS]
            del _arrays[free[0] if free else 0]
        return torch.from_numpy(out).view(shape)
