"""Projection / prediction heads shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: int, out: int, layers: int = 2, bn: bool = True, last_bn: bool = False,
        last_bias: bool | None = None, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """`layers` Linear layers; between them [BatchNorm1d] + activation. With `last_bn`, a BatchNorm1d without
    affine parameters follows the last Linear (MoCo v3 projector). The last Linear has a bias unless a BN
    follows it (or `last_bias` says otherwise)."""
    if layers < 1:
        raise ValueError("an MLP needs at least one layer")
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods.append(nn.Linear(dim, hidden, bias=not bn))
        if bn:
            mods.append(nn.BatchNorm1d(hidden))
        mods.append(act())
        dim = hidden
    mods.append(nn.Linear(dim, out, bias=(not last_bn) if last_bias is None else last_bias))
    if last_bn:
        mods.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*mods)


class NormalizedLinear(nn.Module):
    """Linear layer without bias whose rows are L2-normalized in the forward pass: weight normalization with
    the gain fixed to 1 (DINO's `norm_last_layer`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """MLP (GELU, optional BN) -> bottleneck -> L2 normalize -> weight-normalized linear to `out_dim` logits."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = mlp(in_dim, hidden, bottleneck, layers=layers, bn=use_bn, last_bias=True, act=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if norm_last_layer:
            self.last_layer = NormalizedLinear(bottleneck, out_dim)
        else:
            self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)
            nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalized bottleneck (what the last layer scores)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(x))
