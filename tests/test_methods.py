"""Every method: builds from the registry, declares its views, trains a step on CPU, and keeps gradients out of
its target/teacher branches; momentum encoders follow the cosine EMA schedule by optimizer step."""

from __future__ import annotations

import pytest
import torch

from stream_ssl.data.augment import ViewSpec
from stream_ssl.methods import METHODS, build_method
from stream_ssl.models.backbone import create_backbone
from stream_ssl.schedules import momentum_at
from tests.helpers.trainer import TINY

ALL = ["simclr", "mocov3", "byol", "barlow", "vicreg", "swav", "dino"]
TARGETS = {"mocov3": ("momentum_backbone", "momentum_projector"), "byol": ("target_backbone", "target_projector"),
           "dino": ("teacher_backbone", "teacher_head")}


def build(name: str, backbone: str = "test_resnet", size: int = 32, **extra):
    torch.manual_seed(0)
    net, dim = create_backbone(backbone, size)
    options = dict(TINY[name][0])
    options.update(extra)
    return build_method(name, net, dim, **options)


def random_views(specs: list[ViewSpec], batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, s.size, s.size, generator=g) for s in specs]


def test_registry_has_the_seven_methods_and_rejects_unknown_names():
    assert sorted(METHODS) == sorted(ALL)
    net, dim = create_backbone("test_resnet", 32)
    with pytest.raises(ValueError, match=r"unknown method 'moco'.*barlow.*vicreg"):
        build_method("moco", net, dim)
    with pytest.raises(ValueError, match="temprature"):
        build_method("simclr", net, dim, temprature=0.2)


@pytest.mark.parametrize("name", ALL)
def test_step_trains_and_targets_get_no_gradient(name):
    method = build(name)
    specs = method.views(32)
    assert all(isinstance(s, ViewSpec) for s in specs)
    if name in ("swav", "dino"):
        assert [s.size for s in specs] == [32, 32, 14, 14]  # 2 global + 2 local (TINY asks 2)
    else:
        assert [s.size for s in specs] == [32, 32]
    targets = [getattr(method, t) for t in TARGETS.get(name, ())]
    target_params = [p for t in targets for p in t.parameters()]
    assert all(not p.requires_grad for p in target_params)
    # Even when asked to track gradients, nothing of the loss flows back into the target branch.
    for p in target_params:
        p.requires_grad_(True)
    method.set_step(0, 10)
    out = method(random_views(specs))
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in target_params)
    online = [p for n, p in method.named_parameters() if n.startswith("backbone.")]
    assert all(p.grad is not None for p in online) and any(p.grad.abs().sum() > 0 for p in online)
    # The trainer's parameter groups never contain target parameters.
    for p in target_params:
        p.requires_grad_(False)
    grouped = {id(p) for g in method.param_groups() for p in g["params"]}
    assert not grouped & {id(p) for p in target_params}


@pytest.mark.parametrize("name", ["mocov3", "byol", "dino"])
def test_momentum_encoder_follows_cosine_schedule(name):
    method = build(name)
    online = [getattr(method, t.replace("momentum_", "").replace("target_", "").replace("teacher_", ""))
              for t in TARGETS[name]]
    targets = [getattr(method, t) for t in TARGETS[name]]
    with torch.no_grad():
        for m in online:
            for p in m.parameters():
                p.add_(1.0)
    before = [p.detach().clone() for t in targets for p in t.parameters()]
    total = 100
    logged = method.on_optimizer_step(1, total)  # the update after optimizer step 0
    base = 0.99 if name == "mocov3" else 0.996
    assert logged["momentum"] == pytest.approx(momentum_at(0, total, base)) == pytest.approx(base)
    after = [p.detach() for t in targets for p in t.parameters()]
    src = [p.detach() for m in online for p in m.parameters()]
    for b, a, o in zip(before, after, src):
        assert torch.allclose(a, base * b + (1 - base) * o, atol=1e-6)
    assert method.on_optimizer_step(total // 2 + 1, total)["momentum"] == pytest.approx((1 + base) / 2)
    frozen = [p.detach().clone() for t in targets for p in t.parameters()]
    assert method.on_optimizer_step(total + 1, total)["momentum"] == 1.0  # past the end: the target is frozen
    assert all(torch.equal(a, b) for a, b in zip(frozen, [p for t in targets for p in t.parameters()]))


def test_dino_teacher_temperature_center_and_frozen_last_layer():
    method = build("dino", teacher_temp_warmup_fraction=0.5, center_momentum=0.9, freeze_last_layer_fraction=0.1)
    assert method.set_step(0, 100)["teacher_temp"] == pytest.approx(0.04)
    assert method.set_step(25, 100)["teacher_temp"] == pytest.approx(0.055)
    assert method.set_step(50, 100)["teacher_temp"] == pytest.approx(0.07)
    assert method.set_step(99, 100)["teacher_temp"] == pytest.approx(0.07)
    views = random_views(method.views(32))
    assert method.center.abs().sum() == 0
    with torch.no_grad():
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))  # globals in one pass
    method(views)["loss"].backward()
    expected = 0.1 * teacher.mean(0, keepdim=True)
    assert torch.allclose(method.center, expected, atol=1e-5)
    assert "center" in method.state_dict()  # checkpointed
    method.before_optimizer_step(5, 100)
    assert all(p.grad is None for p in method.head.last_layer.parameters())
    method(views)["loss"].backward()
    method.before_optimizer_step(10, 100)
    assert all(p.grad is not None for p in method.head.last_layer.parameters())


def test_swav_prototypes_normalized_frozen_and_queue():
    method = build("swav", freeze_prototypes_fraction=0.1, queue_length=8, queue_start_fraction=0.0)
    norms = method.prototypes.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms))
    views = random_views(method.views(32))
    method.set_step(0, 100)
    method(views)["loss"].backward()
    method.before_optimizer_step(0, 100)
    assert method.prototypes.weight.grad is None
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    method.on_optimizer_step(1, 100)
    norms = method.prototypes.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms))
    assert method.queue_filled == 4
    method(views)
    assert method.queue_filled == 8
    state = method.rank_state()
    other = build("swav", queue_length=8)
    other.load_rank_state(state)
    assert torch.equal(other.queue, method.queue) and other.queue_filled == 8


@pytest.mark.parametrize("name", ["barlow", "vicreg"])
def test_batch_statistics_losses_refuse_a_batch_of_one(name):
    method = build(name)
    method.eval()  # BatchNorm would refuse first in training mode; the loss itself must refuse too
    with pytest.raises(ValueError, match="at least 2"):
        method(random_views(method.views(32), batch=1))


def test_vit_recipes_mocov3_and_dino_multicrop():
    moco = build("mocov3", backbone="test_vit", temperature=None)
    assert moco.temperature == 0.2 and len([m for m in moco.projector if isinstance(m, torch.nn.Linear)]) == 3
    assert all(not p.requires_grad for p in moco.backbone.patch_embed.parameters())
    dino = build("dino", backbone="test_vit")
    out = dino(random_views(dino.views(32), batch=3))  # 32 px global and 14 px local crops through one ViT
    assert torch.isfinite(out["loss"])


def test_losses_stay_float32_under_bf16_autocast():
    method = build("swav")
    views = random_views(method.views(32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(views)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
