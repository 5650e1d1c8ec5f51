"""The streaming reader on local and HTTP shard sets: exact samples, resume without reading the past,
retries that resume at sample boundaries, corrupt samples counted, the disk cache, the loader."""

from __future__ import annotations

import io
import tarfile
import zlib
from collections import Counter

import pytest

from shard_tools.shardset import load_shard_set
from shard_tools.storage import is_transient, options_for, redact
from stream_ssl.data.cache import DiskCache
from stream_ssl.data.fetch import Fetcher, Policy
from stream_ssl.data.loader import PlanDataset, make_loader
from stream_ssl.data.plan import make_plan
from stream_ssl.data.readahead import ReadAhead, _merge
from stream_ssl.data.reader import ReadError, ShardReader
from stream_ssl.data.streaming import TooManySkipped
from stream_ssl.plan import main as plan_main
from stream_ssl.plan import print_keys
from stream_ssl.testing.servers import HttpServer
from tests.helpers.images import corrupt_copy


@pytest.fixture(scope="module")
def folder(make_shard_set):
    return make_shard_set(300, shard_size=40)


@pytest.fixture(scope="module")
def shards(folder):
    return load_shard_set(str(folder))


@pytest.fixture(scope="module")
def truth(shards):
    """Every sample of every shard, parsed with tarfile: {(shard, index): {'__key__', ext: bytes}}."""
    out = {}
    for i, info in enumerate(shards.shards):
        with tarfile.open(shards.shard_url(i)) as tar:
            samples: list[dict] = []
            for m in tar:
                key, _, ext = m.name.partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(m).read()
        assert len(samples) == info.samples
        out.update({(i, j): s for j, s in enumerate(samples)})
    return out


def _stream(plan, rank, reader, start=0, **kw):
    return list(ReadAhead(reader, plan, rank, range(start, plan.steps), **kw))


def _check(samples, truth):
    for s in samples:
        want = truth[(s["__shard__"], s["__index__"])]
        assert s["__key__"] == want["__key__"]
        assert {k: v for k, v in s.items() if not k.startswith("__")} == {k: v for k, v in want.items()
                                                                          if k != "__key__"}


def test_stream_yields_the_planned_samples_with_their_bytes(shards, truth):
    plan = make_plan([shards], 250, 600, world_size=2, batch_size=8, seed=3)
    for rank in range(2):
        reader = ShardReader(plan.sets)
        got = _stream(plan, rank, reader)
        assert [step for step, _ in got] == list(range(plan.steps))
        for step, samples in got:
            assert [(s["__source__"], s["__shard__"], s["__index__"]) for s in samples] == plan.rank_samples(step, rank)
            _check(samples, truth)
        assert reader.stats.retries == 0 and reader.stats.corrupt == 0


class Recording:
    """A local filesystem that records the byte ranges asked of it (the reader then skips its own pread path)."""

    def __init__(self, fs):
        self.fs, self.requests = fs, []

    def _strip_protocol(self, url):
        return self.fs._strip_protocol(url)

    def cat_file(self, path, start=None, end=None):
        self.requests.append((path, start, end))
        return self.fs.cat_file(path, start=start, end=end)


def _recording_reader(plan, **kw):
    import fsspec

    rec = Recording(fsspec.filesystem("file"))
    fetcher = Fetcher(filesystems={"file": rec}, direct_local=False, policy=Policy(backoff=0.0, **kw))
    return ShardReader(plan.sets, fetcher=fetcher), rec


def test_resume_reads_only_what_the_remaining_steps_need(shards):
    plan = make_plan([shards], 300, 900, world_size=1, batch_size=12, seed=1)
    full = _stream(plan, 0, ShardReader(plan.sets))
    start = plan.steps * 2 // 3
    reader, rec = _recording_reader(plan)
    rest = _stream(plan, 0, reader, start=start)
    assert [(step, [s["__key__"] for s in samples]) for step, samples in rest] == \
        [(step, [s["__key__"] for s in samples]) for step, samples in full[start:]]
    needed: dict[str, set] = {}
    for step in range(start, plan.steps):
        for p in plan.rank_slices(step, 0):
            b = reader.boundaries(p.source, p.shard)
            needed.setdefault(shards.shard_url(p.shard), set()).update(range(int(b[p.start]), int(b[p.stop])))
    for path, a, z in rec.requests:  # nothing only the steps before the resume point need was read
        assert path.endswith((".idx", ".idxpack")) or set(range(a, z)) <= needed[path]
    assert reader.stats.bytes_read <= sum(len(v) for v in needed.values()) * 3  # at most once per pass


