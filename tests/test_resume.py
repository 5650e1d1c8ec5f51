"""Exact resume: a run SIGKILLed right after its step-K checkpoint and resumed with `--resume auto` ends with
weights bit-equal to a run that trained 2K steps straight (CPU, deterministic settings)."""

from __future__ import annotations

import csv
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_helpers import PYTHON, TRAIN, run, train_args  # noqa: E402

from stream_ssl.train import KILL_ENV  # noqa: E402

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
                 save_every=K, log_every=1, keep_checkpoints=0, tensorboard="false", **extra)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    r = run([PYTHON, TRAIN, *train_args(data, straight, method, **flags)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([PYTHON, TRAIN, *train_args(data, killed, method, **flags)], **{KILL_ENV: str(K)})
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
