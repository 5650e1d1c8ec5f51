"""When a run stops early on purpose: stop signals, and the time-based checkpoint.

Clusters end jobs with a signal: SLURM sends SIGTERM at the time limit or on preemption (or the signal chosen
with `--signal`, e.g. SIGUSR1 some minutes before), Kubernetes sends SIGTERM to an evicted pod, a user presses
Ctrl-C (SIGINT). The first of the `--stop-signals` asks the run to stop: the optimizer step in progress
finishes, every process agrees on the step, a checkpoint is written and the command exits with status STOPPED
(75) after one line; the same command continues from that step. A second signal stops at once, as the signal
would without us (SIGINT: KeyboardInterrupt, status 130; SIGTERM: killed, 143). Signals within SAME_SIGNAL
seconds of the first count as the first: SLURM signals every process of a job, and a launcher passing the
signal on delivers it a second time.

The time-based checkpoint (`--save-every-minutes`) bounds what even a SIGKILL loses. The main process's clock
decides when it is due, so every process saves at the same step.

Agreement: after every optimizer step, the processes all-reduce (max) two flags, "a stop was asked" and "a
checkpoint is due", over a CPU (gloo) group: one tiny collective per step that never waits for the GPU. A
signal that reaches one process (SLURM's `--signal=B:...` reaches the batch shell, which must pass it on;
torchrun and accelerate forward SIGTERM to every process) stops them all at the same step.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; running the same command again continues the run
SAME_SIGNAL = 1.0  # seconds within which a second signal is the first one delivered again, not a second request
# Shared with the loader workers a training process forks (fork start method): 1 while the training process handles
# stop signals itself, so a SIGTERM sent to every process of a job does not kill the workers it still needs.
_SHIELD = multiprocessing.RawValue(ctypes.c_int, 0)


def worker_sigterm(signum: int, frame) -> None:
    """A loader worker's SIGTERM: ignored while its training process stops cleanly, else the default (death)."""
    if _SHIELD.value:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """`TERM,INT,USR1` (or `SIGTERM,...`, or numbers) -> the signals; '' or `none` -> ()."""
    found = []
    for part in (p.strip().upper() for p in text.split(",")):
        if not part or part == "NONE":
            continue
        name = part if part.startswith("SIG") or part.isdigit() else "SIG" + part
        try:
            found.append(signal.Signals(int(name)) if name.isdigit() else signal.Signals[name])
        except (KeyError, ValueError):
            raise ValueError(f"--stop-signals: {part!r} is not a signal (e.g. TERM,INT,USR1; none)") from None
    if signal.SIGKILL in found or signal.SIGSTOP in found:
        raise ValueError("--stop-signals: SIGKILL and SIGSTOP cannot be caught")
    return tuple(dict.fromkeys(found))


class StopRequest:
    """Catches the stop signals while a run trains (`with StopRequest(signals):`); `signal` is the first one
    caught, or None. Handlers are only installed from the main thread (signal's rule); elsewhere this is inert."""

    def __init__(self, signals: tuple[signal.Signals, ...]):
        self.signals, self.signal = signals, None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
            _SHIELD.value = int(signal.SIGTERM in self._previous)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        _SHIELD.value = 0  # the workers may be shut down (or killed at exit) from here on

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal, self._first = signal.Signals(signum), time.monotonic()
            return
        if time.monotonic() - self._first < SAME_SIGNAL:
            return  # one signal delivered twice (to the process tree and through a launcher that passes it on)
        # the second signal: what it would have done without us
        previous = self._previous.get(signum)
        previous = signal.SIG_DFL if previous is None else previous
        signal.signal(signum, previous)
        if callable(previous):  # SIGINT's is Python's default_int_handler: KeyboardInterrupt
            previous(signum, frame)
        else:
            signal.raise_signal(signum)


class Agreement:
    """One flag pair per optimizer step, the same on every process: (stop signal number or 0, checkpoint due)."""

    def __init__(self, world_size: int, save_every_minutes: float, is_main: bool):
        self.world_size, self.is_main = world_size, is_main
        self.interval = save_every_minutes * 60
        self.last_save = time.monotonic()
        self.group = None
        if world_size > 1:
            # the default group when it is gloo already; else a CPU group beside NCCL (created by every process)
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def decide(self, stop: StopRequest) -> tuple[int, bool]:
        due = self.is_main and self.interval > 0 and time.monotonic() - self.last_save >= self.interval
        flags = torch.tensor([int(stop.signal or 0), int(due)], dtype=torch.int64)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
