"""What every SSL method provides, and the registry that finds one by name.

A method is an nn.Module that owns its heads, its loss, its momentum/teacher parts and its parameter
groups. The trainer only calls: `views()`, `forward(views)`, `on_optimizer_step(step, total)` and
`param_groups()`. Nothing in the trainer is method-specific.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from stream_ssl.data.augment import ViewSpec

METHODS: dict[str, type[SSLMethod]] = {}


def register(cls: type[SSLMethod]) -> type[SSLMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, backbone: nn.Module, feature_dim: int, **options) -> SSLMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](backbone, feature_dim, **options)


class SSLMethod(nn.Module):
    name: ClassVar[str] = ""
    needs_batch_stats: ClassVar[bool] = True  # the loss uses statistics over the batch: a batch of 1 is an error

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim

    def views(self, image_size: int) -> list[ViewSpec]:
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalized float views in, {'loss': scalar, ...extra scalars to log} out."""
        raise NotImplementedError

    def on_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Called after every optimizer step (momentum encoders, schedules). Returns values to log."""
        return {}

    def param_groups(self) -> list[dict]:
        """Parameter groups; biases and norm parameters are marked to skip weight decay and LARS adaptation."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
