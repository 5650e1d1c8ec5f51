"""SimCLR (Chen et al. 2020): NT-Xent over two views, negatives from every rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec
from stream_ssl.distributed import gather_with_grad, world
from stream_ssl.methods.base import SSLMethod, register


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """Normalized-temperature cross entropy. Row i of z1 and row i of z2 are positives; every other row of
    both views (on all ranks when `gather`) is a negative. Mean over this rank's 2B anchors."""
    b = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D): view 1 rows, then view 2 rows
    rank, size = world() if gather else (0, 1)
    if size > 1:
        everyone = gather_with_grad(local)  # (size * 2B, D), rank-major
    else:
        everyone = local
    logits = local @ everyone.T / temperature
    offset = rank * 2 * b
    rows = torch.arange(2 * b, device=z1.device)
    logits[rows, rows + offset] = float("-inf")  # an anchor is not its own negative
    positives = (rows + b) % (2 * b) + offset
    return F.cross_entropy(logits, positives)


def projection_mlp(in_dim: int, hidden: int, out: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*mods)


@register
class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.1, blur: bool | None = None):
        super().__init__(backbone, feature_dim)
        self.projector = projection_mlp(feature_dim, proj_hidden, proj_dim)
        self.temperature = temperature
        self.blur = blur

    def views(self, image_size: int) -> list[ViewSpec]:
        # SimCLR blurs at ImageNet resolution only; on small images blur destroys the signal (CIFAR recipe).
        blur = self.blur if self.blur is not None else image_size >= 96
        spec = ViewSpec(size=image_size, blur_p=0.5 if blur else 0.0)
        return [spec, spec]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        return {"loss": nt_xent_loss(z1, z2, self.temperature)}