def test_reads_of_a_window_of_steps_are_merged_into_few_requests(shards):
    plan = make_plan([shards], 300, 300, world_size=1, batch_size=12, seed=1)  # mixing on: blocks of 1 sample
    reader, rec = _recording_reader(plan)
    _stream(plan, 0, reader)
    rec.requests = [r for r in rec.requests if not r[0].endswith((".idx", ".idxpack"))]
    assert len(rec.requests) <= 2 * len(shards.shards)  # per shard read, not per block
    per_step = sum(len(plan.rank_slices(step, 0)) for step in range(plan.steps))  # step by step: one per block
    assert per_step > 4 * len(shards.shards)
    reader, rec = _recording_reader(plan)
    _stream(plan, 0, reader, read_ahead_bytes=1)  # the least read-ahead still reads a window at a time
    rec.requests = [r for r in rec.requests if not r[0].endswith((".idx", ".idxpack"))]
    assert len(rec.requests) <= 2 * len(shards.shards) + plan.steps // plan.shuffle_window


def test_merge_joins_touching_ranges_with_their_first_need():
    assert _merge([(10, 20, 3), (5, 9, 0), (0, 10, 2), (25, 30, 1)]) == [(0, 20, 0), (25, 30, 1)]


class Flaky:
    """Wraps a filesystem: fails some cat_file calls (an exception, or a body cut short) and records ranges.

    `pattern(request, attempt)` decides a call's fate from the request's identity (a hash of its file and byte
    range) and how often that range was asked for before, never from the order of calls: the reader's threads
    interleave requests differently from run to run, and a fault must not follow the schedule."""

    def __init__(self, fs, pattern):
        self.fs, self.pattern, self.calls, self.requests = fs, pattern, 0, []
        self.attempts: dict[tuple, int] = {}

    def _strip_protocol(self, url):
        return self.fs._strip_protocol(url)

    def cat_file(self, path, start=None, end=None):
        self.calls += 1
        key = (path.rsplit("/", 1)[-1], start, end)
        attempt = self.attempts[key] = self.attempts.get(key, -1) + 1
        action = self.pattern(zlib.crc32(repr(key).encode()), attempt)
        if path.endswith((".idx", ".idxpack")) or action is None:
            data = self.fs.cat_file(path, start=start, end=end)
            if not path.endswith((".idx", ".idxpack")):
                self.requests.append((path, start, end, len(data)))
            return data
        if action == "reset":
            raise ConnectionResetError("connection reset by peer")
        if action == "timeout":
            raise TimeoutError("read timed out")
        if action == "missing":
            raise FileNotFoundError(path)
        data = self.fs.cat_file(path, start=start, end=end)
        cut = int(len(data) * action)  # a truncated body: some samples complete, one partial
        self.requests.append((path, start, end, cut))
        return data[:cut]


def _flaky_reader(plan, pattern, **kw):
    import fsspec

    flaky = Flaky(fsspec.filesystem("file"), pattern)
    fetcher = Fetcher(filesystems={"file": flaky}, direct_local=False, policy=Policy(backoff=0.0, **kw))
    return ShardReader(plan.sets, fetcher=fetcher), flaky


