"""Optimizers: LARS, SGD with momentum, AdamW over a method's parameter groups (schedules: stream_ssl/schedules.py).

LARS is timm's `Lars` (You et al. 2017, with LARC trust clipping as an option). Per parameter of an adapted
group, with w the weights, g the gradient and wd the weight decay:

    ratio = trust_coeff * |w| / (|g| + wd |w| + eps)          (1 when |w| or |g| is 0)
    trust_clip: ratio = min(ratio / lr, 1)                      (the step's rate becomes min(trust ratio, lr))
    d = ratio * (g + wd w);  buf = momentum * buf + d;  w -= lr * buf

Groups marked `lars_exclude` (biases, norm parameters) get neither weight decay nor adaptation: plain SGD with
momentum. Recipes differ in the trust coefficient (`--optimizer-options`): the LARS paper, SimCLR, BYOL and the
ResNet-50 YAMLs use trust_coeff 0.001 without clipping (the default); solo-learn's small-image and ImageNet-100
recipes (the small-image YAMLs) use trust_coeff 0.02 with trust_clip, which changes the step by ~20x for the
same lr, so their learning rates only carry over with their options.
"""

from __future__ import annotations

import inspect

import torch
from timm.optim import Lars

OPTIMIZERS = ("lars", "sgd", "adamw")
# What --optimizer-options may set per optimizer (lr, momentum and weight decay have their own settings).
_CLASSES = {"lars": Lars, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
_OWN_SETTINGS = {"params", "lr", "momentum", "weight_decay", "always_adapt", "foreach", "fused", "capturable",
                 "differentiable", "maximize"}


def optimizer_option_names(name: str) -> list[str]:
    """The keys `--optimizer-options` accepts for optimizer `name`."""
    params = inspect.signature(_CLASSES[name].__init__).parameters
    return sorted(p for p in params if p not in _OWN_SETTINGS and p != "self")


def check_optimizer_options(name: str, options: dict) -> None:
    unknown = sorted(set(options) - set(optimizer_option_names(name)))
    if unknown:
        raise ValueError(f"--optimizer-options: {name} does not take {', '.join(unknown)} "
                         f"(it takes {', '.join(optimizer_option_names(name))})")


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float,
                    options: dict | None = None):
    """LARS, SGD (momentum) or AdamW over the method's parameter groups. Groups that set their own
    `weight_decay` (0 for biases and norm parameters) keep it; `lars_exclude` only matters to LARS. `options`
    are the optimizer's own settings (LARS: trust_coeff, trust_clip, eps, nesterov; AdamW: betas, eps, ...)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    options = dict(options or {})
    check_optimizer_options(name, options)
    groups = [dict(g) for g in groups]
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
        excluded = g.pop("lars_exclude", False)
        if name == "lars":  # adapted even at weight decay 0; excluded groups: no decay, no adaptation
            g["always_adapt"] = not excluded
            g["weight_decay"] = 0.0 if excluded else g["weight_decay"]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **options)
    return _CLASSES[name](groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **options)
