"""Object storage that misbehaves: training runs stream the suite's shard set from a moto S3 server through a
fault proxy (stream_ssl/testing/servers.py), and each must train on exactly the keys the local run trains on."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from shard_tools.listing import check_shards
from shard_tools.shardset import load_shard_set
from shard_tools.storage import filesystem
from stream_ssl import checkpoint
from stream_ssl.testing.servers import FaultProxy, fault_schedule, upload_folder
from tests.helpers.fault_runs import Trained, compare_keys, read_late, train

pytestmark = [pytest.mark.faults, pytest.mark.s3]

BUCKET = "faults"
# botocore's own retries off, so that the reader's retries (which resume at sample boundaries) do the work;
# short timeouts, so that a connection the proxy left hanging costs seconds, not minutes.
CLIENT = {"retries": {"max_attempts": 0}, "connect_timeout": 5, "read_timeout": 10}


@pytest.fixture(scope="module")
def s3_pool(moto, pool) -> str:
    fs = filesystem("s3://x", moto.options())
    fs.call_s3("create_bucket", Bucket=BUCKET)
    url = f"s3://{BUCKET}/pool"
    upload_folder(fs, pool, url)
    return url


def through(moto, proxy: FaultProxy, url: str, out, **flags):
    """A run reading `url` through `proxy`, with a small read-ahead (many requests, each a chance to fail)."""
    options = moto.options(proxy.endpoint, config_kwargs=CLIENT)
    try:
        return train(url, out, storage_options=json.dumps(options), read_ahead_bytes="64KiB", **flags)
    finally:
        proxy.close()


SCENARIOS = {
    # name: (proxy settings, loader workers)
    "connections cut at random points (every 2nd of the first 80: cut mid-body, reset, or 503)":
        (dict(schedule=fault_schedule(seed=5, every=2, max_faults=40, cut_range=(64, 60_000))), 2),
    "every connection cut after 24 KB (persistently)": (dict(schedule=lambda i: ("cut", 24_000)), 1),
    "every request delayed 50 ms, every connection paced to 2 MB/s": (dict(latency=0.05, rate=2e6), 2),
    "refused for 3 s mid-run (open connections reset, nothing listening)": (dict(outage=(7, 3.0)), 0),
    "503 SlowDown bursts (requests 12-19 and 24-27)": (dict(slowdown=[*range(12, 20), *range(24, 28)]), 1),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_s3_faults_lose_and_duplicate_nothing(name, moto, s3_pool, local_run, tmp_path, fault_row):
    settings, workers = SCENARIOS[name]
    proxy = FaultProxy(moto.port, **settings)
    run = through(moto, proxy, s3_pool, tmp_path / "run", num_workers=workers)
    assert run.returncode == 0, run.stderr[-3000:]
    trained, lost, dup = compare_keys(run, local_run)
    faults = ", ".join(f"{n} {k}" for k, n in sorted(proxy.kinds.items())) or "none"
    fault_row(f"S3: {name}", lost, dup, samples=trained, faults=faults, requests=proxy.requests,
              retries=int(run.summary()["storage"]["retries"]), workers=workers)
    assert run.keys() == local_run.keys()  # the same samples, at the same steps, in the same order
    assert proxy.faults > 0 if "latency" not in settings else proxy.requests > 0


def test_s3_shards_are_checked_with_one_listing_before_training(moto, s3_pool, pool, tmp_path, fault_row):
    """The check before training costs one LIST request for the 8 shards and their .idx files (no request per
    shard), and a deleted object stops the run at once with one line naming it."""
    fs = filesystem("s3://x", moto.options())
    url = f"s3://{BUCKET}/gappy"
    upload_folder(fs, pool, url)
    proxy = FaultProxy(moto.port)
    try:
        options = moto.options(proxy.endpoint, config_kwargs=CLIENT)
        shard_set = load_shard_set(url, options)
        before = proxy.requests
        check = check_shards(shard_set, storage_options=options)
        listing = proxy.requests - before
        assert check.ok and check.listings == 1 and listing == 1
    finally:
        proxy.close()
    fs.rm_file(f"{url}/set-000005.tar")
    run = train(url, tmp_path / "run", storage_options=json.dumps(moto.options()), num_workers=0)
    errors = run.errors()
    fault_row("S3: a missing shard (the check before training: 1 LIST request for 8 shards)", 0, 0,
              list_requests=listing, exit_status=run.returncode, error_lines=len(errors))
    assert run.returncode == 2 and len(errors) == 1 and f"{url}: 1 of 8 shards missing (set-000005.tar)" in errors[0]


def test_s3_shard_deleted_during_the_run_stops_it_with_one_line(moto, s3_pool, pool, tmp_path, fault_row):
    fs = filesystem("s3://x", moto.options())
    url = f"s3://{BUCKET}/shrinking"
    upload_folder(fs, pool, url)
    shard = f"{url}/{load_shard_set(str(pool)).shards[read_late(pool)].path}"
    run = train(url, tmp_path / "run", env={"FAULT_DELETE": f"1:{shard}"}, num_workers=2, read_ahead_bytes="64KiB",
                storage_options=json.dumps(moto.options()))
    errors = run.errors()
    fault_row("S3: a shard deleted during the run (after the check passed, 2 loader workers)", 0, 0,
              exit_status=run.returncode, optimizer_steps_before=int(run.last_row()["step"]), error_lines=len(errors))
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert f"{shard}: not found, though index.json lists it" in errors[0]


def test_a_run_folder_on_s3_survives_a_kill_during_a_checkpoint_upload(moto, pool, local_run, tmp_path, fault_row):
    """--out s3://...: killed -9 while checkpoint 8 is uploaded (a multipart upload begun, never completed); the same
    command on another machine (an empty local mirror) resumes from the URL's latest checkpoint, 4, and ends with
    the straight run's weights; old checkpoints are pruned on the URL; a rerun changes no object."""
    fs = filesystem("s3://x", moto.options())
    fs.call_s3("create_bucket", Bucket="runs")
    url, flags = "s3://runs/run", dict(storage_options=json.dumps(moto.options()), save_every=4, keep_checkpoints=2)
    killed = train(pool, url, env={"FAULT_KILL_IN_UPLOAD": "8"}, local_out=tmp_path / "node-a", **flags)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.cat_file("runs/run/checkpoints/latest").decode().strip() == "step-00000004.pt"
    assert not fs.exists("runs/run/checkpoints/step-00000008.pt")
    partial = fs.call_s3("list_multipart_uploads", Bucket="runs").get("Uploads", [])
    assert [u["Key"] for u in partial] == ["run/checkpoints/step-00000008.pt"]  # begun, never completed
    resumed = train(pool, url, local_out=tmp_path / "node-b", **flags)
    assert resumed.returncode == 0 and "at optimizer step 4 of 15" in resumed.stdout, resumed.stderr[-3000:]
    mirror = Trained(tmp_path / "node-b", resumed.returncode, resumed.stdout, resumed.stderr)
    trained, lost, dup = compare_keys(mirror, local_run)
    final = [checkpoint.load_checkpoint(r.out / "checkpoints" / "step-00000015.pt")["model"]
             for r in (mirror, local_run)]
    equal = all(torch.equal(final[0][k], final[1][k]) for k in final[1])
    fs.invalidate_cache()
    objects = {p: (i["size"], i.get("ETag")) for p, i in fs.find("runs/run", detail=True).items()}
    kept = sorted(p.rsplit("/", 1)[-1] for p in objects if p.endswith(".pt"))
    rerun = train(pool, url, local_out=tmp_path / "node-c", **flags)
    fs.invalidate_cache()
    unchanged = {p: (i["size"], i.get("ETag")) for p, i in fs.find("runs/run", detail=True).items()} == objects
    fault_row("--out on S3: kill -9 during the upload of checkpoint 8, resumed on another machine", lost, dup,
              latest_after_kill="step-00000004.pt", resumed_from=4, samples=trained, checkpoints_kept="/".join(kept),
              final_weights="equal to the straight run" if equal else "DIFFERENT",
              rerun="changes nothing" if unchanged and rerun.returncode == 0 else "CHANGED")
    assert equal and kept == ["step-00000012.pt", "step-00000015.pt"] and "runs/run/summary.json" in objects
    assert rerun.returncode == 0 and "finished at step 15 of 15; summary: s3://runs/run/summary.json" in rerun.stdout
    assert unchanged
