"""VICReg (Bardes, Ponce, LeCun 2022): variance-invariance-covariance regularization.

Defaults (paper): projector 8192-8192-8192 (3 layers, BN + ReLU between), coefficients 25 / 25 / 1,
LARS lr 0.2 x B/256 (base_lr 0.2), wd 1e-6; augmentation: the BYOL pair.

Cross-rank: invariance is the MSE on the local batch; variance and covariance use the batch of all ranks,
gathered with gradient (as the official FullGatherLayer does).

Variance-term convention (carry published settings over with this factor). This file follows the paper and
the official code (facebookresearch/vicreg): the two branches' hinge terms are averaged (/2), so a constant
batch gives 24.75 at 25/25/1. solo-learn sums them: its variance weight w is `std_coeff` 2w here (its 25 is
50 here); the invariance and covariance terms agree (covariance summed over the branches in both).

Views and BatchNorm: the reference code (main_vicreg.py) runs each view through the backbone and projector on
its own, so BatchNorm statistics are per view (`views_together` False by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec, byol_views
from stream_ssl.distributed import gather_with_grad, world
from stream_ssl.methods.base import SSLMethod, fp32_loss, register, with_color_strength
from stream_ssl.models.heads import mlp


def _variance_covariance(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    x = x - x.mean(0)
    std = torch.sqrt(x.var(0) + eps)  # unbiased
    variance = F.relu(1 - std).mean() / 2
    cov = x.T @ x / (n - 1)
    covariance = (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
    return variance, covariance


@fp32_loss
def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4, gather: bool = True) -> dict[str, torch.Tensor]:
    """invariance (MSE, local batch); variance = sum over branches of mean(relu(1 - sqrt(var + eps))) / 2
    (unbiased var); covariance = sum over branches of sum offdiag(cov)^2 / D; the last two over all ranks."""
    invariance = F.mse_loss(z1, z2)
    _, size = world() if gather else (0, 1)
    if size > 1:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    if z1.shape[0] < 2:
        raise ValueError("VICReg needs a batch of at least 2 samples (variance and covariance terms)")
    v1, c1 = _variance_covariance(z1, eps)
    v2, c2 = _variance_covariance(z2, eps)
    return {"invariance": invariance, "variance": v1 + v2, "covariance": c1 + c2}


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4, gather: bool = True) -> torch.Tensor:
    t = vicreg_terms(z1, z2, eps, gather)
    return sim_coeff * t["invariance"] + std_coeff * t["variance"] + cov_coeff * t["covariance"]


@register
class VICReg(SSLMethod):
    name = "vicreg"
    VIEWS_TOGETHER = False

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 8192, proj_dim: int = 8192,
                 proj_layers: int = 3, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 blur: bool | None = None, min_scale: float = 0.08, color_strength: float | None = None,
                 views_together: bool | None = None):
        super().__init__(backbone, feature_dim, views_together)
        self.projector = mlp(feature_dim, proj_hidden, proj_dim, layers=proj_layers, last_bias=False)
        self.coeffs = (sim_coeff, std_coeff, cov_coeff)
        self.blur, self.min_scale, self.color_strength = blur, min_scale, color_strength

    def views(self, image_size: int) -> list[ViewSpec]:
        return with_color_strength(byol_views(image_size, self.blur, self.min_scale), self.color_strength)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = self.encode(lambda x: self.projector(self.backbone(x)), views[:2])
        t = vicreg_terms(z1, z2)
        sim, std, cov = self.coeffs
        loss = sim * t["invariance"] + std * t["variance"] + cov * t["covariance"]
        return {"loss": loss, **{k: v.detach() for k, v in t.items()}, **self.monitor(z1)}
