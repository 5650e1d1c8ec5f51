"""kill -9 of a 2-process run (`accelerate launch --multi_gpu --num_processes 2`, two CPU processes over gloo):
at three random steps one after the other, and in the middle of a checkpoint write. Each time `--resume auto`
continues from the last checkpoint; the final weights and the keys every rank trained on equal a straight run's.
(tests/stream_ssl/test_resume.py proves the same for one process killed right after a checkpoint, for three methods.)"""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
import torch

from stream_ssl import checkpoint
from tests.helpers import REPO
from tests.helpers.fault_driver import TORN_BYTES
from tests.helpers.fault_runs import Trained, compare_keys, train, train_command
from tests.helpers.trainer import child_env

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess]

# 2 processes x 8: 30 steps of 2 passes, a checkpoint every 4
FLAGS = dict(batch_size=8, save_every=4, keep_checkpoints=0, num_workers=0, budget_samples="480")
STEPS = 30


@pytest.fixture(scope="module")
def straight(pool, tmp_path_factory) -> Trained:
    run = train(pool, tmp_path_factory.mktemp("straight") / "run", processes=2, **FLAGS)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def final_weights_equal(run: Trained, reference: Trained) -> bool:
    last = f"checkpoints/step-{STEPS:08d}.pt"
    a, b = (checkpoint.load_checkpoint(r.out / last)["model"] for r in (run, reference))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_at_three_random_steps_resumes_to_the_straight_run(pool, straight, tmp_path, fault_row):
    steps = sorted(random.Random(16).sample(range(1, STEPS), 3))
    out = tmp_path / "run"
    resumed_at = []
    for step in steps:
        killed = train(pool, out, processes=2, env={"FAULT_KILL_AT_STEP": str(step)}, **FLAGS)
        assert killed.returncode != 0 and not (out / "summary.json").exists(), killed.stderr[-3000:]
        assert not [ln for ln in killed.stderr.splitlines() if ln.startswith("error:")], killed.stderr[-3000:]
        resumed_at.append(int(checkpoint.latest_checkpoint(out).stem.split("-")[1]))
    run = train(pool, out, processes=2, **FLAGS)
    assert run.returncode == 0, run.stderr[-3000:]
    trained, lost, dup = compare_keys(run, straight, ranks=2)
    equal = final_weights_equal(run, straight)
    fault_row("kill -9 of a 2-process run at 3 random steps, --resume auto each time", lost, dup,
              killed_at_steps="/".join(map(str, steps)), resumed_from="/".join(map(str, resumed_at)),
              samples=trained, final_weights="equal to the straight run" if equal else "DIFFERENT")
    assert equal and [run.keys(r) for r in (0, 1)] == [straight.keys(r) for r in (0, 1)]
    assert resumed_at == [(s - 1) // 4 * 4 for s in steps]  # killed after step s, before its checkpoint


def test_killed_during_a_checkpoint_write_keeps_the_previous_one(pool, straight, tmp_path, fault_row):
    out = tmp_path / "run"
    killed = train(pool, out, processes=2, env={"FAULT_KILL_IN_CHECKPOINT": "8"}, **FLAGS)
    errors = [ln for ln in killed.stderr.splitlines() if ln.startswith("error:")]
    # rank 0 was killed (no line of its own); rank 1, waiting for it, may report the lost peer before the launcher
    # stops it
    assert killed.returncode != 0 and all("train-rank-1.log" in ln for ln in errors), killed.stderr[-3000:]
    folder = out / "checkpoints"
    torn = folder / "step-00000008.pt.tmp"
    previous = checkpoint.latest_checkpoint(out)
    state = checkpoint.load_checkpoint(previous)  # loadable (weights_only)
    assert previous.name == "step-00000004.pt" and state["step"] == 4 and not (folder / "step-00000008.pt").exists()
    assert torn.exists() and TORN_BYTES <= torn.stat().st_size < previous.stat().st_size
    torn_bytes = torn.stat().st_size
    run = train(pool, out, processes=2, **FLAGS)
    assert run.returncode == 0, run.stderr[-3000:]
    trained, lost, dup = compare_keys(run, straight, ranks=2)
    equal = final_weights_equal(run, straight)
    fault_row("kill -9 of a 2-process run while it writes checkpoint 8", lost, dup,
              torn_file=f"step-00000008.pt.tmp ({torn_bytes} bytes)", latest=f"{previous.name} (loads)",
              samples=trained, final_weights="equal to the straight run" if equal else "DIFFERENT")
    assert equal and not torn.exists()


def test_sigterm_to_the_launcher_stops_both_processes_at_one_step(pool, straight, tmp_path, fault_row):
    """accelerate launch (torch's elastic agent) passes SIGTERM on to both processes: they agree on a step, write its
    checkpoint and stop; the same command then continues to the straight run."""
    out = tmp_path / "run"
    flags = {**FLAGS, "save_every": 0}
    launcher = subprocess.Popen(train_command(pool, out, processes=2, **flags), cwd=REPO, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    keys = out / "keys" / "rank-0.txt"
    deadline = time.monotonic() + 300
    while not (keys.exists() and len(keys.read_text().splitlines()) >= 3 * 8) and launcher.poll() is None:
        assert time.monotonic() < deadline, "the run did not reach step 3"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None and "stopped at step" in stderr and f"by SIGTERM; checkpoint {ckpt}" in stderr, stderr
    at = checkpoint.step_of(ckpt)
    assert 3 <= at < STEPS and not (out / "summary.json").exists()
    run = train(pool, out, processes=2, **flags)
    assert run.returncode == 0, run.stderr[-3000:]
    trained, lost, dup = compare_keys(run, straight, ranks=2)
    equal = final_weights_equal(run, straight)
    fault_row("SIGTERM to `accelerate launch` of a 2-process run, then the same command", lost, dup,
              launcher_status=launcher.returncode, stopped_at=at, samples=trained,
              final_weights="equal to the straight run" if equal else "DIFFERENT")
    assert equal
