"""DINO (Caron et al. 2021): self-distillation without labels. The student (all crops) matches the
teacher's centered, sharpened output on the global crops; the teacher is an EMA of the student.

Defaults (paper / reference code): head 2048-2048-256 bottleneck, L2 normalize, weight-normalized last layer
to 65536 dims, GELU, no BN; student temperature 0.1; teacher temperature 0.04 -> 0.07 linear warm-up over
the first 30% of steps (the reference code's 30 of 100 epochs); center momentum 0.9; teacher EMA 0.996 -> 1
cosine; last layer frozen for ~1% of steps (one epoch of 100). Crops: 2 global (0.4, 1) at the image size,
8 local (0.05, 0.4) at 96/224 of it; global 1 always blurred, global 2 blurred 10% and solarized 20%, locals
blurred 50%. ViT-S/16: AdamW lr 5e-4 x B/256, wd 0.04 -> 0.4 cosine, clip 3.0, drop path 0.1.

Views and BatchNorm: the reference code (facebookresearch/dino, MultiCropWrapper) concatenates the crops of each
resolution into one batch, so BatchNorm statistics cover all crops of a size (`views_together` True).

Cross-rank: the center is averaged over ranks with a no-grad all_reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec, dino_views
from stream_ssl.distributed import all_reduce_sum, world
from stream_ssl.methods.base import (
    MomentumMethod,
    fp32_loss,
    local_crop_size,
    register,
    with_color_strength,
)
from stream_ssl.models.heads import DINOHead
from stream_ssl.schedules import linear_warmup


@fp32_loss
def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """Cross-entropy between softmax((teacher - center) / teacher_temp) of each global view and the student's
    log_softmax(student / student_temp) of every other view, averaged over the (teacher, student) pairs."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    logp = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, pairs = student[0].new_zeros(()), 0
    for iq, q in enumerate(targets):
        for v, lp in enumerate(logp):
            if v == iq:
                continue
            total = total + (-q * lp).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def dino_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float = 0.9,
                gather: bool = True) -> torch.Tensor:
    """center * m + (1 - m) * mean of the teacher outputs over all views and all ranks."""
    out = torch.cat([t.detach().float() for t in teacher])
    _, size = world() if gather else (0, 1)
    total = all_reduce_sum(out.sum(dim=0, keepdim=True)) if size > 1 else out.sum(dim=0, keepdim=True)
    return center * momentum + total / (out.shape[0] * size) * (1 - momentum)


@register
class DINO(MomentumMethod):
    name = "dino"

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int = 65536, head_hidden: int = 2048,
                 bottleneck: int = 256, head_layers: int = 3, use_bn_in_head: bool = False,
                 norm_last_layer: bool = True, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_temp_warmup_fraction: float = 0.3,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, final_momentum: float = 1.0,
                 freeze_last_layer_fraction: float = 0.01, local_crops: int = 8, global_scale: tuple = (0.4, 1.0),
                 local_scale: tuple = (0.05, 0.4), local_size: int | None = None, blur: bool | None = None,
                 color_strength: float | None = None, views_together: bool | None = None):
        super().__init__(backbone, feature_dim, base_momentum, final_momentum, views_together)
        self.head = DINOHead(feature_dim, out_dim, head_hidden, bottleneck, head_layers, use_bn_in_head,
                             norm_last_layer)
        self.track("backbone", "head")  # the teacher
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp = student_temp
        self.teacher_temps = (warmup_teacher_temp, teacher_temp, teacher_temp_warmup_fraction)
        self.teacher_temp = warmup_teacher_temp
        self.center_momentum = center_momentum
        self.freeze_last_layer_fraction = freeze_last_layer_fraction
        self.local_crops, self.local_size = local_crops, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.blur, self.color_strength = blur, color_strength

    def views(self, image_size: int) -> list[ViewSpec]:
        local = self.local_size or local_crop_size(image_size, self.backbone)
        views = dino_views(image_size, local, self.local_crops, self.global_scale, self.local_scale, self.blur)
        return with_color_strength(views, self.color_strength)

    def teacher_temp_at(self, step: int, total_steps: int) -> float:
        start, end, fraction = self.teacher_temps
        return linear_warmup(step, fraction * total_steps, start, end)

    def set_step(self, step: int, total_steps: int) -> dict[str, float]:
        self.teacher_temp = self.teacher_temp_at(step, total_steps)
        return {"teacher_temp": self.teacher_temp}

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        embeddings = self.encode(lambda x: self.head.embed(self.backbone(x)), views)
        student = [self.head.last_layer(e) for e in embeddings]
        with torch.no_grad():
            teacher = self.encode(self.target_forward, views[:2])
        loss = dino_loss(student, teacher, self.center, self.student_temp, self.teacher_temp)
        self.center.copy_(dino_center(self.center, teacher, self.center_momentum))
        return {"loss": loss, **self.monitor(embeddings[0])}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step < self.freeze_last_layer_fraction * total_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None
