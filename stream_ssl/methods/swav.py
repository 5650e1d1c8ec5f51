"""SwAV (Caron et al. 2020): swapped prediction of online cluster assignments computed with Sinkhorn-Knopp
over the global batch.

Defaults (paper): projector 2048-128 (BN), 3000 prototypes (L2-normalized after every step), temperature
0.1, Sinkhorn eps 0.05 with 3 iterations, prototypes frozen for the first iterations (~1 epoch), multi-crop
2 x 224 (0.14, 1) + 6 x 96 (0.05, 0.14), jitter strength 1.0, blur 0.5; LARS lr 0.3 x B/256 (4.8 at 4096),
wd 1e-6.

Queue (the paper's rule for small batches): when the batch Sinkhorn-Knopp sees (micro-batch x processes) is
below 256, the codes are computed over the batch plus a queue of the last 3840 embeddings of each assignment
crop (over all processes; the reference recipe for batch 256: queue 3840, started at epoch 15 of 100+, hence
`queue_start_fraction` 0.15). `queue_length` None applies this rule, 0 turns the queue off, a number sets the
per-process length. The queue is used once full; it is per process and checkpointed (`rank_state`).

Views and BatchNorm: the reference code (facebookresearch/swav, multi-crop forward) concatenates the crops of
each resolution into one batch, so BatchNorm statistics cover all crops of a size (`views_together` True).

Cross-rank: the Sinkhorn normalizers are summed with no-grad all_reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec, swav_views
from stream_ssl.distributed import all_reduce_sum, world
from stream_ssl.methods.base import SSLMethod, fp32_loss, local_crop_size, register, with_color_strength
from stream_ssl.models.heads import mlp


@torch.no_grad()
@fp32_loss
def sinkhorn_knopp(scores: torch.Tensor, eps: float = 0.05, iterations: int = 3, gather: bool = True) -> torch.Tensor:
    """Soft assignments Q (B x K) of B samples to K prototypes with equipartition over the batch of all ranks:
    every row sums to 1, every prototype gets ~B_total / K of the mass."""
    _, size = world() if gather else (0, 1)
    q = torch.exp(scores / eps).T  # K x B
    k, b = q.shape
    total_b = b * size
    q /= all_reduce_sum(q.sum()) if size > 1 else q.sum()
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        q /= (all_reduce_sum(rows) if size > 1 else rows)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= total_b
    q *= total_b
    return q.T


@fp32_loss
def swav_loss(scores: list[torch.Tensor], assignments: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """Swapped prediction: `assignments[i]` (codes of view i) are predicted from every other view's scores.
    Averaged over the other views, then over the assignment views."""
    total = scores[0].new_zeros(())
    for i, q in enumerate(assignments):
        sub = scores[0].new_zeros(())
        for v, s in enumerate(scores):
            if v != i:
                sub = sub - (q * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()
        total = total + sub / (len(scores) - 1)
    return total / len(assignments)


QUEUE_TOTAL = 3840  # the reference recipe's queue for a batch of 256 (all processes together)
QUEUE_BELOW_BATCH = 256  # the automatic rule turns the queue on below this batch (micro-batch x processes)


@register
class SwAV(SSLMethod):
    name = "swav"

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 2048, proj_dim: int = 128,
                 prototypes: int = 3000, temperature: float = 0.1, sinkhorn_eps: float = 0.05,
                 sinkhorn_iterations: int = 3, local_crops: int = 6, global_scale: tuple = (0.14, 1.0),
                 local_scale: tuple = (0.05, 0.14), local_size: int | None = None, blur: bool | None = None,
                 freeze_prototypes_fraction: float = 0.01, queue_length: int | None = None,
                 queue_start_fraction: float = 0.15, color_strength: float | None = None,
                 views_together: bool | None = None):
        super().__init__(backbone, feature_dim, views_together)
        self.projector = mlp(feature_dim, proj_hidden, proj_dim, layers=2)
        self.prototypes = nn.Linear(proj_dim, prototypes, bias=False)
        self.normalize_prototypes()
        self.temperature, self.eps, self.iterations = temperature, sinkhorn_eps, sinkhorn_iterations
        self.local_crops, self.local_size = local_crops, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.blur, self.color_strength = blur, color_strength
        self.freeze_prototypes_fraction = freeze_prototypes_fraction
        self.queue_length, self.queue_start_fraction = queue_length, queue_start_fraction
        # Per-rank state, saved through rank_state(): a queue of past embeddings of the 2 assignment views.
        self.queue: torch.Tensor | None = None
        self.queue_filled = 0
        self.step, self.total_steps = 0, 0

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def views(self, image_size: int) -> list[ViewSpec]:
        local = self.local_size or local_crop_size(image_size, self.backbone)
        views = swav_views(image_size, local, self.local_crops, self.global_scale, self.local_scale, self.blur)
        return with_color_strength(views, self.color_strength)

    def set_step(self, step: int, total_steps: int) -> dict[str, float]:
        self.step, self.total_steps = step, total_steps
        return {}

    def queue_size(self, batch: int) -> int:
        """Per-process queue length for a micro-batch of `batch` (see the module docstring)."""
        if self.queue_length is not None:
            return max(0, int(self.queue_length))
        _, size = world()
        if batch * size >= QUEUE_BELOW_BATCH:
            return 0
        per_process = -(-QUEUE_TOTAL // size)
        return -(-per_process // batch) * batch  # whole micro-batches

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.encode(lambda x: F.normalize(self.projector(self.backbone(x)), dim=1), views)
        scores = [self.prototypes(e) for e in z]
        with torch.no_grad():
            assignments = self.assign(z, scores)
        return {"loss": swav_loss(scores, assignments, self.temperature), **self.monitor(z[0])}

    @torch.no_grad()
    def assign(self, z: list[torch.Tensor], scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Codes of the two assignment crops (Sinkhorn-Knopp over the batch, plus the queue once it is full);
        then the crops' embeddings enter the queue."""
        b, d = z[0].shape
        length = self.queue_size(b)
        use_queue = length > 0 and self.step >= self.queue_start_fraction * self.total_steps
        if use_queue and (self.queue is None or self.queue.shape[1:] != (length, d)):
            self.queue, self.queue_filled = z[0].new_zeros(2, length, d, dtype=torch.float32), 0
        codes = []
        for i in range(2):
            s = scores[i].detach()
            if use_queue and self.queue_filled >= length:
                s = torch.cat([self.queue[i] @ self.prototypes.weight.T.to(self.queue.dtype), s.float()])
            codes.append(sinkhorn_knopp(s, self.eps, self.iterations)[-b:])
        if use_queue:
            self.push(z, length)
        return codes

    def push(self, z: list[torch.Tensor], length: int) -> None:
        """Newest embeddings first; the oldest fall off the end."""
        b = z[0].shape[0]
        keep = length - b
        for i in range(2):
            if keep > 0:
                self.queue[i, b:] = self.queue[i, :keep].clone()
            self.queue[i, :min(b, length)] = z[i].detach().float()[:length]
        self.queue_filled = min(length, self.queue_filled + b)

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step < self.freeze_prototypes_fraction * total_steps:
            for p in self.prototypes.parameters():
                p.grad = None

    def on_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        self.normalize_prototypes()
        return {}

    def rank_state(self) -> dict:
        return {"queue": self.queue.cpu() if self.queue is not None else None, "queue_filled": self.queue_filled}

    def load_rank_state(self, state: dict) -> None:
        q = state.get("queue")
        device = self.prototypes.weight.device
        self.queue = q.to(device) if q is not None else None
        self.queue_filled = int(state.get("queue_filled", 0))
