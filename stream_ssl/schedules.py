"""Schedules: pure functions of the optimizer step (a resumed run needs no schedule state).

- `warmup_cosine`: the learning rate: linear warm-up to `peak`, then cosine to `end` (0) at the last step.
- `cosine`: from `start` at step 0 to `end` at `total` (weight decay, EMA momentum, teacher temperature).
- `momentum_at`: the BYOL/MoCo/DINO EMA momentum tau_k = 1 - (1 - base)(cos(pi k / K) + 1) / 2.
- `linear_warmup`: linear from `start` to `end` over the first steps (DINO's teacher temperature).
"""

from __future__ import annotations

import math


def cosine(step: float, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at step `total` (held after)."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * (math.cos(math.pi * progress) + 1) / 2


def warmup_cosine(step: int, total: int, peak: float, warmup: int, end: float = 0.0) -> float:
    """Value at optimizer step `step` (0-based) of `total`: linear warm-up over `warmup` steps to `peak` (step 0
    already takes peak / warmup), then cosine to `end` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, max(1, total - warmup), peak, end)


def momentum_at(step: float, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum: `base` at 0, (base + final)/2 at K/2, `final` at K (BYOL's cosine schedule)."""
    return cosine(step, total, base, final)


def linear_warmup(step: float, warmup_steps: float, start: float, end: float) -> float:
    """Linear from `start` at step 0 to `end` at `warmup_steps`, then `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
