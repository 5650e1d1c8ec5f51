"""Cross-rank terms on 2 CPU processes over gloo equal the single-process result on the concatenated batch:
loss (mean over ranks) and gradients (DDP's average over ranks) of SimCLR and VICReg, gathered with gradient;
also Barlow Twins, MoCo v3, SwAV and DINO, whose collectives carry no gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stream_ssl.distributed import all_gather_nograd, gather_with_grad, sum_with_local_grad, world
from stream_ssl.methods.barlow import barlow_twins_loss
from stream_ssl.methods.dino import dino_center, dino_loss
from stream_ssl.methods.mocov3 import moco_contrastive_loss
from stream_ssl.methods.simclr import nt_xent_loss
from stream_ssl.methods.swav import sinkhorn_knopp, swav_loss
from stream_ssl.methods.vicreg import vicreg_loss
from tests.helpers.trainer import free_port

pytestmark = pytest.mark.multiprocess

WORLD, B, D_IN, D = 2, 6, 5, 8  # per-rank batch B; the concatenated batch has WORLD * B rows


def inputs():
    g = torch.Generator().manual_seed(123)
    x1, x2 = torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)
    w = torch.randn(D_IN, D, generator=g)
    w_key = torch.randn(D_IN, D, generator=g)
    protos = torch.nn.functional.normalize(torch.randn(7, D, generator=g), dim=1)
    return x1, x2, w, w_key, protos


def cases(x1, x2, w, w_key, protos):
    """name -> loss as a function of the trainable matrix W, for the rows given."""
    norm = torch.nn.functional.normalize

    def swav(w_):
        z1, z2 = norm(x1 @ w_, dim=1), norm(x2 @ w_, dim=1)
        s = [z1 @ protos.T, z2 @ protos.T]
        q = [sinkhorn_knopp(si.detach()) for si in s]
        return swav_loss(s, q, 0.1)

    def dino(w_):
        student = [x1 @ w_, x2 @ w_]
        teacher = [x1 @ w_key, x2 @ w_key]
        center = dino_center(torch.zeros(1, D), teacher, 0.9)  # the center from all ranks' teacher outputs
        return dino_loss(student, teacher, center, 0.1, 0.04)

    return {
        "simclr": lambda w_: nt_xent_loss(x1 @ w_, x2 @ w_, 0.2),
        "vicreg": lambda w_: vicreg_loss(x1 @ w_, x2 @ w_),
        "barlow": lambda w_: barlow_twins_loss(x1 @ w_, x2 @ w_),
        "mocov3": lambda w_: moco_contrastive_loss(x1 @ w_, x2 @ w_key, 0.2)
        + moco_contrastive_loss(x2 @ w_, x1 @ w_key, 0.2),
        "swav": swav,
        "dino": dino,
    }


def loss_and_grad(x1, x2, w, w_key, protos) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, fn in cases(x1, x2, w, w_key, protos).items():
        w_ = w.clone().requires_grad_(True)
        loss = fn(w_)
        loss.backward()
        out[name] = (loss.detach(), w_.grad.detach())
    return out


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x1, x2, w, w_key, protos = inputs()
        rows = slice(rank * B, (rank + 1) * B)
        result = {}
        for name, (loss, grad) in loss_and_grad(x1[rows], x2[rows], w, w_key, protos).items():
            loss, grad = loss.clone(), grad.clone()
            dist.all_reduce(loss)
            dist.all_reduce(grad)  # DDP averages gradients over ranks
            result[name] = (loss / WORLD, grad / WORLD)
        # The collectives themselves.
        x = torch.arange(3.0).view(3, 1) + 10 * rank
        xg = x.clone().requires_grad_(True)
        gathered = gather_with_grad(xg)
        (gathered * torch.arange(1.0, 7.0).view(6, 1)).sum().backward()
        s = torch.full((2,), float(rank + 1), requires_grad=True)
        summed = sum_with_local_grad(s)
        summed.sum().backward()
        result["_collectives"] = (gathered.detach(), xg.grad, all_gather_nograd(x), summed.detach(), s.grad,
                                  torch.tensor(world()))
        # SwAV: the codes of this rank's rows equal those rows of the single-process codes.
        scores = torch.nn.functional.normalize(x1[rows] @ w, dim=1) @ protos.T
        result["_sinkhorn"] = sinkhorn_knopp(scores)
        if rank == 0:
            torch.save(result, Path(out) / "rank0.pt")
        else:
            torch.save(result, Path(out) / "rank1.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", ["simclr", "vicreg", "barlow", "mocov3", "swav", "dino"])
def test_two_ranks_equal_single_process(two_ranks, name):
    single = loss_and_grad(*inputs())[name]
    for rank in range(WORLD):
        loss, grad = two_ranks[rank][name]
        assert torch.allclose(loss, single[0], rtol=1e-5, atol=1e-6), (name, loss, single[0])
        assert torch.allclose(grad, single[1], rtol=1e-4, atol=1e-6), (name, (grad - single[1]).abs().max())
    assert single[1].abs().max() > 1e-4  # the gradient is not trivially zero


def test_collectives(two_ranks):
    for rank in range(WORLD):
        gathered, grad, nograd, summed, local_grad, w = two_ranks[rank]["_collectives"]
        assert gathered.flatten().tolist() == [0, 1, 2, 10, 11, 12]
        assert nograd.flatten().tolist() == [0, 1, 2, 10, 11, 12]
        # both ranks' losses weight the gathered rows by 1..6; the backward sums them: 2 x this rank's weights
        assert grad.flatten().tolist() == [2.0 * (3 * rank + i) for i in (1, 2, 3)]
        assert summed.tolist() == [3.0, 3.0]
        assert local_grad.tolist() == [2.0, 2.0]  # world size x the local gradient
        assert w.tolist() == [rank, WORLD]


def test_sinkhorn_codes_match_single_process(two_ranks):
    x1, _, w, _, protos = inputs()
    single = sinkhorn_knopp(torch.nn.functional.normalize(x1 @ w, dim=1) @ protos.T)
    for rank in range(WORLD):
        assert torch.allclose(two_ranks[rank]["_sinkhorn"], single[rank * B:(rank + 1) * B], atol=1e-6)
