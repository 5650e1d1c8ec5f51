"""SimCLR (Chen et al. 2020): NT-Xent over two views, negatives from every rank (gathered with gradient).

Defaults (paper): projector 2048-2048-128 with BN, temperature 0.1 (0.2 for small batches/images is common),
LARS lr 0.3 x B/256, wd 1e-6; color jitter strength 1.0 (0.8, 0.8, 0.8, 0.2) p=0.8, gray 0.2, blur 0.5 at
ImageNet resolution; strength 0.5 and no blur below 96 px (the CIFAR recipe).

Views and BatchNorm: the reference code (google-research/simclr) concatenates the two views into one batch, so
BatchNorm statistics cover both (`views_together` True by default; False runs each view on its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec, simclr_views
from stream_ssl.distributed import gather_with_grad, world
from stream_ssl.methods.base import SSLMethod, fp32_loss, register
from stream_ssl.models.heads import mlp


@fp32_loss
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """Normalized-temperature cross entropy. Row i of z1 and row i of z2 are positives; every other row of
    both views (on all ranks when `gather`) is a negative. Mean over this rank's 2B anchors."""
    b = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D): view 1 rows, then view 2 rows
    rank, size = world() if gather else (0, 1)
    everyone = gather_with_grad(local) if size > 1 else local  # (size * 2B, D), rank-major
    logits = local @ everyone.T / temperature
    offset = rank * 2 * b
    rows = torch.arange(2 * b, device=z1.device)
    logits[rows, rows + offset] = float("-inf")  # an anchor is not its own negative
    positives = (rows + b) % (2 * b) + offset
    return F.cross_entropy(logits, positives)


@register
class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 2048, proj_dim: int = 128,
                 proj_layers: int = 2, temperature: float = 0.1, blur: bool | None = None,
                 color_strength: float | None = None, views_together: bool | None = None):
        super().__init__(backbone, feature_dim, views_together)
        self.projector = mlp(feature_dim, proj_hidden, proj_dim, layers=proj_layers)
        self.temperature = temperature
        self.blur = blur
        self.color_strength = color_strength

    def views(self, image_size: int) -> list[ViewSpec]:
        # Blur and full colour strength from 96 px up only: on small images they destroy the signal (CIFAR recipe).
        return simclr_views(image_size, self.blur, self.color_strength)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = self.encode(lambda x: self.projector(self.backbone(x)), views[:2])
        return {"loss": nt_xent_loss(z1, z2, self.temperature), **self.monitor(z1)}
