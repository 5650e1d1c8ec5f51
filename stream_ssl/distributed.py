"""Collectives for the methods' cross-rank terms.

Two kinds, and each method says which it uses:
- `gather_with_grad`: concatenation of a tensor from all ranks that passes gradients back to every rank's
  slice (SimCLR negatives, VICReg variance/covariance). `accelerator.gather` drops gradients.
- no-grad collectives (`all_reduce_sum`, `all_gather_nograd`, `sum_with_local_grad`): MoCo keys, the DINO
  center, the Barlow Twins cross-correlation, SwAV's Sinkhorn-Knopp normalizers.

Every function is the identity (or a plain sum) when no process group is initialized, so methods run the
same code on one process.

Gradient convention. DDP averages gradients over ranks. A loss that every rank computes from the same
global quantities must therefore send back `world_size` times the gradient of its local contribution so that
the average equals the gradient of the single-process loss on the concatenated batch. `gather_with_grad`
does this by construction (its backward sums the gradients of every rank's copy of the loss);
`sum_with_local_grad` does it explicitly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the incoming gradients of all ranks and keeps this rank's slice.

    Written with all_gather + all_reduce only, which every backend (gloo, nccl, mpi) supports; torch's own
    `torch.distributed.nn.all_gather` falls back to all_to_all off NCCL."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks along dim 0, rank-major; gradients flow
    back to every rank's slice."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of `x` from all ranks along dim 0, rank-major, without gradient."""
    _, size = world()
    if size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor, no gradient)."""
    out = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def sum_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks, computed with a no-grad all_reduce, whose gradient flows into the local `x`
    scaled by the world size.

    For a loss that is a function of global sums only (identical on every rank), this makes the DDP-averaged
    gradient equal the gradient of the single-process loss: (1/W) sum_r W dL/dS dS_r/dtheta = dL/dtheta."""
    _, size = world()
    if size == 1:
        return x
    total = all_reduce_sum(x)
    return x * size + (total - x.detach() * size)


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable; our own state only, never data from shards), in rank order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
