"""Every method: builds from the registry, declares its views, trains a step on CPU, and keeps gradients out of
its target/teacher branches; momentum encoders follow the cosine EMA schedule by optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from stream_ssl.data.augment import ViewSpec
from stream_ssl.methods import METHODS, barlow, build_method, byol, dino, mocov3, simclr, swav, vicreg
from stream_ssl.methods.base import embedding_health, encode_views
from stream_ssl.models.backbone import create_backbone
from stream_ssl.schedules import momentum_at
from tests.helpers.trainer import TINY

ALL = ["simclr", "mocov3", "byol", "barlow", "vicreg", "swav", "dino"]
TARGETS = {"mocov3": ("backbone", "projector"), "byol": ("backbone", "projector"), "dino": ("backbone", "head")}


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
    targets = [method.target[t] for t in TARGETS.get(name, ())]
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
    online = [getattr(method, t) for t in TARGETS[name]]
    targets = [method.target[t] for t in TARGETS[name]]
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


@pytest.mark.parametrize("name,old", [("byol", "target_"), ("mocov3", "momentum_"), ("dino", "teacher_")])
def test_checkpoints_with_the_old_target_names_load(name, old):
    """Before MomentumMethod, each method named its target network its own way; their checkpoints still load."""
    method = build(name)
    state = method.state_dict()
    renamed = {k.replace("target.", old, 1) if k.startswith("target.") else k: v + 1 if k.startswith("target.")
               else v for k, v in state.items()}
    assert any(k.startswith(old) for k in renamed) and not any(k.startswith("target.") for k in renamed)
    fresh = build(name)
    fresh.load_state_dict(renamed)
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], renamed[k.replace("target.", old, 1)]) for k in state if k.startswith("target."))


def test_dino_teacher_temperature_center_and_frozen_last_layer():
    method = build("dino", teacher_temp_warmup_fraction=0.5, center_momentum=0.9, freeze_last_layer_fraction=0.1)
    assert method.set_step(0, 100)["teacher_temp"] == pytest.approx(0.04)
    assert method.set_step(25, 100)["teacher_temp"] == pytest.approx(0.055)
    assert method.set_step(50, 100)["teacher_temp"] == pytest.approx(0.07)
    assert method.set_step(99, 100)["teacher_temp"] == pytest.approx(0.07)
    views = random_views(method.views(32))
    assert method.center.abs().sum() == 0
    with torch.no_grad():
        teacher = method.target.head(method.target.backbone(torch.cat(views[:2])))  # globals in one pass
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


# The function each method's loss runs through fp32_loss (SwAV: also its Sinkhorn-Knopp).
LOSSES = {"simclr": [(simclr, "nt_xent_loss")], "mocov3": [(mocov3, "moco_contrastive_loss")],
          "byol": [(byol, "byol_loss")], "barlow": [(barlow, "cross_correlation")],
          "vicreg": [(vicreg, "vicreg_terms")], "swav": [(swav, "swav_loss"), (swav, "sinkhorn_knopp")],
          "dino": [(dino, "dino_loss")]}


def _fp32_layer(fn):
    """The fp32_loss wrapper under any outer decorator (torch.no_grad copies its marker outward)."""
    while getattr(getattr(fn, "__wrapped__", None), "_fp32_loss", False):
        fn = fn.__wrapped__
    assert getattr(fn, "_fp32_loss", False), fn
    return fn


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


@pytest.mark.parametrize("name", ALL)
def test_losses_get_float32_inputs_under_bf16_autocast(name, monkeypatch):
    """Under CPU bf16 autocast, every loss (also those taking lists of per-view tensors: DINO, SwAV) receives
    float32 tensors and runs with autocast off."""
    seen = []
    for module, attr in LOSSES[name]:
        layer = _fp32_layer(getattr(module, attr))
        inner = layer.__wrapped__

        def spy(*args, _inner=inner, _attr=attr, **kwargs):
            tensors = _tensors(list(args) + list(kwargs.values()))
            seen.append((_attr, {t.dtype for t in tensors if t.is_floating_point()},
                         torch.is_autocast_enabled("cpu")))
            return _inner(*args, **kwargs)

        monkeypatch.setattr(layer, "__wrapped__", spy)
    method = build(name)
    method.set_step(0, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(random_views(method.views(32)))
    assert {a for a, _, _ in seen} == {attr for _, attr in LOSSES[name]}
    assert all(dtypes == {torch.float32} and not autocast for _, dtypes, autocast in seen), seen
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_list_arguments_in_bf16_give_the_float32_loss():
    """dino_loss on bf16 lists under autocast equals dino_loss on the same values in float32 (before the fix,
    log_softmax ran in bf16: 8.5055 vs 8.5000 on the issue's inputs)."""
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(8, 4096, generator=g).bfloat16() for _ in range(4)]
    teacher = [torch.randn(8, 4096, generator=g).bfloat16() for _ in range(2)]
    center = torch.zeros(1, 4096)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dino.dino_loss(student, teacher, center)
    exact = dino.dino_loss([s.float() for s in student], [t.float() for t in teacher], center)
    assert low.dtype == torch.float32 and torch.equal(low, exact)


