"""S3: a moto server on loopback holds a packed shard set; the reader, the loader's cache and `--keys` see the
same keys and bytes as from local disk, also through a proxy that cuts connections mid-transfer."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import urllib.request
from pathlib import Path

import pytest

from shard_tools import listing
from shard_tools.listing import list_folder
from shard_tools.shardset import load_shard_set
from shard_tools.storage import BucketNotFound, StorageAccessDenied, check_access, filesystem
from shard_tools.verify import verify
from stream_ssl.data.cache import DiskCache
from stream_ssl.data.plan import make_plan
from stream_ssl.data.readahead import ReadAhead
from stream_ssl.data.reader import ReadError, ShardReader
from stream_ssl.plan import main as plan_main
from stream_ssl.plan import print_keys
from stream_ssl.testing.servers import KEY, REGION, SECRET, FaultProxy, fault_schedule, upload_folder

pytestmark = pytest.mark.s3

BUCKET = "shards"


@pytest.fixture(scope="module")
def local_folder(make_shard_set):
    return make_shard_set(240, shard_size=30, seed=11)


@pytest.fixture(scope="module")
def s3_url(moto, local_folder):
    fs = filesystem("s3://x", moto.options())
    fs.call_s3("create_bucket", Bucket=BUCKET)
    url = f"s3://{BUCKET}/sets/pool"
    upload_folder(fs, local_folder, url)
    return url


def _samples(plan, rank, reader, **kw):
    return [(step, [(s["__key__"], s["jpg"], s.get("cls")) for s in samples])
            for step, samples in ReadAhead(reader, plan, rank, range(plan.steps), **kw)]


def _plans(local_folder, s3_url, options, **kw):
    local = make_plan([load_shard_set(str(local_folder))], **kw)
    remote = make_plan([load_shard_set(s3_url, options["s3"])], **kw)
    return local, remote


def test_s3_reads_the_same_keys_and_bytes_as_local_disk(moto, local_folder, s3_url):
    options = moto.options()
    local, remote = _plans(local_folder, s3_url, options, unique_samples=200, budget_samples=400, world_size=2,
                           batch_size=8, seed=1)
    for rank in range(2):
        reader = ShardReader(remote.sets, options)
        assert _samples(remote, rank, reader) == _samples(local, rank, ShardReader(local.sets))
        assert reader.stats.bytes_read > 0


def test_keys_cli_over_s3_with_aws_environment_variables(moto, local_folder, s3_url, monkeypatch, capsys):
    for name, value in {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    args = ["--unique-samples", "0.75", "--budget-samples", "500", "--world-size", "3", "--batch-size", "5",
            "--keys", "--rank", "2", "--start-step", "7"]
    assert plan_main(["--data", s3_url, *args]) == 0
    from_s3 = capsys.readouterr().out.split()
    assert plan_main(["--data", str(local_folder), *args]) == 0
    from_disk = capsys.readouterr().out.split()
    assert from_s3 == from_disk and len(from_s3) == (500 // 15 - 7) * 5
    plan = make_plan([load_shard_set(s3_url)], "0.75", 500, world_size=3, batch_size=5)
    buf = io.StringIO()
    print_keys(plan, 2, 7, check_headers=True, out=buf)  # ranged reads of the tar headers agree with the .idx
    assert buf.getvalue().split() == from_s3


def test_cut_connections_still_yield_every_planned_sample_exactly_once(moto, local_folder, s3_url):
    local, remote = _plans(local_folder, s3_url, moto.options(), unique_samples=240, budget_samples=480,
                           world_size=2, batch_size=12, seed=4)
    for rank in range(2):
        proxy = FaultProxy(moto.port, fault_schedule(seed=3 + rank, every=2, max_faults=25))
        try:
            # botocore and s3fs retry on their own; turn that down so that our retries (which resume at sample
            # boundaries) do the work.
            options = moto.options(proxy.endpoint, config_kwargs={"retries": {"max_attempts": 0},
                                                                  "connect_timeout": 5, "read_timeout": 5})
            reader = ShardReader(remote.sets, options, backoff=0.01, retries=10, request_bytes=16 * 1024)
            reader.fetcher.filesystem(s3_url).retries = 1
            got = _samples(remote, rank, reader)
            assert got == _samples(local, rank, ShardReader(local.sets))
            assert reader.stats.retries > 0 and proxy.faults >= 8 and proxy.kinds.get("cut", 0) >= 3, proxy.kinds
        finally:
            proxy.close()


def test_cache_keeps_later_passes_off_the_object_store(moto, local_folder, s3_url, tmp_path):
    proxy = FaultProxy(moto.port)  # a clean pass-through that counts the bytes the object store sends
    try:
        options = moto.options(proxy.endpoint)
        local, remote = _plans(local_folder, s3_url, moto.options(), unique_samples=120, budget_samples=480,
                               world_size=1, batch_size=16, seed=6)
        assert remote.last_pass == 3
        reader = ShardReader(remote.sets, options, cache=DiskCache(tmp_path / "c", 64 << 20), plan=remote)
        by_step, sent = [], []
        # a small read-ahead: later passes are planned after pass 1 was read (else one read serves them all)
        for step, samples in ReadAhead(reader, remote, 0, range(remote.steps), read_ahead_bytes=32 << 10):
            by_step.append((step, [(s["__key__"], s["jpg"], s.get("cls")) for s in samples]))
            sent.append(proxy.requests)  # (counted when a request arrives; response bytes are counted late)
        assert by_step == _samples(local, 0, ShardReader(local.sets))
        later = [i for i in range(remote.steps) if i * remote.global_batch >= remote.unique_samples]
        assert later and all(sent[i] == sent[i - 1] for i in later), "a later pass went to the object store"
        assert reader.stats.cache_hits > 0
        assert proxy.bytes_down <= sum(s.bytes for s in remote.sets[0].shards)  # the pool, read once
        first_pass_bytes = proxy.bytes_down
        # A second run (e.g. resumed, or the next job of a sweep) over the warm cache: no object store reads.
        again = ShardReader(remote.sets, options, cache=DiskCache(tmp_path / "c", 64 << 20), plan=remote)
        assert _samples(remote, 0, again) == by_step
        assert proxy.bytes_down == first_pass_bytes and again.stats.bytes_read == 0
    finally:
        proxy.close()


def test_credentials_never_appear_in_messages_or_logs(moto, s3_url, caplog):
    caplog.set_level(logging.DEBUG, logger="stream_ssl")
    remote = load_shard_set(s3_url, moto.options()["s3"])
    plan = make_plan([remote], 30, 30, batch_size=10)
    texts = []
    # A missing object (permanent) and a server that resets every connection (retries run out).
    missing = make_plan([dataclasses.replace(remote, url="s3://no-such-bucket/pool")], 30, 30, batch_size=10)
    with pytest.raises(FileNotFoundError) as info:
        ShardReader(missing.sets, moto.options(), retries=1, backoff=0.0).read(missing.rank_slices(0, 0)[0])
    texts += [str(info.value), str(info.value.__cause__)]
    proxy = FaultProxy(moto.port, lambda i: ("reset",))
    try:
        options = moto.options(proxy.endpoint, config_kwargs={"retries": {"max_attempts": 0}})
        reader = ShardReader(plan.sets, options, retries=2, backoff=0.0)
        reader.fetcher.filesystem(s3_url).retries = 1
        with pytest.raises(ReadError) as info:
            reader.read(plan.rank_slices(0, 0)[0])
        texts += [str(info.value), str(info.value.__cause__), repr(reader.stats)]
    finally:
        proxy.close()
    texts += [caplog.text, repr(plan), plan.describe(), str(plan.summary())]
    assert all(SECRET not in t and KEY not in t for t in texts)


def test_loader_workers_stream_from_s3_and_share_the_cache(moto, local_folder, s3_url, tmp_path):
    from stream_ssl.data.augment import ViewSpec
    from stream_ssl.data.loader import make_loader

    local, remote = _plans(local_folder, s3_url, moto.options(), unique_samples=120, budget_samples=640,
                           world_size=1, batch_size=16, num_workers=2, seed=8)
    views = [ViewSpec(16)]
    batches = list(make_loader(remote, 0, views, num_workers=2, storage_options=moto.options(),
                               cache_dir=tmp_path / "cache", read_ahead_bytes=64 << 10))
    want = list(make_loader(local, 0, views, num_workers=0))
    assert [(b.step, b.keys) for b in batches] == [(b.step, b.keys) for b in want]
    assert all((a.views[0] == b.views[0]).all() for a, b in zip(batches, want))
    assert {b.worker for b in batches} == {0, 1} and sum(b.cache_hits for b in batches) > 0
    # Both workers share one cache folder: past the first pass (and a margin for read-ahead) no batch
    # needs the object store, whichever worker stored the samples.
    margin = remote.unique_samples // remote.global_batch + 6
    assert sum(b.bytes_read for b in batches[margin:]) == 0


def test_training_streams_from_s3_through_the_cache_and_writes_no_credentials(moto, s3_url, tmp_path):
    """train.py on s3:// with credentials in --storage-options: 4 passes, the later ones from the cache, and
    neither the key nor the secret in its output or anywhere in the run folder (config.json, checkpoints)."""
    import csv

    from tests.helpers import PYTHON
    from tests.helpers.trainer import TRAIN, run, train_args

    flags = dict(unique_samples="60", budget_samples="240", batch_size=16, num_workers=1, save_every=5,
                 log_with="none", storage_options=json.dumps(moto.options()),
                 read_ahead_bytes="64KiB")  # (a larger read-ahead reads the small pool once for every pass)
    runs = {}
    knn = {"knn_train": s3_url, "knn_test": s3_url, "knn_k": 5}  # the kNN monitor reads s3:// with the same options
    for name, extra in (("cached", {"cache_dir": tmp_path / "cache", "cache_size": "64M", **knn}), ("direct", {})):
        out = tmp_path / name
        r = run([PYTHON, TRAIN, *train_args(s3_url, out, **flags, **extra)])
        assert r.returncode == 0, r.stderr[-3000:]
        assert SECRET not in r.stdout + r.stderr and KEY not in r.stdout + r.stderr
        for f in out.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert SECRET.encode() not in data and KEY.encode() not in data, f
        with open(out / "metrics.csv", newline="") as fh:
            runs[name] = list(csv.DictReader(fh))
    assert "<redacted>" in json.loads((tmp_path / "cached" / "config.json").read_text())["storage_options"]
    assert 0 <= json.loads((tmp_path / "cached" / "summary.json").read_text())["knn"][-1]["knn_top1"] <= 1
    cached, direct = runs["cached"][-1], runs["direct"][-1]
    assert cached["step"] == direct["step"] == "15"  # 240 // 16 steps
    assert int(cached["cache_hits"]) > 0 and int(direct["cache_hits"]) == 0
    storage = json.loads((tmp_path / "direct" / "summary.json").read_text())["storage"]  # what storage gave
    assert storage["requests"] > 0 and storage["bytes_read"] > 0 and storage["ttfb_ms"] > 0
    assert storage["read_MBps"] > 0 and storage["retries"] == 0 and "ttfb_ms" in direct and "read_MBps" in direct
    # 4 passes over the pool: with the cache, about one pass (plus read-ahead) comes from the object store
    assert int(cached["bytes_read"]) < 0.5 * int(direct["bytes_read"])


@pytest.mark.multiprocess
def test_two_simulated_nodes_read_the_pool_at_most_once_each(moto, local_folder, s3_url, tmp_path):
    """Two processes as two nodes (torchrun's variables per process, a cache folder each) train 4 passes from S3
    through a counting proxy: each node gets at most the pool from the object store (+ the index pack, index.json
    and HTTP headers), the run reports it next to the estimate, and every rank trained on the plan's keys."""
    from tests.helpers import PYTHON
    from tests.helpers.trainer import TRAIN, run_nodes, train_args

    proxy = FaultProxy(moto.port)
    try:
        flags = dict(unique_samples="64", budget_samples="256", batch_size=8, num_workers=1, log_with="none",
                     log_keys="true", read_ahead_bytes="64KiB",
                     storage_options=json.dumps(moto.options(proxy.endpoint)))
        out = tmp_path / "out"
        done = run_nodes([[PYTHON, TRAIN, *train_args(s3_url, out, cache_dir=tmp_path / f"cache{n}", **flags)]
                          for n in range(2)])
        assert all(r.returncode == 0 for r in done), [r.stderr[-3000:] for r in done]
    finally:
        proxy.close()
    plan = make_plan([load_shard_set(str(local_folder))], "64", "256", world_size=2, batch_size=8, num_workers=1)
    assert plan.last_pass == 3
    reader = ShardReader(plan.sets)
    units = list(zip(plan.unit_source.tolist(), plan.unit_shard.tolist(), plan.unit_stop.tolist()))
    pool = sum(int(reader.boundaries(s, h)[stop]) for s, h, stop in units)  # every unit starts at sample 0
    storage = json.loads((out / "summary.json").read_text())["object_store"]
    assert storage["nodes"] == 2 and storage["cache_policy"] == "whole pool" and storage["cache_fill"]
    assert 0 < storage["object_store_bytes_read"] <= 2 * pool < 4 * pool  # 4 passes, 2 nodes
    idx = sum(p.bytes for p in plan.sets[0].packs)  # the index pack, fetched once per node (the node's cache)
    index_json = (local_folder / "index.json").stat().st_size
    assert proxy.bytes_down <= 2 * (pool + idx) + 4 * index_json + 1000 * proxy.requests  # (headers)
    for rank in range(2):
        buf = io.StringIO()
        print_keys(plan, rank, out=buf)
        logged = [line.split()[1] for line in (out / "keys" / f"rank-{rank}.txt").read_text().splitlines()]
        assert logged == buf.getvalue().split()


def test_redact_options_hides_secret_values_only(tmp_path):
    from shard_tools.storage import redact_options

    text = json.dumps({"s3": {"key": "AK", "secret": "S", "anon": False, "client_kwargs": {
        "endpoint_url": "http://127.0.0.1:9000", "aws_session_token": "T"}}, "https": {"headers": [{"token": "x"}]}})
    got = json.loads(redact_options(text))
    assert got["s3"]["key"] == got["s3"]["secret"] == got["s3"]["client_kwargs"]["aws_session_token"] == "<redacted>"
    assert got["s3"]["anon"] is False and got["s3"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert got["https"]["headers"] == [{"token": "<redacted>"}]
    path = tmp_path / "opts.json"
    path.write_text(text)
    assert redact_options(str(path)) == str(path)  # a file's contents are never copied
    assert redact_options("{not json, secret: S}") == "<redacted: not valid JSON>" and redact_options("") == ""


def test_evaluate_reads_downstream_sets_from_s3_like_local_ones(moto, make_shard_set, tmp_path, monkeypatch):
    """`python -m stream_ssl.evaluate` on s3:// sets (endpoint and credentials from the AWS environment, or from
    --storage-options) gives the same features, hence the same kNN and linear numbers, as on the local copies."""
    from tests.helpers import PYTHON
    from tests.helpers.runs import make_run
    from tests.helpers.trainer import run

    train_set, test_set = make_shard_set(60, shard_size=30, seed=21), make_shard_set(40, shard_size=20, seed=22)
    fs = filesystem("s3://x", moto.options())
    fs.call_s3("create_bucket", Bucket="downstream")
    for name, folder in (("train", train_set), ("test", test_set)):
        upload_folder(fs, folder, f"s3://downstream/{name}")
    ckpt = make_run(tmp_path / "run")
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION,
           "AWS_ENDPOINT_URL": moto.endpoint}
    results = []
    remote = ("s3://downstream/train", "s3://downstream/test")
    for (train, test), flags, extra_env in (((train_set, test_set), [], {}), (remote, [], env),
                                            (remote, ["--storage-options", json.dumps(moto.options())], {})):
        r = run([PYTHON, "-m", "stream_ssl.evaluate", "--checkpoint", ckpt, "--train", train, "--test", test,
                 "--knn", "--linear", "--no-progress", "--device", "cpu", "--batch-size", "32", *flags], **extra_env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert SECRET not in r.stdout + r.stderr
        results.append(json.loads(r.stdout))
    local, by_env, by_flag = results
    assert by_env["train_samples"] == by_flag["train_samples"] == 60 and by_flag["test_samples"] == 40
    for other in (by_env, by_flag):
        assert other["knn"] == local["knn"] and other["linear"] == local["linear"]


PLAN_ARGS = ["--unique-samples", "100", "--budget-samples", "200", "--batch-size", "10"]


def test_a_missing_bucket_is_named_by_plan_train_verify_listing_and_writers(moto, s3_url, tmp_path, capsys):
    from stream_ssl.train import main as train_main
    from tests.helpers.trainer import train_args

    url, options = "s3://no-such-bucket/shards/pool", moto.options()
    said = f"s3://no-such-bucket: the bucket does not exist (endpoint {moto.endpoint}): check its name"
    assert plan_main(["--data", url, *PLAN_ARGS, "--storage-options", json.dumps(options)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {said}")
    out = tmp_path / "run"
    assert train_main(train_args(url, out, storage_options=json.dumps(options), log_with="none")) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")][0].startswith(
        f"error: {said}")
    report = io.StringIO()
    assert not verify(url, storage_options=options, out=report)
    assert report.getvalue().startswith(f"BAD {url}: {said}") and "not a shard set" not in report.getvalue()
    with pytest.raises(BucketNotFound, match=re.escape(said)):
        list_folder(url, lambda name, size: None, options)
    with pytest.raises(BucketNotFound, match=re.escape(said)):  # what writers check before any work
        check_access(url, options)
    check_access(s3_url, options)  # an existing bucket passes


@contextlib.contextmanager
def refused_credentials(moto):
    """moto checks the credentials of every request while the block runs: it knows none, so every key is refused."""
    def auth(count: bytes) -> None:
        request = urllib.request.Request(f"{moto.endpoint}/moto-api/reset-auth", data=count, method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=30).read()

    auth(b"0")
    try:
        yield
    finally:
        auth(b"inf")


def test_refused_credentials_name_the_url_and_where_credentials_come_from(moto, s3_url, capsys):
    options = moto.options()
    with refused_credentials(moto):
        assert plan_main(["--data", s3_url, *PLAN_ARGS, "--storage-options", json.dumps(options)]) == 1
        err = capsys.readouterr().err
        with pytest.raises(StorageAccessDenied, match="access denied .the store does not know the access key"):
            list_folder(s3_url, lambda name, size: None, options)
        with pytest.raises(StorageAccessDenied, match="InvalidAccessKeyId"):
            check_access(s3_url, options)
    assert err.startswith(f"error: {s3_url}/index.json: access denied ("), err  # (a HEAD request: 403, no body)
    assert all(w in err for w in ("--storage-options", '"key"', "AWS_ACCESS_KEY_ID", "AWS_PROFILE", '"anon": true'))
    assert "PermissionError" not in err and SECRET not in err and KEY not in err
    assert load_shard_set(s3_url, options["s3"]).num_samples == 240  # (the server accepts anyone again)


def test_no_credentials_say_so_and_the_log_keeps_every_word(moto, s3_url, tmp_path, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    nowhere = str(tmp_path / "none")
    for name, value in {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": nowhere,
                        "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    assert plan_main(["--data", s3_url, *PLAN_ARGS]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {s3_url}/index.json: no credentials found; credentials come from --storage-"
                          'options (keys "key", "secret", "token" or "profile"), the variables AWS_ACCESS_KEY_ID'), err
    log = Path(re.search(r"\(traceback: (.+)\)$", err).group(1)).read_text()
    assert "NoCredentialsError: Unable to locate credentials" in log


def test_pack_names_a_missing_bucket(moto, tmp_path, capsys):
    from shard_tools.pack import main as pack_main
    from shard_tools.synth import synthesize

    manifest = synthesize(tmp_path / "img", 8, classes=2, size=16)
    assert pack_main([str(manifest), "--out", "s3://no-such-bucket/pool", "--storage-options",
                      json.dumps(moto.options())]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: s3://no-such-bucket: the bucket does not exist (endpoint {moto.endpoint})"), err


def test_the_shard_check_lists_prefixes_at_once_with_the_one_listing_report(moto, local_folder, s3_url, monkeypatch):
    """Against a real S3 server: the check of given shards lists them by name prefixes (one shard a prefix
    here), and reports what one listing of the folder reports, the missing shard and .idx included."""
    monkeypatch.setattr(listing, "PER_PREFIX", 1)
    fs = filesystem("s3://x", moto.options())
    url = f"s3://{BUCKET}/sets/damaged"
    upload_folder(fs, local_folder, url)
    fs.rm(f"{BUCKET}/sets/damaged/set-000003.tar")
    fs.rm(f"{BUCKET}/sets/damaged/set-000005.idx")
    damaged = load_shard_set(url, moto.options())
    whole = listing.check_shards(damaged, storage_options=moto.options())
    check = listing.check_shards(damaged, range(8), storage_options=moto.options())
    assert check.listings == 8 and whole.listings == 1
    assert check.missing.tolist() == whole.missing.tolist() == [3]
    assert check.no_idx.tolist() == whole.no_idx.tolist() == [5] and check.summary() == whole.summary()
    two = listing.check_shards(damaged, [3, 6], storage_options=moto.options())
    assert two.listings == 2 and two.missing.tolist() == [3]
    assert listing.check_shards(load_shard_set(s3_url, moto.options()), range(8), storage_options=moto.options()).ok
