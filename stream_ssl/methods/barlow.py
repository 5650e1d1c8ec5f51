"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' batch-normalized projections
is pushed to the identity.

Defaults (paper): projector 8192-8192-8192 (3 layers, BN + ReLU between, no bias at the end),
lambda = 0.0051, LARS lr 0.2 x B/256, wd 1.5e-6; augmentation: the BYOL pair.

Cross-rank: the batch statistics and the cross-correlation are sums over samples, combined over ranks with
one no-grad all_reduce (`sum_with_local_grad`), so loss and gradients equal the single-process ones on the
concatenated batch (the official code all_reduces `c` and relies on SyncBatchNorm for the statistics).

Loss scale (conventions differ; carry published settings over with these factors). This file's loss is the
paper's, with no factor (`scale_loss` 1.0). solo-learn multiplies it by `scale_loss` (0.1 in its CIFAR and
ImageNet-100 recipes; early versions of the official code used 1/32 or 0.024): to reproduce such a setting,
give the same `scale_loss` and keep lr and weight decay. To keep `scale_loss` 1 instead: with SGD, lr x s
and weight decay / s; with LARS (the trust ratio removes the gradient's scale), weight decay / s and the same
lr; AdamW is (up to its eps) unaffected. Loss values compare after dividing theirs by s.

Views and BatchNorm: the reference code (facebookresearch/barlowtwins, main.py) runs each view through the
backbone and projector on its own, so BatchNorm statistics are per view (`views_together` False by default).
"""

from __future__ import annotations

import torch
from torch import nn

from stream_ssl.data.augment import ViewSpec, byol_views
from stream_ssl.distributed import all_reduce_sum, sum_with_local_grad, world
from stream_ssl.methods.base import SSLMethod, fp32_loss, register, with_color_strength
from stream_ssl.models.heads import mlp


@fp32_loss
def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5, gather: bool = True) -> torch.Tensor:
    """c = BN(z1)^T BN(z2) / N over the global batch (N = all ranks' samples), BN without affine parameters,
    biased variance, `eps` added to the variance as in nn.BatchNorm1d."""
    _, size = world() if gather else (0, 1)
    n = z1.shape[0] * size
    if n < 2:
        raise ValueError("Barlow Twins needs a batch of at least 2 samples (batch statistics)")
    d = z1.shape[1]
    with torch.no_grad():  # a constant shift (the global mean) keeps the moment sums well conditioned
        shift = all_reduce_sum(torch.stack([z1.sum(0), z2.sum(0)])) / n if size > 1 else \
            torch.stack([z1.sum(0), z2.sum(0)]) / n
    a, b = z1 - shift[0], z2 - shift[1]
    stats = torch.cat([a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0)])
    cross = a.T @ b
    if size > 1:
        stats, cross = sum_with_local_grad(stats), sum_with_local_grad(cross)
    m1, m2, q1, q2 = (stats / n).split(d)
    var1, var2 = q1 - m1 * m1, q2 - m2 * m2
    cov = cross / n - torch.outer(m1, m2)
    return cov / torch.sqrt(torch.outer(var1 + eps, var2 + eps))


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5,
                      gather: bool = True) -> torch.Tensor:
    """sum_i (1 - c_ii)^2 + lambda sum_{i != j} c_ij^2."""
    c = cross_correlation(z1, z2, eps, gather)
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off


@register
class BarlowTwins(SSLMethod):
    name = "barlow"
    VIEWS_TOGETHER = False

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 8192, proj_dim: int = 8192,
                 proj_layers: int = 3, lambd: float = 0.0051, scale_loss: float = 1.0, blur: bool | None = None,
                 min_scale: float = 0.08, color_strength: float | None = None,
                 views_together: bool | None = None):
        super().__init__(backbone, feature_dim, views_together)
        self.projector = mlp(feature_dim, proj_hidden, proj_dim, layers=proj_layers, last_bias=False)
        self.lambd, self.scale_loss = lambd, scale_loss
        self.blur, self.min_scale, self.color_strength = blur, min_scale, color_strength

    def views(self, image_size: int) -> list[ViewSpec]:
        return with_color_strength(byol_views(image_size, self.blur, self.min_scale), self.color_strength)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = self.encode(lambda x: self.projector(self.backbone(x)), views[:2])
        return {"loss": self.scale_loss * barlow_twins_loss(z1, z2, self.lambd), **self.monitor(z1)}
