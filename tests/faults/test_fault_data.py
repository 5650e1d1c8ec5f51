"""Damaged shard sets: a sample that cannot be read is skipped and counted (the run goes on, its batches full);
a set that does not match its index.json stops the run at once with one line naming the file; a shard that
disappears during a run stops it with one line naming the shard, the traceback in OUT/.logs/train.log."""

from __future__ import annotations

import os
import shutil

import pytest

from shard_tools.pack import pack
from shard_tools.shardset import load_shard_set
from stream_ssl.data.reader import ShardReader
from stream_ssl.train import main
from tests.helpers.fault_runs import RUN, read_late, train
from tests.helpers.faults import lost_and_duplicated
from tests.helpers.images import corrupt_copy
from tests.helpers.trainer import train_args

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess]


@pytest.mark.parametrize("how,what", [("header", "a corrupted member header (wrong size field)"),
                                      ("zeros", "a corrupted JPEG body (zeroed after 20 bytes)")])
def test_a_damaged_sample_is_skipped_counted_and_replaced(how, what, pool, local_run, tmp_path, fault_row):
    damaged = corrupt_copy(pool, tmp_path, {(2, 7): how})
    bad = ShardReader((damaged,)).index(0, 2).key(7)
    run = train(damaged.url, tmp_path / "run", num_workers=2)
    assert run.returncode == 0, run.stderr[-3000:]
    want = [k for k in local_run.keys() if k.split()[1] != bad]
    got = run.keys()
    skipped = run.summary()["skipped_samples"]
    lost, extra = lost_and_duplicated(got, want)
    # Each skipped sample's place in its batch is taken by another view of a sample of the same batch: counted
    # replacements, not duplicates.
    fault_row(f"data: {what}", lost, extra - skipped, samples=len(got), skipped_and_counted=skipped,
              replaced_in_batch=extra, exit_status=run.returncode)
    assert skipped == len(local_run.keys()) - len(want) >= 1 and len(got) == len(local_run.keys())
    assert not run.errors()


def _stops_at_once(folder, out, capsys, fault_row, scenario: str, names: list[str]) -> None:
    """train.py's main (in this process: the run stops before it builds a model) on a damaged set."""
    code = main(train_args(folder, out, **{**RUN, "num_workers": 0}))
    errors = capsys.readouterr().err.strip().splitlines()
    fault_row(f"data: {scenario}", 0, 0, exit_status=code, error_lines=len(errors),
              optimizer_steps=0 if not (out / "metrics.csv").exists() else "some")
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: "), errors
    assert all(n in errors[0] for n in names), errors[0]
    assert not (out / "checkpoints").exists()  # stopped before the first step


def _copy(pool, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(pool, folder)
    return folder


def test_a_truncated_last_shard_stops_the_run_at_once(pool, tmp_path, capsys, fault_row):
    folder = _copy(pool, tmp_path)
    os.truncate(folder / "set-000007.tar", 50_000)
    _stops_at_once(folder, tmp_path / "run", capsys, fault_row,
                   "a truncated last shard", ["set-000007.tar: 50000 bytes, index.json says"])


def test_a_missing_shard_stops_the_run_at_once(pool, tmp_path, capsys, fault_row):
    folder = _copy(pool, tmp_path)
    (folder / "set-000004.tar").unlink()
    _stops_at_once(folder, tmp_path / "run", capsys, fault_row,
                   "a missing shard", ["1 of 8 shards missing (set-000004.tar)"])


def test_a_broken_index_stops_the_run_at_once(pool, tmp_path, capsys, fault_row):
    folder = _copy(pool, tmp_path)
    (folder / "index.json").write_text((folder / "index.json").read_text()[:-40])
    _stops_at_once(folder, tmp_path / "run", capsys, fault_row,
                   "a broken index.json (cut short)", [f"{folder / 'index.json'}: invalid JSON"])


def test_a_stale_index_stops_the_run_at_once(pool, tmp_path, capsys, fault_row):
    """The same images packed again with 40 samples a shard (6 shards), under the index.json of the 8-shard set."""
    folder = _copy(pool, tmp_path)
    stale = (folder / "index.json").read_text()
    for f in folder.iterdir():
        f.unlink()
    manifest = pool.parent / "images" / "manifest.csv"
    pack(manifest, folder, name="set", shard_size=40, seed=11)
    (folder / "index.json").write_text(stale)
    _stops_at_once(folder, tmp_path / "run", capsys, fault_row,
                   "a stale index.json (the set was re-packed; shard sizes no longer match)",
                   ["2 of 8 shards missing (set-000006.tar, set-000007.tar)", "6 changed size (set-000000.tar: "])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_deleted_during_the_run_stops_it_with_one_line(workers, pool, tmp_path, fault_row):
    folder = _copy(pool, tmp_path)
    shard = folder / load_shard_set(str(folder)).shards[read_late(folder)].path
    run = train(folder, tmp_path / "run", env={"FAULT_DELETE": f"1:{shard}"}, num_workers=workers,
                read_ahead_bytes="64KiB")
    errors = run.errors()
    steps = int(run.last_row()["step"])
    log = run.out / ".logs" / "train.log"
    fault_row(f"data: a shard deleted during the run (after the check passed, {workers} loader workers)", 0, 0,
              exit_status=run.returncode, optimizer_steps_before=steps, error_lines=len(errors),
              traceback_in=".logs/train.log" if log.exists() else "none")
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert errors[0].startswith("error: ") and f"{shard}: not found, though index.json lists it" in errors[0]
    assert f"(traceback: {log})" in errors[0] and "Traceback (most recent call last)" in log.read_text()
    assert 1 <= steps < 30
