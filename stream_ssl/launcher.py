"""`stream-ssl train --num-processes N`: N training processes on this machine, one error line, our exit status.

`accelerate launch` and `torchrun` start processes too, but what a failed run tells its caller does not survive
them: every process prints its error, accelerate adds its own traceback, and the shell sees status 1 whatever
the reason (docs/training.md#exit-statuses). This launcher starts the processes as torchrun does (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and OMP_NUM_THREADS=1 unless it is set;
the processes form a gloo group on CPUs, an NCCL group on GPUs, one GPU each), passes stop signals on to them
(stream_ssl/stopping.py), and ends with:

- 0 when every process finished; STOPPED (75) when a stop signal ended the run after its checkpoint;
- otherwise the status of the first process that failed, after one line: that process's error. The others
  mostly fail because a peer went away; they get `grace` seconds to end, are then killed, and their errors stay
  in OUT/.logs/train-rank-R.log.

The processes run in a session of their own, so a terminal's Ctrl-C reaches them once, through this launcher.
One machine only: several nodes start their processes with torchrun, accelerate or srun
(docs/sweeps-and-multinode.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shard_tools.cli import ERROR_FILE
from stream_ssl.stopping import STOPPED

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], processes: int, folder: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(processes):
        env = {"OMP_NUM_THREADS": "1", **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), ERROR_FILE: str(folder / f"rank-{rank}")}
        procs.append(subprocess.Popen([sys.executable, "-m", "stream_ssl.train", *argv], env=env,
                                      start_new_session=True))
    return procs


def status_of(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell reports it


def wait(procs: list[subprocess.Popen], grace: float) -> int | None:
    """Wait for every process; returns the rank of the first that failed (None: none did). Once one failed, the
    others get `grace` seconds, then are killed."""
    first, deadline = None, None
    while any(p.poll() is None for p in procs):
        if first is None:
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0, STOPPED)]
            if failed:
                first, deadline = failed[0], time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    if first is None:
        failed = [r for r, p in enumerate(procs) if p.returncode not in (0, STOPPED)]
        first = failed[0] if failed else None
    return first


def launch(argv: list[str], processes: int, grace: float = 30.0) -> int:
    """Run train.py with `argv` in `processes` processes; returns the run's exit status (see above)."""
    with tempfile.TemporaryDirectory(prefix="stream-ssl-launch-") as tmp:
        procs = start(argv, processes, Path(tmp))

        def forward(signum, frame) -> None:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in FORWARDED}
        try:
            first = wait(procs, grace)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if first is None:
            return STOPPED if any(p.returncode == STOPPED for p in procs) else 0
        error = Path(tmp) / f"rank-{first}"
        code = status_of(procs[first].returncode)
        line = error.read_text().strip() if error.exists() else f"error: process {first} ended with status {code}"
        print(line, file=sys.stderr, flush=True)
        return code
