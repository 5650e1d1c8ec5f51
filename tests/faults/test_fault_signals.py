"""Stop signals and reruns (docs/reliability.md): a run stopped by SIGTERM or SIGINT with the default settings
(no --save-every) writes a checkpoint at the step it stopped, exits 75, and the same command continues to the
straight run's weights, keys and summary; a rerun of a finished run changes no file."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from stream_ssl import checkpoint
from stream_ssl.stopping import STOPPED
from tests.helpers.fault_runs import Trained, compare_keys, train

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess]

STEPS = 15  # the suite's run: 240 samples once, in steps of 16
RUN_FIELDS = ("first_loss", "final_loss", "losses", "steps", "samples_seen", "global_batch", "skipped_samples")


def final_weights(run: Trained) -> dict:
    return checkpoint.load_checkpoint(run.out / "checkpoints" / f"step-{STEPS:08d}.pt")["model"]


def same_weights(a: Trained, b: Trained) -> bool:
    x, y = final_weights(a), final_weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def files(folder) -> dict:
    """Every file under `folder`: its bytes' digest and its mode."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,at,workers", [("TERM", 6, 2), ("INT", 9, 1)])
def test_a_stop_signal_checkpoints_and_the_same_command_continues(pool, local_run, tmp_path, fault_row, name, at,
                                                                   workers):
    out = tmp_path / "run"
    stopped = train(pool, out, env={"FAULT_SIGNAL_AT_STEP": f"{at}:{name}"}, num_workers=workers)
    line = f"stopped at step {at} of {STEPS} by SIG{name}; checkpoint {out / 'checkpoints' / f'step-{at:08d}.pt'}"
    assert stopped.returncode == STOPPED and line in stopped.stderr, stopped.stderr[-3000:]
    assert not stopped.errors() and not (out / "summary.json").exists()
    resumed = train(pool, out, num_workers=workers)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trained, lost, dup = compare_keys(resumed, local_run)
    a, b = resumed.summary(), local_run.summary()
    same_summary = all(a[k] == b[k] for k in RUN_FIELDS)
    equal = same_weights(resumed, local_run)
    fault_row(f"SIG{name} to the whole process group at step {at} ({workers} loader workers, default settings), "
              "then the same command", lost, dup, exit_status=stopped.returncode, samples=trained,
              final_weights="equal to the straight run" if equal else "DIFFERENT",
              summary="equal to the straight run's" if same_summary else "DIFFERENT")
    assert equal and same_summary, {k: (a[k], b[k]) for k in RUN_FIELDS if a[k] != b[k]}
    assert [(s["start_step"], s["end_step"], s["ended"]) for s in a["segments"]] == \
        [(0, at, f"stopped by SIG{name}"), (at, STEPS, "finished")]
    assert a["samples_per_s"] > 0 and a["wall_seconds"] >= sum(s["seconds"] for s in a["segments"]) * 0.99


def test_a_rerun_of_a_finished_run_changes_nothing(pool, local_run, tmp_path, fault_row):
    out = tmp_path / "run"
    done = train(pool, out, num_workers=0)
    assert done.returncode == 0, done.stderr[-3000:]
    before = files(out)
    reruns = [train(pool, out, num_workers=workers, **extra)
              for workers, extra in ((0, {}), (2, {}), (0, {"batch_size": 8, "grad_accum": 2}))]
    said = f"finished at step {STEPS} of {STEPS}; summary: {out / 'summary.json'}"
    same = files(out) == before
    fault_row("a rerun of a finished run (the same command, other loader workers, 8 x 2 accumulation)", 0, 0,
              exit_statuses="/".join(str(r.returncode) for r in reruns), files="byte-identical" if same else "CHANGED")
    assert all(r.returncode == 0 and said in r.stdout and not r.errors() for r in reruns), reruns[-1].stderr[-3000:]
    assert same and os.path.getsize(out / "summary.json") > 0


def test_killed_after_the_last_checkpoint_the_rerun_writes_only_the_summary(pool, local_run, tmp_path, fault_row):
    out = tmp_path / "run"
    killed = train(pool, out, env={"FAULT_KILL_AFTER_CHECKPOINT": str(STEPS)}, num_workers=0)
    assert killed.returncode != 0 and not (out / "summary.json").exists()
    weights = (out / "checkpoints" / f"step-{STEPS:08d}.pt").read_bytes()
    rerun = train(pool, out, num_workers=0)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a, b = rerun.summary(), local_run.summary()
    same = all(a[k] == b[k] for k in RUN_FIELDS)
    fault_row("kill -9 after the last checkpoint, before the summary; the same command", 0, 0,
              summary="equal to the straight run's" if same else "DIFFERENT",
              checkpoint="kept as it was" if weights == (out / "checkpoints" / f"step-{STEPS:08d}.pt").read_bytes()
              else "REWRITTEN")
    assert same and (out / "checkpoints" / f"step-{STEPS:08d}.pt").read_bytes() == weights
    assert [s["ended"] for s in a["segments"]][-1] == "finished" and (out / "backbone.safetensors").exists()