def test_transient_failures_resume_at_the_last_complete_sample(shards, truth):
    plan = make_plan([shards], 300, 600, world_size=2, batch_size=10, seed=5)
    expected = _stream(plan, 1, ShardReader(plan.sets))
    faults = {2: "reset", 3: 0.5, 5: "timeout", 7: 0.3, 8: 0.9, 11: "reset", 13: 0.05, 17: 0.6}
    # 8 of 20 ranges fail (or are cut) the first time they are asked for; what is asked again succeeds
    reader, flaky = _flaky_reader(plan, lambda i, attempt: faults.get(i % 20) if attempt == 0 else None,
                                  request_bytes=8 * 1024)
    got = _stream(plan, 1, reader)
    assert [(st, [s["__key__"] for s in ss]) for st, ss in got] == \
        [(st, [s["__key__"] for s in ss]) for st, ss in expected]
    for _, samples in got:
        _check(samples, truth)
    assert reader.stats.retries >= 8
    # Every re-issued request starts at a sample boundary, and no byte is delivered twice: the whole samples
    # kept from all requests add up to exactly the bytes an undisturbed read takes.
    reference = ShardReader(plan.sets)
    _stream(plan, 1, reference)
    kept = 0
    for path, start, end, n in flaky.requests:
        shard = next(i for i, info in enumerate(shards.shards) if path.endswith("/" + info.path))
        b = [int(x) for x in reader.boundaries(0, shard)]
        assert start in b and end in b
        kept += max(x for x in b if x <= start + n) - start
    assert kept == reference.stats.bytes_read


def test_permanent_errors_fail_at_once_and_retries_run_out(shards):
    plan = make_plan([shards], 100, 100, batch_size=10)
    reader, flaky = _flaky_reader(plan, lambda i, attempt: "missing")
    with pytest.raises(FileNotFoundError):
        reader.read(plan.rank_slices(0, 0)[0])
    assert reader.stats.retries == 0
    reader, flaky = _flaky_reader(plan, lambda i, attempt: "reset", retries=3)
    with pytest.raises(ReadError, match="failed 4 times in a row without progress"):
        reader.read(plan.rank_slices(0, 0)[0])
    assert reader.stats.retries == 3


def test_transient_classification():
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(OSError(5, "EIO"))
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())
    assert not is_transient(ValueError("bad data"))

    class Status(Exception):
        def __init__(self, status):
            self.status = status

    assert is_transient(Status(503)) and is_transient(Status(429)) and not is_transient(Status(403))


