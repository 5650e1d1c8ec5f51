"""Known answers for every loss (values from ../shared/REFERENCE.md), schedules and the optimizer."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from stream_ssl.methods.barlow import barlow_twins_loss, cross_correlation
from stream_ssl.methods.base import ema_update
from stream_ssl.methods.byol import byol_loss
from stream_ssl.methods.dino import dino_center, dino_loss
from stream_ssl.methods.mocov3 import moco_contrastive_loss
from stream_ssl.methods.simclr import nt_xent_loss
from stream_ssl.methods.swav import sinkhorn_knopp, swav_loss
from stream_ssl.methods.vicreg import vicreg_loss, vicreg_terms
from stream_ssl.optim import build_optimizer
from stream_ssl.schedules import cosine, linear_warmup, momentum_at, warmup_cosine


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def decorrelated(b: int = 8, d: int = 4) -> torch.Tensor:
    """B x D batch whose columns have zero mean, biased variance 1 and are mutually orthogonal."""
    return hadamard(b)[:, 1:d + 1].clone()


# ---------------------------------------------------------------------------------------------------------
# SimCLR


@pytest.mark.parametrize("t,expected", [(0.1, 0.000272), (0.5, 0.594438), (1.0, 1.165422)])
def test_nt_xent_aligned_orthonormal(t, expected):
    e = torch.eye(4)
    loss = nt_xent_loss(e, e.clone(), temperature=t)
    assert loss.item() == pytest.approx(math.log(1 + 6 * math.exp(-1 / t)), rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=2e-6)


def test_nt_xent_collapsed_symmetric_and_scale_invariant():
    ones = torch.ones(4, 3)
    assert nt_xent_loss(ones, ones, 0.5).item() == pytest.approx(math.log(7), abs=1e-5)
    assert nt_xent_loss(ones, ones, 0.5).item() == pytest.approx(1.945910, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    base = nt_xent_loss(z1, z2, 0.2)
    assert nt_xent_loss(z2, z1, 0.2).item() == pytest.approx(base.item(), rel=1e-6)
    assert nt_xent_loss(3 * z1, 0.5 * z2, 0.2).item() == pytest.approx(base.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# MoCo v3


@pytest.mark.parametrize("t,expected", [(0.2, 0.008005), (1.0, 1.487337)])
def test_moco_one_direction_orthonormal(t, expected):
    e = torch.eye(4)
    loss = moco_contrastive_loss(e, e.clone(), temperature=t)
    assert loss.item() == pytest.approx(2 * t * math.log(1 + 3 * math.exp(-1 / t)), rel=1e-5)
    assert loss.item() == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_moco_collapsed(t):
    ones = torch.ones(4, 8)
    assert moco_contrastive_loss(ones, ones, t).item() == pytest.approx(2 * t * math.log(4), rel=1e-5)


def test_moco_keys_get_no_gradient():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    moco_contrastive_loss(q, k, 0.2).backward()
    assert q.grad is not None and k.grad is None


# ---------------------------------------------------------------------------------------------------------
# BYOL


def test_byol_known_answers():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert byol_loss(p, p.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, torch.tensor([[0.0, 3.0], [5.0, 0.0]])).item() == pytest.approx(2.0, abs=1e-6)
    assert byol_loss(p, -2 * p).item() == pytest.approx(4.0, abs=1e-6)
    z = torch.randn(3, 4, requires_grad=True)
    byol_loss(torch.randn(3, 4, requires_grad=True), z).backward()
    assert z.grad is None  # stop-gradient on the target


# ---------------------------------------------------------------------------------------------------------
# Barlow Twins


def test_barlow_identical_decorrelated_views_is_zero():
    z = decorrelated()
    c = cross_correlation(z, z.clone())
    # float32 near 1 is spaced 6e-8 apart and the reduction order depends on the CPU's kernels: compare at 1e-6
    assert torch.allclose(torch.diagonal(c), torch.full((4,), 1 / (1 + 1e-5)), atol=1e-6)
    assert barlow_twins_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # scaled columns (variance 8.33: c_ii = 0.9999988) are still ~0, at the tolerance the reference uses
    zs = z * math.sqrt(1 / (1 - 0.9999988) * 1e-5)
    assert torch.diagonal(cross_correlation(zs, zs)).mean().item() == pytest.approx(0.9999988, abs=1e-6)
    assert barlow_twins_loss(zs, zs.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_barlow_opposite_views_and_duplicate_columns():
    z = decorrelated(8, 4)
    assert barlow_twins_loss(z, -z).item() == pytest.approx(4 * 4, abs=1e-3)
    dup = z.clone()
    dup[:, 1] = dup[:, 0]
    assert barlow_twins_loss(dup, dup.clone(), lambd=0.0051).item() == pytest.approx(2 * 0.0051, abs=1e-6)


def test_barlow_matches_batchnorm_definition():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(16, 6, generator=g) * 3 + 5, torch.randn(16, 6, generator=g) - 2
    bn = torch.nn.BatchNorm1d(6, affine=False)
    c = bn(z1).T @ bn(z2) / 16
    expected = ((1 - torch.diagonal(c)) ** 2).sum() + 0.0051 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())
    assert barlow_twins_loss(z1, z2).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(z1[:1], z2[:1])


# ---------------------------------------------------------------------------------------------------------
# VICReg


def test_vicreg_collapsed_batch_is_24_75_not_49_5():
    z = torch.ones(8, 16)
    assert vicreg_loss(z, z.clone()).item() == pytest.approx(24.75, abs=1e-4)


def test_vicreg_good_batch_and_shift():
    z = 2 * decorrelated(8, 4)  # unbiased std 2 sqrt(8/7) >= 1, decorrelated
    assert vicreg_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert vicreg_loss(z, z + 1).item() == pytest.approx(25.0, abs=1e-5)
    terms = vicreg_terms(z, z + 1)
    assert terms["invariance"].item() == pytest.approx(1.0)
    assert terms["variance"].item() == 0 and terms["covariance"].item() == pytest.approx(0.0, abs=1e-9)


def test_vicreg_batch_of_one_raises():
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.randn(1, 4), torch.randn(1, 4))


# ---------------------------------------------------------------------------------------------------------
# DINO


def test_dino_zero_logits_give_log_k_and_center_update():
    k = 64
    student = [torch.zeros(4, k) for _ in range(4)]
    teacher = [torch.zeros(4, k) for _ in range(2)]
    assert dino_loss(student, teacher, torch.zeros(1, k), 0.1, 0.04).item() == pytest.approx(math.log(k), rel=1e-6)
    t = [torch.randn(4, k), torch.randn(4, k)]
    center = dino_center(torch.zeros(1, k), t, momentum=0.9)
    assert torch.allclose(center, 0.1 * torch.cat(t).mean(0, keepdim=True), atol=1e-7)


def test_dino_pairs_skip_same_view_and_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 8, generator=g, requires_grad=True) for _ in range(3)]
    t = [torch.randn(3, 8, generator=g, requires_grad=True) for _ in range(2)]
    c = torch.zeros(1, 8)
    loss = dino_loss(s, t, c, 0.1, 0.04)

    def ce(ti, si):
        q = torch.softmax(t[ti].detach() / 0.04, -1)
        return -(q * torch.log_softmax(s[si] / 0.1, -1)).sum(-1).mean()

    expected = (ce(0, 1) + ce(0, 2) + ce(1, 0) + ce(1, 2)) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(x.grad is None for x in t)


# ---------------------------------------------------------------------------------------------------------
# SwAV


def test_sinkhorn_rows_sum_to_one_and_prototypes_share_mass():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1).T
    q = sinkhorn_knopp(scores, eps=0.05, iterations=3)
    assert q.shape == (32, 8)
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-5)
    assert (q >= 0).all()
    # equipartition: every prototype gets about B / K of the mass (exact after many iterations)
    many = sinkhorn_knopp(scores, eps=0.05, iterations=200)
    assert torch.allclose(many.sum(0), torch.full((8,), 32 / 8), rtol=1e-3)
    assert not scores.requires_grad


def test_swav_uniform_scores_give_log_k():
    k = 10
    scores = [torch.zeros(4, k) for _ in range(4)]
    q = [sinkhorn_knopp(s) for s in scores[:2]]
    assert torch.allclose(q[0], torch.full((4, k), 1 / k))
    assert swav_loss(scores, q, 0.1).item() == pytest.approx(math.log(k), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Schedules and optimizer


def test_ema_schedule_at_0_half_and_end():
    k = 1000
    assert momentum_at(0, k) == pytest.approx(0.996)
    assert momentum_at(k / 2, k) == pytest.approx(0.998)
    assert momentum_at(k, k) == pytest.approx(1.0)
    assert momentum_at(0, k, base=0.99) == pytest.approx(0.99)
    values = [momentum_at(i, k) for i in range(k + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04) and cosine(10, 10, 0.04, 0.4) == 0.4
    assert linear_warmup(0, 30, 0.04, 0.07) == 0.04 and linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == 0.07 and linear_warmup(5, 0, 0.04, 0.07) == 0.07


def test_ema_update_math():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)
    same = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(same, target.parameters()))


def test_lr_and_weight_decay_schedules():
    assert warmup_cosine(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, 10) == pytest.approx(0.0)
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(5, 10, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)


def test_lars_excludes_bias_and_norm_parameters():
    from stream_ssl.methods.simclr import SimCLR

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(8))
    model(torch.zeros(2, 3, 5, 5))
    method = SimCLR(model, 8, proj_hidden=16, proj_dim=4)
    groups = method.param_groups()
    decay, no_decay = groups
    names = {id(p): n for n, p in method.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in method.named_parameters() if p.ndim <= 1}
    assert no_decay["lars_exclude"] and no_decay["weight_decay"] == 0.0

    # One LARS step (timm's Lars): the excluded parameter moves by lr * grad (no decay, no trust ratio); the
    # other by the trust-ratio-scaled, decayed gradient. |w| = 4, |g| = 2, wd 0.5: ratio = 0.001 * 4 / (2 + 2).
    w, b, opt = _lars_pair(lr=0.1, weight_decay=0.5)
    assert isinstance(opt, timm.optim.Lars)
    opt.step()
    assert torch.allclose(b, torch.full((2,), 2.0 - 0.1))
    assert torch.allclose(w, torch.full((2, 2), 2.0 - 0.1 * 0.001 * 2.0))
    for name in ("sgd", "adamw"):
        o = build_optimizer(name, [{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
                            lr=0.1, weight_decay=0.5, momentum=0.9)
        assert [g["weight_decay"] for g in o.param_groups] == [0.5, 0.0]
        assert all("lars_exclude" not in g for g in o.param_groups)
    with pytest.raises(ValueError, match="lars, sgd, adamw"):
        build_optimizer("adam", [{"params": [w]}], 0.1, 0.0, 0.9)


def _lars_pair(lr: float, weight_decay: float, **options):
    """A 2x2 weight (all 2, gradient all 1) and an excluded bias under one LARS optimizer."""
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))
    b = torch.nn.Parameter(torch.full((2,), 2.0))
    opt = build_optimizer("lars", [{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
                          lr=lr, weight_decay=weight_decay, momentum=0.9, options=options)
    w.grad, b.grad = torch.ones(2, 2), torch.ones(2)
    return w, b, opt


@pytest.mark.parametrize("lr, options, step", [
    (0.1, {"trust_coeff": 0.02}, 0.1 * 0.02 * 2.0),                        # eta 0.02: 20x the default step
    (0.1, {"trust_coeff": 0.02, "trust_clip": True}, 0.1 * 0.2 * 2.0),     # clip: rate min(0.02, lr) = 0.02
    (0.01, {"trust_coeff": 0.02, "trust_clip": True}, 0.01 * 1.0 * 2.0),   # ratio above lr: capped at lr
])
def test_lars_trust_coefficient_and_clipping(lr, options, step):
    """|w| = 4, |g| = 2, wd 0.5: ratio = eta * 4 / (2 + 2) = eta; with clipping min(ratio / lr, 1); the decayed
    gradient is 2 per entry."""
    w, b, opt = _lars_pair(lr=lr, weight_decay=0.5, **options)
    opt.step()
    assert torch.allclose(w, torch.full((2, 2), 2.0 - step))
    assert torch.allclose(b, torch.full((2,), 2.0 - lr))  # excluded: plain SGD whatever the options


def test_lars_adapts_at_zero_weight_decay_and_rejects_unknown_options():
    w, _, opt = _lars_pair(lr=0.1, weight_decay=0.0)
    opt.step()  # ratio = 0.001 * 4 / 2 on the undecayed gradient 1
    assert torch.allclose(w, torch.full((2, 2), 2.0 - 0.1 * 0.002 * 1.0))
    with pytest.raises(ValueError, match=r"lars does not take eta \(it takes .*trust_clip, trust_coeff"):
        _lars_pair(lr=0.1, weight_decay=0.0, eta=0.02)
    with pytest.raises(ValueError, match="adamw does not take trust_clip"):
        build_optimizer("adamw", [{"params": [w]}], 0.1, 0.0, 0.9, {"trust_clip": True})
    o = build_optimizer("adamw", [{"params": [w]}], 0.1, 0.0, 0.9, {"betas": (0.9, 0.95)})
    assert o.param_groups[0]["betas"] == (0.9, 0.95)
