"""Helpers for the evaluation, sweep and launch tests: run folders without training, tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from stream_ssl.config import TrainConfig, config_json
from stream_ssl.models.backbone import create_backbone

TINY_BACKBONE = "test_byobnet"  # ~0.2M parameters, 256-d features; fast at 32 px on a CPU


def make_run(folder: Path, data: str = "", backbone: str = TINY_BACKBONE, image_size: int = 32,
             unique_samples: str = "1.0", budget_samples: str = "1K", seed: int = 0, init_seed: int = 0) -> Path:
    """A run folder as train.py leaves it (config.json + backbone.safetensors) with a randomly initialized
    backbone, so evaluation can be tested without training."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(data=data, unique_samples=unique_samples, budget_samples=budget_samples, backbone=backbone,
                      image_size=image_size, seed=seed, out=str(folder))
    (folder / "config.json").write_text(config_json(cfg))
    torch.manual_seed(init_seed)
    model, _ = create_backbone(backbone, image_size)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "backbone.safetensors"), metadata={"timm_name": backbone})
    return folder


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
