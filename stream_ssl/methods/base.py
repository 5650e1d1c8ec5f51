"""What every SSL method provides, the registry that finds one by name, and the parts methods share.

A method is an nn.Module that owns its heads, its loss, its momentum/teacher parts and its parameter
groups. The trainer only calls, per optimizer step k (0-based) of K:

    method.set_step(k, K)                  # before the forward pass(es) of step k: step-dependent settings
    out = method(views)                    # {'loss': scalar, ...extra scalars to log}, per micro-batch
    method.before_optimizer_step(k, K)     # after backward (gradients synced): e.g. cancel frozen gradients
    method.on_optimizer_step(k + 1, K)     # after the optimizer step: momentum encoders, normalizations
                                           # (not called when the fp16 gradient scaler skipped the step)

plus `views(image_size)` once and `param_groups()` once. Besides its loss, `forward` returns the collapse
monitor's scalars for the online projector's output on the first view (`self.monitor(z)`: `embed_std`,
`embed_rank`). Optional hooks, no-ops here: `rank_state()` / `load_rank_state(state)` for per-process state a
checkpoint must keep (SwAV's queue). Nothing in the trainer is method-specific. All schedules are functions
of the optimizer step (stream_ssl/schedules.py), so a resumed run needs no schedule state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stream_ssl.data.augment import ViewSpec
from stream_ssl.schedules import momentum_at

METHODS: dict[str, type[SSLMethod]] = {}


def register(cls: type[SSLMethod]) -> type[SSLMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, backbone: nn.Module, feature_dim: int, **options) -> SSLMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[name](backbone, feature_dim, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"method {name!r}: {e} (check method_options)") from None
        raise


# ----------------------------------------------------------------------------------------------------------
# Momentum encoders.


def make_target(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` (momentum encoder / teacher): no parameter requires gradient."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (buffers such as BN
    running statistics are the target's own, as in BYOL/MoCo/DINO)."""
    t = [p for p in target.parameters()]
    o = [p.detach() for p in online.parameters()]
    if len(t) != len(o):
        raise ValueError("target and online networks differ in structure")
    if momentum >= 1.0:
        return
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)


# ----------------------------------------------------------------------------------------------------------
# Numerics and forward helpers.


def _float32(x):
    """Floating tensors, also inside lists and tuples, as float32; everything else unchanged."""
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_float32(v) for v in x)
    return x


def _first_device(values) -> str:
    for v in values:
        if torch.is_tensor(v):
            return v.device.type
        if isinstance(v, (list, tuple)) and v:
            return _first_device(v)
    return "cpu"


def fp32_loss(fn):
    """Run a loss in float32 with autocast off: softmax/log/exp/Sinkhorn in bf16/fp16 lose the signal. Tensor
    arguments, and tensors in list/tuple arguments (DINO's and SwAV's per-view outputs), become float32.
    The loss is looked up as `wrapper.__wrapped__` at call time, so a test can watch what it receives."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = _float32(args)
        kwargs = {k: _float32(v) for k, v in kwargs.items()}
        with torch.autocast(device_type=_first_device(list(args) + list(kwargs.values())), enabled=False):
            return wrapper.__wrapped__(*args, **kwargs)

    wrapper._fp32_loss = True
    return wrapper


def encode_views(net: nn.Module, views: list[torch.Tensor], together: bool = True) -> list[torch.Tensor]:
    """Apply `net` to every view; returns one output per view. With `together`, consecutive views of the same
    resolution go through one forward pass (BatchNorm statistics over all of them: the reference SimCLR, SwAV
    and DINO); otherwise every view is its own pass (BatchNorm statistics per view: the reference BYOL, Barlow
    Twins, VICReg and MoCo v3)."""
    if not together:
        return [net(v) for v in views]
    outs: list[torch.Tensor] = []
    i = 0
    while i < len(views):
        j = i + 1
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        y = net(torch.cat(views[i:j]) if j - i > 1 else views[i])
        outs.extend(y.chunk(j - i) if j - i > 1 else [y])
        i = j
    return outs


@torch.no_grad()
def embedding_health(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The collapse monitor's numbers for a batch of embeddings z (B x d), in float32:
    - `embed_std`: the standard deviation over the batch (unbiased) of the L2-normalized embeddings, averaged
      over the d dimensions: 1/sqrt(d) when the embeddings spread over the sphere, 0 when they all coincide
      (SimSiam, Chen & He 2021, Fig. 2). Rows of the identity (B = d) give exactly 1/sqrt(d).
    - `embed_rank`: the effective rank exp(H(p)), p the singular values of the normalized batch divided by their
      sum (RankMe, Garrido et al. 2023): 1 when collapsed, at most min(B, d); d for the identity.
    Both are NaN when the batch holds a non-finite value (a diverging run; the trainer reports that itself)."""
    zn = F.normalize(z.detach().float().flatten(1), dim=1)
    finite = torch.isfinite(zn).all()
    zn = torch.where(finite, zn, torch.zeros_like(zn))  # the SVD refuses non-finite input; no host sync here
    std = zn.std(dim=0).mean() if zn.shape[0] > 1 else zn.new_zeros(())
    s = torch.linalg.svdvals(zn)
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).sum())
    nan = torch.full_like(std, float("nan"))
    return {"embed_std": torch.where(finite, std, nan), "embed_rank": torch.where(finite, rank, nan)}


