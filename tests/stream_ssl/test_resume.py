"""Exact resume: a run SIGKILLed right after its step-K checkpoint and resumed with `--resume auto` ends with
weights bit-equal to a run that trained 2K steps straight (CPU, deterministic settings)."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import PYTHON
from tests.helpers.fault_runs import DRIVER
from tests.helpers.trainer import TRAIN, accelerate_cmd, run, train_args

pytestmark = pytest.mark.multiprocess

K = 3


def losses(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("method,workers,accum,extra", [
    ("byol", 0, 1, {}),  # EMA target + LARS momentum buffers
    ("dino", 2, 2, {}),  # teacher, center buffer, multi-crop, 2 loader workers, gradient accumulation
    ("swav", 0, 1, {"method_options": '{"proj_hidden": 64, "proj_dim": 32, "prototypes": 16, "local_crops": 1, '
                                      '"queue_length": 32, "queue_start_fraction": 0.0}'}),  # per-rank queue state
])
def test_killed_and_resumed_run_matches_straight_run(make_shard_set, tmp_path, method, workers, accum, extra):
    data = make_shard_set(128, shard_size=32)
    flags = dict(unique_samples="64", budget_samples=str(2 * K * 16 * accum), grad_accum=accum, num_workers=workers,
                 save_every=K, log_every=1, keep_checkpoints=0, log_with="none", **extra)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    r = run([PYTHON, TRAIN, *train_args(data, straight, method, **flags)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([PYTHON, "-m", DRIVER, *train_args(data, killed, method, **flags)], FAULT_KILL_AFTER_CHECKPOINT=str(K))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert (killed / "checkpoints" / "latest").read_text().strip() == f"step-{K:08d}.pt"
    assert not (killed / "summary.json").exists()
    r = run([PYTHON, TRAIN, *train_args(data, killed, method, **flags)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / f'step-{K:08d}.pt'} at optimizer step {K}" in r.stdout

    a = torch.load(straight / "checkpoints" / f"step-{2 * K:08d}.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / f"step-{2 * K:08d}.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert a["step"] == b["step"] == 2 * K and a["micro_step"] == 2 * K * accum
    assert losses(straight) == losses(killed)  # same per-step losses; no duplicate rows after the kill
    assert [s for s, _ in losses(killed)] == [str(i) for i in range(1, 2 * K + 1)]


def _keys_by_step(run_dir: Path, ranks) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for rank in ranks:
        for line in (run_dir / "keys" / f"rank-{rank}.txt").read_text().splitlines():
            step, key = line.split()
            out.setdefault(int(step), []).append(key)
    return out


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_global_batch(make_shard_set, tmp_path):
    """The plan gives a global batch the same samples for any world size, so a run checkpointed on 2
    processes x 8 continues on 1 process x 16 with exactly the batches the 2-process run went on to read."""
    data = make_shard_set(128, shard_size=32)
    flags = dict(unique_samples="64", budget_samples=str(2 * K * 16), save_every=K, log_every=1, keep_checkpoints=0,
                 log_with="none", log_keys="true")
    two, one = tmp_path / "two", tmp_path / "one"
    r = run([*accelerate_cmd(TRAIN, 2), *train_args(data, two, batch_size=8, **flags)])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = two / "checkpoints" / f"step-{K:08d}.pt"
    r = run([PYTHON, TRAIN, *train_args(data, one, batch_size=16, resume=ckpt, **flags)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at optimizer step {K}" in r.stdout
    assert "per-process state for 2 processes, this run has 1" in r.stdout

    before, after = _keys_by_step(two, (0, 1)), _keys_by_step(one, (0,))
    assert sorted(after) == list(range(K, 2 * K))
    for step in after:
        assert len(after[step]) == 16 and sorted(after[step]) == sorted(before[step]), step
    assert [s for s, _ in losses(one)] == [str(i) for i in range(K + 1, 2 * K + 1)]
    assert all(torch.isfinite(torch.tensor(float(loss))) for _, loss in losses(one))
    assert torch.load(one / "checkpoints" / f"step-{2 * K:08d}.pt", weights_only=True)["step"] == 2 * K
