"""MoCo v3 (Chen, Xie, He 2021): query encoder + predictor against a momentum key encoder, keys of every
rank gathered without gradient, symmetrized InfoNCE scaled by 2T.

Defaults (paper): ResNet: projector 2 layers 4096-256 (last BN without affine), predictor 2 layers 4096-256,
T = 1.0, momentum 0.99 -> 1 (cosine), LARS lr 0.3 x B/256 (0.6 for short schedules), wd 1e-6.
ViT: projector 3 layers, T = 0.2, AdamW lr 1.5e-4 x B/256, wd 0.1, frozen random patch embedding.
Augmentation: the BYOL pair with min crop scale 0.08.

Views and BatchNorm: the reference code (facebookresearch/moco-v3, moco/builder.py) runs each view through the
query and the momentum encoder on its own, so BatchNorm statistics are per view (`views_together` False by
default; True batches the two views).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec, byol_views
from stream_ssl.distributed import all_gather_nograd, world
from stream_ssl.methods.base import (
    MomentumMethod,
    fp32_loss,
    register,
    with_color_strength,
)
from stream_ssl.models.backbone import is_vit
from stream_ssl.models.heads import mlp


@fp32_loss
def moco_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 1.0,
                          gather: bool = True) -> torch.Tensor:
    """CE(q^ k^T / T, arange(N) + N * rank) * 2T for one direction. `k` comes from the momentum encoder and
    gets no gradient; the keys of all ranks are negatives."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    rank, size = world() if gather else (0, 1)
    keys = all_gather_nograd(k) if size > 1 else k
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register
class MoCoV3(MomentumMethod):
    name = "mocov3"
    VIEWS_TOGETHER = False

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 4096, proj_dim: int = 256,
                 pred_hidden: int = 4096, proj_layers: int | None = None, temperature: float | None = None,
                 base_momentum: float = 0.99, final_momentum: float = 1.0, freeze_patch_embed: bool | None = None,
                 blur: bool | None = None, min_scale: float = 0.08, color_strength: float | None = None,
                 views_together: bool | None = None):
        super().__init__(backbone, feature_dim, base_momentum, final_momentum, views_together)
        vit = is_vit(backbone)
        self.temperature = temperature if temperature is not None else (0.2 if vit else 1.0)
        layers = proj_layers if proj_layers is not None else (3 if vit else 2)
        self.projector = mlp(feature_dim, proj_hidden, proj_dim, layers=layers, last_bn=True)
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim, layers=2, last_bn=False, last_bias=False)
        if (freeze_patch_embed if freeze_patch_embed is not None else vit) and vit:
            for p in backbone.patch_embed.parameters():  # "random patch projection" for stability
                p.requires_grad_(False)
        self.track("backbone", "projector")
        self.blur, self.min_scale, self.color_strength = blur, min_scale, color_strength

    def views(self, image_size: int) -> list[ViewSpec]:
        return with_color_strength(byol_views(image_size, self.blur, self.min_scale), self.color_strength)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.encode(lambda x: self.projector(self.backbone(x)), views[:2])
        q1, q2 = self.encode(self.predictor, z)
        with torch.no_grad():
            k1, k2 = self.encode(self.target_forward, views[:2])
        loss = moco_contrastive_loss(q1, k2, self.temperature) + moco_contrastive_loss(q2, k1, self.temperature)
        return {"loss": loss, **self.monitor(z[0])}