def with_color_strength(views: list[ViewSpec], strength: float | None) -> list[ViewSpec]:
    """The views with SimCLR's color jitter of strength s, (0.8s, 0.8s, 0.8s, 0.2s) for brightness, contrast,
    saturation and hue (s = 1 is SimCLR's and SwAV's; BYOL's recipe, (0.4, 0.4, 0.2, 0.1), is about s = 0.5);
    None keeps the recipe's own jitter."""
    if strength is None:
        return views
    s = float(strength)
    return [dataclasses.replace(v, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=min(0.5, 0.2 * s))
            for v in views]


def local_crop_size(image_size: int, backbone: nn.Module | None = None) -> int:
    """Local crop side for multi-crop: 96 at 224 px, in proportion below (32 -> 14, 64 -> 28, 96 -> 42).
    For a patch-based backbone, rounded to a whole number of patches (at least one)."""
    size = max(8, 2 * round(image_size * 96 / 224 / 2))
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch:
        p = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        size = max(p, p * round(size / p))
    return size


class SSLMethod(nn.Module):
    name: ClassVar[str] = ""
    needs_batch_stats: ClassVar[bool] = True  # the loss uses statistics over the batch: a batch of 1 is an error
    # How the reference implementation feeds views through BatchNorm (see encode_views); `views_together`
    # (a method option) overrides it.
    VIEWS_TOGETHER: ClassVar[bool] = True

    def __init__(self, backbone: nn.Module, feature_dim: int, views_together: bool | None = None):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.views_together = self.VIEWS_TOGETHER if views_together is None else bool(views_together)
        self.embed_dim: int | None = None  # the monitored embedding's size, known after the first forward

    def encode(self, net, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """`encode_views` with this method's BatchNorm mode."""
        return encode_views(net, views, self.views_together)

    def monitor(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The collapse monitor's scalars for the online embedding `z` (see `embedding_health`)."""
        self.embed_dim = int(z.flatten(1).shape[1])
        return embedding_health(z)

    def views(self, image_size: int) -> list[ViewSpec]:
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalized float views in, {'loss': scalar, ...extra scalars to log} out."""
        raise NotImplementedError

    def set_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Called before the forward pass(es) of optimizer step `step` (0-based). Returns values to log."""
        return {}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after the gradients of step `step` (0-based) are complete, before the optimizer uses them."""

    def on_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Called after every optimizer step with `step` = optimizer steps done so far (1..K): momentum
        encoders, normalizations. Returns values to log."""
        return {}

    def rank_state(self) -> dict | None:
        """This process's own state that a checkpoint must keep (tensors, lists, numbers), or None."""
        return None

    def load_rank_state(self, state: dict) -> None:
        """Put back what `rank_state` returned (same world size only)."""

    def param_groups(self) -> list[dict]:
        """Parameter groups; biases and norm parameters are marked to skip weight decay and LARS adaptation."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "name": "no_decay"}]


class MomentumMethod(SSLMethod):
    """A method with a target network: BYOL's target, MoCo v3's momentum encoder, DINO's teacher. It is a frozen
    copy of some online modules (`track("backbone", "projector")`, after building them), updated after every
    optimizer step the gradient scaler did not skip as target <- m target + (1 - m) online, with m following a
    cosine from `base_momentum` to `final_momentum` over the optimizer steps (schedules.momentum_at). The
    target gets no gradient; its BatchNorm statistics are its own. `target_forward(x)` runs the tracked copies
    in order; they live in `self.target` (`target.backbone`, ... in checkpoints)."""

    # What the target modules were called in checkpoints written before this class (read: renamed on load).
    OLD_PREFIXES = ("target_", "momentum_", "teacher_")

    def __init__(self, backbone: nn.Module, feature_dim: int, base_momentum: float, final_momentum: float = 1.0,
                 views_together: bool | None = None):
        super().__init__(backbone, feature_dim, views_together)
        self.base_momentum, self.final_momentum = base_momentum, final_momentum
        self.tracked: tuple[str, ...] = ()
        self._register_load_state_dict_pre_hook(self._rename_old_targets)

    def track(self, *names: str) -> None:
        """Make the target network: frozen copies of the online modules `names`, applied in that order."""
        self.tracked = names
        self.target = nn.ModuleDict({n: make_target(getattr(self, n)) for n in names})

    def target_forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.tracked:
            x = self.target[name](x)
        return x

    def on_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        m = momentum_at(step - 1, total_steps, self.base_momentum, self.final_momentum)
        for name in self.tracked:
            ema_update(self.target[name], getattr(self, name), m)
        return {"momentum": m}

    def _rename_old_targets(self, state_dict: dict, prefix: str, *args) -> None:
        for key in list(state_dict):
            for old in self.OLD_PREFIXES:
                for name in self.tracked:
                    if key.startswith(f"{prefix}{old}{name}."):
                        rest = key[len(f"{prefix}{old}{name}."):]
                        state_dict[f"{prefix}target.{name}.{rest}"] = state_dict.pop(key)
