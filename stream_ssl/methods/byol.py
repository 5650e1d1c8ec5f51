"""BYOL (Grill et al. 2020): online network + predictor regress the target network's projection of the
other view; the target is an EMA of the online network and receives no gradient.

Defaults (paper): projector and predictor 4096-256 with BN, tau 0.996 -> 1 (cosine over optimizer steps),
LARS lr 0.2 x B/256, wd 1.5e-6; augmentation: the asymmetric BYOL pair (blur 1.0 / 0.1, solarize 0 / 0.2).

Views and BatchNorm: the reference code (deepmind-research byol/byol_experiment.py, `apply_once_fn` per view)
runs each view through the online and the target network on its own, so BatchNorm statistics are per view
(`views_together` False by default; True batches the two views).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec, byol_views
from stream_ssl.methods.base import (
    MomentumMethod,
    fp32_loss,
    register,
    with_color_strength,
)
from stream_ssl.models.heads import mlp


@fp32_loss
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, sg(z)), mean over the batch: 0 when aligned, 2 orthogonal, 4 opposite."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


@register
class BYOL(MomentumMethod):
    name = "byol"
    VIEWS_TOGETHER = False

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 4096, proj_dim: int = 256,
                 pred_hidden: int = 4096, base_momentum: float = 0.996, final_momentum: float = 1.0,
                 blur: bool | None = None, min_scale: float = 0.08, color_strength: float | None = None,
                 views_together: bool | None = None):
        super().__init__(backbone, feature_dim, base_momentum, final_momentum, views_together)
        self.projector = mlp(feature_dim, proj_hidden, proj_dim, layers=2)
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim, layers=2)
        self.track("backbone", "projector")
        self.blur, self.min_scale, self.color_strength = blur, min_scale, color_strength

    def views(self, image_size: int) -> list[ViewSpec]:
        return with_color_strength(byol_views(image_size, self.blur, self.min_scale), self.color_strength)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.encode(lambda x: self.projector(self.backbone(x)), views[:2])
        p1, p2 = self.encode(self.predictor, z)
        with torch.no_grad():
            t1, t2 = self.encode(self.target_forward, views[:2])
        return {"loss": byol_loss(p1, t2) + byol_loss(p2, t1), **self.monitor(z[0])}
