"""Per-batch random streams: every random draw of a batch is a pure function of (seed, step, rank,
micro-batch, purpose), so a resumed run, a run with another number of loader workers and a run that retries a
batch draw exactly the same augmentations as one straight run.

`purpose` keeps independent draws apart (the crops of a batch never share random numbers with its colour
jitter). One function makes the NumPy generator (loader workers: crop geometry) and one the torch generator
(photometric parameters, on the training device or on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch

GEOMETRY = 0xA06  # crop boxes and flips, drawn in the loader workers
PHOTOMETRIC = 0xC010  # colour jitter, grayscale, blur, solarize parameters
FALLBACK = 0xF411  # a batch redone on another path (DALI -> PIL/torch)
REPLACEMENT = 0xBAD  # fresh geometry for samples that replace undecodable ones
TRANSFORM = 0x7F0  # the seed of a user's per-sample transform (StreamingDataset); `micro` is then the position


def _entropy(seed: int, step: int, rank: int, micro: int, purpose: int) -> list[int]:
    return [int(seed), int(step), int(rank), int(micro), int(purpose)]


def batch_rng(seed: int, step: int, rank: int, micro: int = 0, purpose: int = GEOMETRY) -> np.random.Generator:
    """NumPy generator for one batch's draws of `purpose`."""
    return np.random.default_rng(_entropy(seed, step, rank, micro, purpose))


def batch_generator(seed: int, step: int, rank: int, micro: int = 0, purpose: int = PHOTOMETRIC,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """torch generator (on `device`) for one batch's draws of `purpose`."""
    state = np.random.SeedSequence(_entropy(seed, step, rank, micro, purpose)).generate_state(1, np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state >> 1))
    return g
