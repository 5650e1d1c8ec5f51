"""Backbones come from timm by name, always with random weights: nothing is downloaded."""

from __future__ import annotations

import timm
import torch
from torch import nn


def create_backbone(name: str, image_size: int | None = None, **options) -> tuple[nn.Module, int]:
    """A timm model without its classifier (`num_classes=0`), and the size of its pooled features.

    Vision transformers get `img_size=image_size` and `dynamic_img_size=True`, so multi-crop methods can feed
    them smaller local crops (the position embedding is interpolated). `options` go to `timm.create_model`
    (e.g. `drop_path_rate=0.1`). The state dict does not depend on `dynamic_img_size`, so an exported backbone
    loads into `create_backbone(name, image_size)`."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:20]
        raise ValueError(f"unknown backbone {name!r}; similar timm names: {close or 'none'} "
                         "(any name from timm.list_models() works)")
    kwargs = dict(options)
    if image_size is not None and _takes_img_size(name):
        kwargs.setdefault("img_size", image_size)
        if _is_vit_name(name):
            kwargs.setdefault("dynamic_img_size", True)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        size = image_size or 224
        dim = model(torch.zeros(2, 3, size, size)).shape[-1]
        model.train(was_training)
    return model, int(dim)


def is_vit(model: nn.Module) -> bool:
    """True for transformer backbones that cut the image into patches (recipes differ for them)."""
    return hasattr(model, "patch_embed")


def _arch(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    arch = timm.models.get_arch_name(name) if hasattr(timm.models, "get_arch_name") else name
    return f"{arch} {getattr(cfg, 'architecture', '') if cfg is not None else ''}"


def _is_vit_name(name: str) -> bool:
    arch = _arch(name)
    return any(k in arch for k in ("vit", "deit")) and not any(k in arch for k in ("maxvit", "fastvit", "levit"))


def _takes_img_size(name: str) -> bool:
    """Vision transformers fix their patch grid at creation; CNNs take any size."""
    return any(k in _arch(name) for k in ("vit", "deit", "eva", "beit", "swin", "maxvit", "coatnet"))
