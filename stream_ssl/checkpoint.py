"""Atomic checkpoints: written under a temporary name, then renamed; loaded with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(run: Path, step: int, state: dict) -> Path:
    folder = Path(run) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    latest = folder / "latest"
    latest_tmp = folder / "latest.tmp"
    latest_tmp.write_text(path.name + "\n")
    os.replace(latest_tmp, latest)
    return path


def latest_checkpoint(run: Path) -> Path | None:
    pointer = Path(run) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.exists() else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