def test_storage_options_and_redaction(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert options_for("s3://b/k")["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    per = {"s3": {"anon": True}, "https": {"headers": {"a": "b"}}}
    assert options_for("s3://b/k", per)["anon"] is True
    assert options_for("http://h/x", per) == {"headers": {"a": "b"}}
    assert options_for("/local/x", per) == {}
    assert options_for("s3://b/k", {"client_kwargs": {"endpoint_url": "http://x"}})["client_kwargs"] == \
        {"endpoint_url": "http://x"}
    assert redact("failed: https://user:pw@host/a.tar?X-Amz-Signature=s3cr3t") == "failed: https://host/a.tar"


@pytest.mark.parametrize("how", ["header", "zeros"])
def test_undecodable_samples_are_skipped_counted_and_fail_past_the_threshold(folder, tmp_path, how):
    from stream_ssl.data.augment import ViewSpec

    s = corrupt_copy(folder, tmp_path, {(0, 3): how})
    plan = make_plan([s], 300, 300, batch_size=30, shuffle_block=0)
    views = [ViewSpec(16)]
    batches = list(PlanDataset(plan, 0, views, skip_grace=1))
    assert sum(b.skipped for b in batches) == 1
    assert all(len(b.keys) == 30 and b.views[0].shape[0] == 30 for b in batches)
    with pytest.raises(TooManySkipped, match="could not be decoded"):
        list(PlanDataset(plan, 0, views, skip_grace=0, skip_fraction=0.0))


def test_loader_matches_keys_cli_and_reports_counters(folder, shards, capsys):
    from stream_ssl.data.augment import ViewSpec

    plan = make_plan([shards], 200, 480, world_size=2, batch_size=8, num_workers=2, seed=2)
    loader = make_loader(plan, 1, [ViewSpec(16)], start_step=5, num_workers=2, seed=2)
    batches = list(loader)
    assert [b.step for b in batches] == list(range(5, plan.steps))
    assert {b.worker for b in batches} == {0, 1}
    assert sum(b.bytes_read for b in batches) > 0 and all(b.skipped == 0 for b in batches)
    keys = [k for b in batches for k in b.keys]
    buf = io.StringIO()
    assert print_keys(plan, 1, 5, out=buf) == len(keys)
    assert buf.getvalue().split() == keys
    rc = plan_main(["--data", str(folder), "--unique-samples", "200", "--budget-samples", "480", "--world-size", "2",
                    "--batch-size", "8", "--seed", "2", "--keys", "--rank", "1", "--start-step", "5",
                    "--check-headers"])
    assert rc == 0 and capsys.readouterr().out.split() == keys


def test_loader_micro_batches_come_in_order(shards):
    from stream_ssl.data.augment import ViewSpec

    plan = make_plan([shards], 200, 480, world_size=2, batch_size=12, seed=2)
    batches = list(make_loader(plan, 0, [ViewSpec(16)], start_step=3, num_workers=2, micro_batches=3))
    assert [(b.step, b.micro) for b in batches] == [(s, m) for s in range(3, plan.steps) for m in range(3)]
    by_step: dict = {}
    for b in batches:
        assert len(b.keys) == 4
        by_step.setdefault(b.step, []).extend(b.keys)
    reader = ShardReader(plan.sets)
    for step, keys in by_step.items():
        assert sorted(keys) == sorted(k for p in plan.rank_slices(step, 0) for k in reader.keys(p))
    buf = io.StringIO()
    print_keys(plan, 0, 3, out=buf, micro_batches=3)
    assert buf.getvalue().split() == [k for b in batches for k in b.keys]


def test_plan_cli_errors_and_json(folder, capsys):
    rc = plan_main(["--data", str(folder), "--unique-samples", "301", "--budget-samples", "1K"])
    assert rc == 2 and "300 samples available" in capsys.readouterr().err
    rc = plan_main(["--data", str(folder), "--unique-samples", "0.5", "--budget-samples", "1.2K", "--batch-size", "16",
                    "--world-size", "3", "--json"])
    import json

    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["unique_samples"] == 150 and s["steps"] == 1200 // 48
    assert s["sources"][0]["unique"] == 150 and s["dropped"] == 1200 - 25 * 48 and s["samples_per_rank"] == 25 * 16
    assert s["bytes_to_read"] > s["cache_needed_bytes"] > 0 and s["passes"] == 8.0


def test_disk_cache_serves_ranges_and_stays_bounded(shards, tmp_path):
    plan = make_plan([shards], 300, 900, batch_size=15, seed=4)
    cache = DiskCache(tmp_path / "cache", 64 << 20)
    reader = ShardReader(plan.sets, cache=cache, plan=plan, cache_local=True)
    first, read_by_step = [], []
    for item in ReadAhead(reader, plan, 0, range(plan.steps), read_ahead_bytes=16 << 10):
        first.append(item)
        read_by_step.append(reader.stats.bytes_read)
    assert reader.stats.cache_hits > 0 and reader.stats.cache_stores > 0
    # Steps that lie wholly in later passes take nothing from storage: the first pass stored it all.
    later = [i for i in range(plan.steps) if i * plan.global_batch >= plan.unique_samples]
    assert later and all(read_by_step[i] == read_by_step[i - 1] for i in later)
    assert Counter(s["__index__"] for _, ss in first for s in ss)  # sanity: something was read
    # A second run over the warm cache reads nothing from storage at all.
    again = ShardReader(plan.sets, cache=DiskCache(tmp_path / "cache", 64 << 20), plan=plan, cache_local=True)
    second = _stream(plan, 0, again)
    assert again.stats.bytes_read == 0 and again.stats.cache_hits > 0
    assert [[s["jpg"] for s in ss] for _, ss in second] == [[s["jpg"] for s in ss] for _, ss in first]

    small = DiskCache(tmp_path / "small", 40_000)
    for k in range(20):
        small.put("k" * 40, k * 10, k * 10 + 10, bytes(3000))
    assert small.size() <= 40_000 and small.evicted > 0
    held = small.entries("k" * 40)
    assert held and held[-1][0] == 190  # the newest stay
    assert small.read(held[-1][2], 0, 3000, 2999) is None  # damaged (wrong size): a miss, and removed
    assert len(small.entries("k" * 40)) == len(held) - 1


def test_http_shard_set_reads_like_local(folder, shards, truth):
    server = HttpServer(folder)
    try:
        remote = load_shard_set(server.url)
        plan = make_plan([remote], 120, 240, world_size=2, batch_size=6, seed=7)
        local = make_plan([shards], 120, 240, world_size=2, batch_size=6, seed=7)
        for rank in range(2):
            a = _stream(plan, rank, ShardReader(plan.sets))
            b = _stream(local, rank, ShardReader(local.sets))
            assert [[(s["__key__"], s["jpg"]) for s in ss] for _, ss in a] == \
                [[(s["__key__"], s["jpg"]) for s in ss] for _, ss in b]
    finally:
        server.close()


def test_an_index_is_fetched_once_however_many_threads_ask(shards):
    import threading
    import time

    import fsspec

    release = threading.Event()

    class Slow(Recording):
        def cat_file(self, path, start=None, end=None):
            release.wait(10)  # every other thread asks while this fetch is in flight
            return super().cat_file(path, start, end)

    slow = Slow(fsspec.filesystem("file"))
    reader = ShardReader((shards,), fetcher=Fetcher(filesystems={"file": slow}, direct_local=False))
    got = []
    threads = [threading.Thread(target=lambda: got.append(reader.index(0, 3))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    release.set()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(g is got[0] for g in got)
    assert [p for p, *_ in slow.requests] == [shards.pack_url(0)] and reader.stats.index_fetches == 1


def test_local_shards_read_ahead_at_most_the_local_bound(shards):
    """Local files have no latency to hide: whatever --read-ahead-bytes says, the reader holds at most
    LOCAL_READ_AHEAD ahead (a smaller setting still wins); a set behind a URL keeps the setting."""
    import dataclasses

    from stream_ssl.data.readahead import LOCAL_READ_AHEAD

    plan = make_plan([shards], 300, 300, batch_size=15)
    reader = ShardReader(plan.sets)
    assert ReadAhead(reader, plan, 0, [], read_ahead_bytes=1 << 30).budget == LOCAL_READ_AHEAD
    assert ReadAhead(reader, plan, 0, [], read_ahead_bytes=1 << 20).budget == 1 << 20
    remote = dataclasses.replace(plan, sets=[dataclasses.replace(plan.sets[0], url="s3://bucket/set")])
    assert ReadAhead(reader, remote, 0, [], read_ahead_bytes=1 << 30).budget == 1 << 30


@pytest.mark.parametrize("how", ["mmap", "pread"])
def test_local_reads_deliver_the_planned_bytes_and_name_a_short_file(folder, tmp_path, truth, how):
    """Both ways of reading local shards give every planned sample's bytes (mmap: views of the file's map, no
    copy); a shard shorter than its .idx says is one clear error naming the file, not a crash or short data."""
    shards = load_shard_set(str(folder))
    plan = make_plan([shards], 300, 300, batch_size=15, seed=2)
    reader = ShardReader(plan.sets, local_reads=how)
    items = _stream(plan, 0, reader)
    _check([s for _, ss in items for s in ss], truth)
    images = [s["jpg"] for _, ss in items for s in ss]
    assert all(isinstance(b, memoryview) for b in images)
    owners = {type(b.obj).__name__ for b in images}
    assert owners == ({"mmap"} if how == "mmap" else {"bytes"})

    cut = tmp_path / "cut"
    cut.mkdir()
    for p in folder.iterdir():
        (cut / p.name).write_bytes(p.read_bytes())
    tar = sorted(cut.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    short = load_shard_set(str(cut))
    with pytest.raises(ReadError, match=rf"{tar.name}: \d+ bytes at \d+, the .idx needs \d+ \(truncated"):
        ShardReader((short,), local_reads=how, check_headers=False).read_range(0, 0, 0, short.shards[0].samples)
    with pytest.raises(ValueError, match="local_reads: 'copy', not one of mmap, pread"):
        Fetcher(local_reads="copy")


def test_cached_ranges_are_views_of_the_entry_and_checked_on_first_read(tmp_path):
    """A cache entry is read as a view of its mapped file; the first read checks the checksum over the whole
    entry, so a damaged entry is a miss (and removed) however small the range asked for."""
    cache = DiskCache(tmp_path / "c", 1 << 20)
    payload = bytes(range(256)) * 40
    assert cache.put("k" * 40, 0, 10, payload)
    (first, stop, path), = cache.entries("k" * 40)
    got = cache.read(path, 100, 50, len(payload))
    assert isinstance(got, memoryview) and bytes(got) == payload[100:150]
    del got  # the file is rewritten in place below: no map of it may be touched after
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    other = DiskCache(tmp_path / "c", 1 << 20)  # a process that has not checked the entry yet
    path.write_bytes(bytes(damaged))
    assert other.read(path, 0, 10, len(payload)) is None and not path.exists()


def test_the_first_window_is_read_in_small_gets_all_sent_at_once(shards, monkeypatch):
    """The first item's samples lie anywhere in the first mixing window: its bytes come in GETs of at most
    OPENING_REQUEST_BYTES (one sample may be more), every GET of the first fill in flight at once; the samples
    are the same."""
    from stream_ssl.data import readahead

    plan = make_plan([shards], 300, 300, world_size=1, batch_size=12, seed=1)
    want = [[s["__key__"] for s in samples] for _, samples in _stream(plan, 0, ShardReader(plan.sets))]
    monkeypatch.setattr(readahead, "OPENING_REQUEST_BYTES", 4096)
    reader, rec = _recording_reader(plan)  # GETs of up to 16 MiB otherwise
    assert [[s["__key__"] for s in samples] for _, samples in _stream(plan, 0, reader)] == want
    first, _, start, steps = plan.window(0)
    opening: dict[str, set] = {}
    for step in range(start, start + steps):
        for p in plan.rank_slices(step, 0):
            b = reader.boundaries(p.source, p.shard)
            opening.setdefault(shards.shard_url(p.shard), set()).update(range(int(b[p.start]), int(b[p.stop])))
    data = [(path, a, z) for path, a, z in rec.requests if path.endswith(".tar")]
    biggest = max(int(max(b[1:] - b[:-1])) for b in (reader.boundaries(0, i) for i in range(len(shards.shards))))
    small = [(a, z) for path, a, z in data if set(range(a, z)) & opening.get(path, set())]
    assert small and all(z - a <= max(4096, biggest) for a, z in small)
    assert len(data) > len(shards.shards)  # (one GET per shard without the opening)
    assert reader.fetcher.concurrency >= min(64, len(data))  # the whole pass was the first fill here


def test_without_mixing_only_the_first_item_is_read_in_small_gets(shards, monkeypatch):
    from stream_ssl.data import readahead

    plan = make_plan([shards], 300, 300, world_size=1, batch_size=12, seed=1, shuffle_block=0)
    monkeypatch.setattr(readahead, "OPENING_REQUEST_BYTES", 1)  # one sample per GET for the opening
    reader, rec = _recording_reader(plan)
    _stream(plan, 0, reader)
    first = plan.rank_slices(0, 0)
    data = [r for r in rec.requests if r[0].endswith(".tar")]
    assert len(data) <= sum(len(p) for p in first) + 2 * len(shards.shards)


def test_minus_keeps_what_the_cover_does_not_hold():
    from stream_ssl.data.readahead import _minus

    assert _minus([(0, 10, 5), (20, 30, 6)], [(2, 4, 0), (8, 22, 0)]) == [(0, 2, 5), (4, 8, 5), (22, 30, 6)]
    assert _minus([(0, 10, 1)], []) == [(0, 10, 1)] and _minus([(3, 5, 1)], [(0, 10, 0)]) == []
