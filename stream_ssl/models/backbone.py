"""Backbones come from timm by name, always with random weights: nothing is downloaded."""

from __future__ import annotations

import timm
import torch
from torch import nn


def create_backbone(name: str, image_size: int | None = None) -> tuple[nn.Module, int]:
    """A timm model without its classifier (`num_classes=0`), and the size of its pooled features."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:20]
        raise ValueError(f"unknown backbone {name!r}; similar timm names: {close or 'none'} "
                         "(any name from timm.list_models() works)")
    kwargs = {}
    if image_size is not None and _takes_img_size(name):
        kwargs["img_size"] = image_size
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        size = image_size or 224
        dim = model(torch.zeros(2, 3, size, size)).shape[-1]
        model.train(was_training)
    return model, int(dim)


def _takes_img_size(name: str) -> bool:
    """Vision transformers fix their patch grid at creation; CNNs take any size."""
    cfg = timm.models.get_pretrained_cfg(name)
    arch = timm.models.get_arch_name(name) if hasattr(timm.models, "get_arch_name") else name
    return any(k in arch for k in ("vit", "deit", "eva", "beit", "swin", "maxvit", "coatnet")) or (
        cfg is not None and "vit" in str(getattr(cfg, "architecture", ""))
    )
