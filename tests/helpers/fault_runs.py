"""Training runs for the fault suite (tests/faults): train.py, or tests/helpers/fault_driver.py when a fault is
injected, on the suite's small shard set; and the comparison of the keys a run trained on with a reference."""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shard_tools.shardset import load_shard_set
from stream_ssl.data.plan import make_plan
from tests.helpers import PYTHON, REPO
from tests.helpers.faults import lost_and_duplicated
from tests.helpers.trainer import TRAIN, accelerate_cmd, child_env, train_args

DRIVER = "tests.helpers.fault_driver"  # a module, run from the repository root
# 8 shards of 30 samples (~120 KB each); one pass over the 240 samples in 15 steps of 16.
SET = dict(samples=240, shard_size=30, seed=11)
RUN = dict(unique_samples="240", budget_samples="240", log_with="none", log_keys="true", log_every=1)


@dataclass
class Trained:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def keys(self, rank: int = 0) -> list[str]:
        return (self.out / "keys" / f"rank-{rank}.txt").read_text().splitlines()

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def last_row(self) -> dict:
        with open(self.out / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))[-1]

    def errors(self) -> list[str]:
        """The lines on stderr a user reads as the outcome: errors and tracebacks (not progress or warnings)."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]


def train_command(data, out: Path, processes: int = 1, faults: bool = False, **flags) -> list[str]:
    """train.py (the fault driver with `faults`) on `data` with the suite's settings, as a command line."""
    script = DRIVER if faults else TRAIN
    cmd = accelerate_cmd(script, processes) if processes > 1 else [PYTHON, *(["-m"] if faults else []), script]
    return [str(c) for c in [*cmd, *train_args(data, out, **{**RUN, **flags})]]


def train(data, out: Path, processes: int = 1, env: dict | None = None, timeout: float = 600, **flags) -> Trained:
    """A training run, in a session of its own (a fault may signal its whole process group); `env` injects faults
    through the fault driver (see fault_driver.py)."""
    proc = subprocess.run(train_command(data, out, processes, bool(env), **flags), cwd=REPO,
                          env=child_env(**(env or {})), capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    return Trained(Path(out), proc.returncode, proc.stdout, proc.stderr)


def compare_keys(run: Trained, reference: Trained, ranks: int = 1) -> tuple[int, int, int]:
    """(samples trained on, lost, duplicated) of `run` against `reference`, rank by rank."""
    total = lost = dup = 0
    for rank in range(ranks):
        missing, extra = lost_and_duplicated(run.keys(rank), reference.keys(rank))
        total, lost, dup = total + len(run.keys(rank)), lost + missing, dup + extra
    return total, lost, dup


def read_late(folder) -> int:
    """The shard the suite's run reads first at the latest step (so it can be deleted before anything opens it)."""
    plan = make_plan([load_shard_set(str(folder))], RUN["unique_samples"], RUN["budget_samples"], batch_size=16)
    first: dict[int, int] = {}
    for step in range(plan.steps):
        for piece in plan.rank_slices(step, 0):
            first.setdefault(piece.shard, step)
    return max(first, key=first.get)


def small_disks() -> str | None:
    """Why a size-limited tmpfs cannot be mounted here (None when it can): `on_small_disk` needs unprivileged
    user namespaces (`unshare --user --map-root-user --mount`)."""
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare is not usable here ({e})"
    return None if probe.returncode == 0 else f"no user namespaces here ({probe.stderr.strip()})"


def on_small_disk(size: str, disk: Path, keep: Path, command: list, timeout: float = 600):
    """Run `command` with a fresh tmpfs of `size` (e.g. "5m") mounted at `disk`, in a private user and mount
    namespace: a real file system that fills up (ENOSPC from the kernel), no root needed, invisible to every
    other process. Afterwards its files are copied to `keep`, so the test can look at what was left."""
    script = ('mount -t tmpfs -o "size=$0" tmpfs "$1" || exit 97; disk=$1; keep=$2; shift 2; "$@"; rc=$?; '
              'cp -a "$disk/." "$keep/"; exit $rc')
    disk.mkdir(parents=True, exist_ok=True)
    keep.mkdir(parents=True, exist_ok=True)
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, size, disk, keep, *command]
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
