"""Checkpoint files: atomic writes, the `latest` pointer, loading, and the random states they carry.

Files are written under a temporary name, fsynced, then renamed; `latest` is a pointer file replaced the same
way. A process killed at any moment leaves either the previous checkpoint or the new one, never a torn file.
Loaded with weights_only=True (no arbitrary unpickling). What a checkpoint holds, and how a run saves and
resumes, is stream_ssl/checkpointer.py's.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from shard_tools.errors import ToolError
from shard_tools.quantities import format_bytes

PATTERN = "step-*.pt"
FORMAT = 2  # what checkpointer.save writes


# ----------------------------------------------------------------------------------------------------------
# Files.


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


class CheckpointWriteError(ToolError, OSError):
    """A checkpoint that could not be written (a full disk, ...): one line; the previous checkpoint stays."""


class _Watched:
    """A file's `write` that keeps the OSError it raised: torch.save reports a failed write as an unrelated
    RuntimeError ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    watched = None
    try:
        with open(tmp, "wb") as f:
            watched = _Watched(f)
            write(watched)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind; the previous checkpoint stays
        if watched is not None and watched.error is not None and watched.error is not e:
            raise watched.error from e
        raise


def _cannot_write(path: Path, error: OSError) -> CheckpointWriteError:
    free = shutil.disk_usage(path.parent).free
    previous = latest_checkpoint(path.parent.parent)
    kept = f"the last checkpoint, {previous}, is intact" if previous else "there is no earlier checkpoint"
    return CheckpointWriteError(f"could not write checkpoint {path}: {error.strerror or error} ({format_bytes(free)} "
                                f"free there); {kept}: make room and run again with --resume auto")


def save_checkpoint(run: Path, step: int, state: dict, keep: int = 0) -> Path:
    """Write `state` as RUN/checkpoints/step-STEP.pt and point `latest` at it. With `keep` > 0, only the
    newest `keep` checkpoints stay."""
    folder = Path(run) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    try:
        _write_atomic(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise _cannot_write(path, e) from e
    _write_atomic(folder / "latest", lambda f: f.write((path.name + "\n").encode()))
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


def step_of(ckpt: Path) -> int:
    """The optimizer step of a checkpoint file `step-00000250.pt`."""
    return int(Path(ckpt).stem.split("-")[1])


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# Random states.


def rng_state() -> dict:
    """This process's random states (Python, NumPy, torch, and the current CUDA device's) in types that load
    with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only: a resumed run may see fewer GPUs
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
