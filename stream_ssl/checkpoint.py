"""Atomic checkpoints: written under a temporary name, fsynced, then renamed; `latest` is a pointer file
replaced the same way. A process killed at any moment leaves either the previous checkpoint or the new one,
never a torn file. Loaded with weights_only=True (no arbitrary unpickling)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

PATTERN = "step-*.pt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run: Path, step: int, state: dict, keep: int = 0) -> Path:
    """Write `state` as RUN/checkpoints/step-STEP.pt and point `latest` at it. With `keep` > 0, only the
    newest `keep` checkpoints stay."""
    folder = Path(run) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    latest_tmp = folder / "latest.tmp"
    with open(latest_tmp, "w") as f:
        f.write(path.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, folder / "latest")
    _fsync_dir(folder)
    if keep > 0:
        for old in sorted(folder.glob(PATTERN))[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run: Path) -> Path | None:
    pointer = Path(run) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.exists() else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """This process's random states (Python, NumPy, torch, CUDA) in types that load with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
