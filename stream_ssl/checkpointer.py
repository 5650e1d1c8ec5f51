"""Saving a run and resuming it exactly: what a checkpoint holds, and how it is put back.

    run = build_run(accelerator, cfg)
    checkpointer.load(run)      # the checkpoint every process agrees on; the model now, before Accelerate wraps it
    run.prepare()
    checkpointer.restore(run)   # the optimizer, the scaler, each process's random states, method state and meter
    ...
    checkpointer.save(run, step)

A checkpoint holds the step, the model and optimizer (and gradient scaler) state, the schedule (for reading;
schedules are pure functions of the step), the settings, and per process its random states, the method's
per-rank state (`SSLMethod.rank_state`, e.g. SwAV's queue) and the run's meter (metrics.Meter: the figures over
the whole run and the open metrics row). The files themselves are stream_ssl/checkpoint.py's; with an --out on
object storage, each checkpoint is also published there (runfolder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stream_ssl.checkpoint import (
    FORMAT,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from stream_ssl.distributed import all_gather_objects
from stream_ssl.errors import RunError

if TYPE_CHECKING:
    from stream_ssl.run import Run


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




def resume_point(run: Run) -> Path | None:
    """The checkpoint `--resume` names, the same on every process (ranks that see different files, e.g. a
    node-local --out, would resume at different steps and hang: stop with one line instead)."""
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


def load(run: Run) -> None:
    """Load the resume checkpoint (if any): the model now, the rest kept in `run.state` for `restore`."""
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


def restore(run: Run) -> None:
    """Once the run is prepared: the optimizer, the gradient scaler, and this process's random states, method
    state and meter from the checkpoint `load` found (nothing without one)."""
    state, run.state = run.state, None
    if state is None:
        return
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
