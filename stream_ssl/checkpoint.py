"""Checkpoints of a run: atomic files, and what a resumed run needs to continue exactly.

Files: written under a temporary name, fsynced, then renamed; `latest` is a pointer file replaced the same
way. A process killed at any moment leaves either the previous checkpoint or the new one, never a torn file.
Loaded with weights_only=True (no arbitrary unpickling).

Contents (`save`): the step, the model and optimizer (and gradient scaler) state, the schedule (for reading;
schedules are pure functions of the step), the settings, and per process its random states and the method's
per-rank state (`SSLMethod.rank_state`, e.g. SwAV's queue). `load_for_resume` finds the checkpoint every
process agrees on and loads the model before Accelerate wraps it; `restore_training_state` puts the rest back
once the optimizer is prepared.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from shard_tools.errors import ToolError
from shard_tools.quantities import format_bytes
from stream_ssl.distributed import all_gather_objects

if TYPE_CHECKING:
    from stream_ssl.run import Run

PATTERN = "step-*.pt"
FORMAT = 2
# Test hook: the process SIGKILLs itself right after writing the checkpoint of this optimizer step.
KILL_ENV = "STREAM_SSL_KILL_AFTER_CHECKPOINT"


# ----------------------------------------------------------------------------------------------------------
# A run's checkpoints.


def save(run: Run, step: int, ended: str | None = None) -> None:
    """Checkpoint of everything a resumed run needs; per-process parts (RNG, method queues, the meter's figures)
    are gathered. `ended` says why this segment of the run ends here (a stop signal), if it does."""
    meter = run.meter.state_dict(step)
    if ended:
        meter["segments"][-1]["ended"] = ended
    mine = {"rng": rng_state(), "method": run.method.rank_state(), "meter": meter}
    ranks = all_gather_objects(mine)
    acc = run.acc
    if acc.is_main_process:
        s = run.schedule
        state = {
            "format": FORMAT,
            "step": step,
            "micro_step": step * run.cfg.grad_accum,
            "samples": step * run.global_batch,
            "global_batch": run.global_batch,
            "world_size": run.world_size,
            "model": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "schedule": {"peak_lr": s.peak_lr, "warmup_steps": s.warmup, "total_steps": s.total},
            "ranks": ranks,
            "config": run.cfg.to_dict(),
        }
        path = save_checkpoint(run.out, step, state, keep=run.cfg.keep_checkpoints)
        if run.remote is not None:
            run.remote.publish(path, keep=run.cfg.keep_checkpoints)
    acc.wait_for_everyone()
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def restore_meter(run: Run, state: dict | None, window: bool = True) -> None:
    """The run's figures up to the checkpoint (the open metrics window too, when the processes are the same).
    The segment that wrote the checkpoint ended there: by a stop signal, or unexpectedly (killed, failed) when
    the checkpoint does not say why."""
    if state is None:
        return
    if not window:  # another number of processes: each one's window cannot be carried over
        state = {**state, "window": {"losses": [], "extra": {}, "seen": 0, "wait": 0.0,
                                     "io": dict.fromkeys(state["io_total"], 0)}}
    last = state["segments"][-1]
    if last["ended"] == "checkpoint":
        last["ended"] = f"ended without a clean stop after its checkpoint at step {last['end_step']} (killed or failed)"
    run.meter.load_state_dict(state, device=run.acc.device)


def step_of(ckpt: Path) -> int:
    """The optimizer step of a checkpoint file `step-00000250.pt`."""
    return int(Path(ckpt).stem.split("-")[1])


def resume_point(run: Run) -> Path | None:
    """The checkpoint `--resume` names, the same on every process (ranks that see different files, e.g. a
    node-local --out, would resume at different steps and hang: stop with one line instead)."""
    from stream_ssl.run import RunError

    cfg = run.cfg
    if cfg.resume not in ("auto", "never"):
        ckpt = Path(cfg.resume)
        if not ckpt.is_file():
            raise RunError(f"--resume {cfg.resume}: no such checkpoint file (use auto, never or a step-*.pt file)")
    else:
        ckpt = latest_checkpoint(run.out) if cfg.resume == "auto" else None
    seen = all_gather_objects(ckpt.name if ckpt is not None else None)
    if len(set(seen)) > 1:
        where = ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(seen))
        raise RunError(f"processes see different checkpoints in {run.out} ({where}); --out must be one folder "
                       "every node reads (a shared filesystem)")
    return ckpt


def load_for_resume(run: Run) -> None:
    """Load the resume checkpoint (if any): the model now, the rest kept in `run.state` for `prepare`."""
    from stream_ssl.run import RunError

    ckpt = resume_point(run)
    if ckpt is None:
        return
    state = load_checkpoint(ckpt)
    if state.get("format") != FORMAT:
        raise RunError(f"{ckpt}: checkpoint format {state.get('format')!r}, this trainer reads {FORMAT}")
    if state["global_batch"] != run.global_batch:
        raise RunError(f"{ckpt} was written with a global batch of {state['global_batch']}, this run has "
                       f"{run.global_batch}: resume needs the same global batch")
    run.method.load_state_dict(state["model"])
    run.start_step, run.resume_from, run.state = int(state["step"]), ckpt, state


def restore_training_state(run: Run, state: dict) -> None:
    """Optimizer, gradient scaler, and this process's random states and method state."""
    acc = run.acc
    run.optimizer.load_state_dict(state["optimizer"])
    if acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    ranks = state.get("ranks") or []
    if len(ranks) == run.world_size:
        set_rng_state(ranks[run.rank]["rng"])
        if ranks[run.rank].get("method") is not None:
            run.method.load_rank_state(ranks[run.rank]["method"])
        restore_meter(run, ranks[run.rank].get("meter"))
    else:  # the run's figures are the main process's; the other processes' storage counters restart
        restore_meter(run, ranks[0].get("meter") if ranks and run.rank == 0 else None, window=False)
        acc.print(f"note: the checkpoint has per-process state for {len(ranks)} processes, this run has "
                  f"{run.world_size}; random streams restart from the seed")
    acc.print(f"resumed from {run.resume_from} at optimizer step {run.start_step} of {run.total_steps}")


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