def test_views_through_batchnorm_follow_the_reference_and_can_switch():
    defaults = {name: build(name).views_together for name in ALL}
    assert defaults == {"simclr": True, "swav": True, "dino": True,
                        "byol": False, "barlow": False, "vicreg": False, "mocov3": False}
    assert build("byol", views_together=True).views_together
    assert not build("simclr", views_together=False).views_together
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g) + 3.0]
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8, affine=False))
    joint, separate = encode_views(bn, views, True), encode_views(bn, views, False)
    # Separate: each view normalized by its own statistics (per-view mean 0); together: by the pooled ones.
    assert separate[0].mean(0).abs().max() < 1e-5 and joint[0].mean(0).abs().max() > 0.1
    bn.eval()  # running statistics: the modes agree
    assert all(torch.allclose(a, b) for a, b in zip(encode_views(bn, views, True), encode_views(bn, views, False)))
    ln = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.LayerNorm(8))
    assert all(torch.allclose(a, b, atol=1e-6)
               for a, b in zip(encode_views(ln, views, True), encode_views(ln, views, False)))
    # A method with BatchNorm computes a different loss in the two modes (same weights, same views).
    x = random_views(build("byol").views(32))
    a, b = build("byol")(x)["loss"], build("byol", views_together=True)(x)["loss"]
    assert not torch.allclose(a, b)


def test_collapse_monitor_known_answers():
    d = 16
    healthy = embedding_health(3.0 * torch.eye(d))  # scale does not matter
    assert healthy["embed_std"].item() == pytest.approx(1 / math.sqrt(d), rel=1e-5)
    assert healthy["embed_rank"].item() == pytest.approx(d, rel=1e-5)
    collapsed = embedding_health(torch.randn(d).expand(8, d) * 5.0)
    assert collapsed["embed_std"].item() == pytest.approx(0.0, abs=1e-6)
    assert collapsed["embed_rank"].item() == pytest.approx(1.0, abs=1e-4)
    two = embedding_health(torch.eye(d)[[0, 0, 0, 1, 1, 1]])  # two directions, equally often
    assert two["embed_rank"].item() == pytest.approx(2.0, rel=1e-5)
    broken = embedding_health(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))  # a diverged batch: no SVD error
    assert math.isnan(broken["embed_std"].item()) and math.isnan(broken["embed_rank"].item())


@pytest.mark.parametrize("name", ALL)
def test_every_method_reports_the_collapse_monitor(name):
    method = build(name)
    out = method(random_views(method.views(32)))
    dims = {"dino": 64, "barlow": 128, "vicreg": 128}  # DINO: the bottleneck; others: the projector output
    assert method.embed_dim == dims.get(name, 64)
    assert 0 < out["embed_std"].item() <= 1 and 1 <= out["embed_rank"].item() <= 4  # batch of 4


def test_swav_queue_follows_the_papers_rule():
    method = build("swav")  # queue_length None: automatic
    assert method.queue_size(4) == 3840 and method.queue_size(100) == 3900 and method.queue_size(256) == 0
    assert build("swav", queue_length=0).queue_size(4) == 0 and build("swav", queue_length=8).queue_size(4) == 8
    views = random_views(method.views(32))
    method.set_step(14, 100)  # before 15% of the budget: no queue yet
    method(views)
    assert method.queue is None
    method.set_step(15, 100)
    method(views)
    assert method.queue.shape == (2, 3840, 64) and method.queue_filled == 4


@pytest.mark.parametrize("name", ["mocov3", "byol", "barlow", "vicreg", "swav", "dino"])
def test_color_strength_option_sets_simclr_jitter_on_every_view(name):
    """color_strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s) on every view, as SimCLR's option; None keeps the
    recipe's (BYOL-style (0.4, 0.4, 0.2, 0.1); SwAV's is already s = 1)."""
    jitter = lambda v: (v.brightness, v.contrast, v.saturation, v.hue)  # noqa: E731
    own = build(name).views(32)
    expected = (0.8, 0.8, 0.8, 0.2) if name == "swav" else (0.4, 0.4, 0.2, 0.1)
    assert all(jitter(v) == pytest.approx(expected) for v in own)
    strong = build(name, color_strength=1.0).views(32)
    weak = build(name, color_strength=0.5).views(32)
    assert all(jitter(v) == pytest.approx((0.8, 0.8, 0.8, 0.2)) for v in strong)
    assert all(jitter(v) == pytest.approx((0.4, 0.4, 0.4, 0.1)) for v in weak)
    # Everything else about the views (sizes, crops, blur, solarization) stays the recipe's.
    assert [(v.size, v.scale, v.blur_p, v.solarize_p) for v in strong] == [(v.size, v.scale, v.blur_p, v.solarize_p)
                                                                        for v in own]
