"""benchmarks/stream.py's method: how a request recorded at the proxy is classified (data, metadata, HEAD, LIST)
for each reader and store, requests in flight, the check that a pass handed every sample once, figures as
median [min-max] with ratios taken per round, and the proxy's per-request records themselves (timed against a
moto server behind the shaping proxy)."""

from __future__ import annotations

import time

import pytest

from benchmarks.stream import Bench, checked, count_requests, in_flight, kind_of, ratio, spread


def rec(method: str, path: str, start: float = 0.0, first: float | None = None, end: float | None = None) -> dict:
    return {"method": method, "path": path, "start": start, "first": first, "end": end, "bytes": 0}


@pytest.mark.parametrize("method, path, reader, kind", [
    ("GET", "/bench/set/bench-000003.tar", "ours", "data"),
    ("GET", "/bench/set/bench-000003.idx", "ours", "meta"),
    ("GET", "/bench/set/index.json?x-id=GetObject", "ours", "meta"),
    ("HEAD", "/bench/set/bench-000003.tar", "webdataset", "head"),
    ("GET", "/bench?list-type=2&prefix=set%2F&delimiter=%2F", "ours", "list"),
    ("GET", "/bench/?prefix=litdata", "litdata", "list"),
    ("GET", "/bench/litdata/chunk-0-3.bin", "litdata", "data"),
    ("GET", "/bench/litdata/index.json", "litdata", "meta"),
    ("GET", "/bench/mosaic/shard.00001.mds", "mosaic", "data"),
    ("GET", "/bench/mosaic/shard.00001.mds.zstd", "mosaic", "data"),
    ("GET", "/bench/mosaic/index.json", "mosaic", "meta"),
    ("GET", "/bench/set/bench-000003.tar", "litdata", "meta"),  # by the reader's own data objects
    ("PUT", "/bench/set/x.tar", "ours", "other"),
    # GCS (JSON API): media downloads are GETs of objects, object info a HEAD, the bucket's /o a LIST
    ("GET", "/download/storage/v1/b/bench/o/set%2Fbench-000001.tar?alt=media", "ours", "data"),
    ("GET", "/download/storage/v1/b/bench/o/set%2Fbench-000001.idx?alt=media", "ours", "meta"),
    ("GET", "/storage/v1/b/bench/o/set%2Fbench-000001.tar", "ours", "head"),
    ("GET", "/storage/v1/b/bench/o?prefix=set%2F", "ours", "list"),
    # Azure
    ("GET", "/devstoreaccount1/bench/set/bench-000001.tar", "ours", "data"),
    ("GET", "/devstoreaccount1/bench?restype=container&comp=list&prefix=set", "ours", "list"),
    ("GET", "/devstoreaccount1/bench?restype=container", "ours", "head"),
])
def test_requests_are_classified_by_method_and_object_name(method, path, reader, kind):
    assert kind_of(rec(method, path), reader) == kind


def test_counts_and_requests_in_flight():
    records = [rec("GET", "/b/s/a.tar", 0.0, 0.1, 1.0), rec("GET", "/b/s/a.idx", 0.5, 0.6, 0.7),
               rec("GET", "/b/s/b.tar", 0.9, None, None), rec("HEAD", "/b/s/b.tar", 1.0, 1.1, 1.1)]
    assert count_requests(records, "ours") == {"data": 2, "meta": 1, "head": 1, "list": 0, "other": 0}
    assert in_flight(records) == 2  # a request without an answer is open for no time; one ending at 1.0 is closed
    assert in_flight([]) == 0


def test_a_pass_that_does_not_hand_every_sample_once_is_an_error():
    good = {"samples": 8, "unique": 8, "objects": 0}
    assert checked(good, 8, 2, "ours") is good
    assert "error" in checked({**good, "unique": 7}, 8, 2, "ours")  # a duplicate
    assert "error" in checked({**good, "samples": 7, "unique": 7}, 8, 2, "litdata")  # one missing
    assert "error" not in checked({"samples": 8, "unique": 0, "objects": 2}, 8, 2, "ceiling")
    assert "error" in checked({"samples": 8, "unique": 0, "objects": 1}, 8, 2, "ceiling")
    assert checked({"error": "x"}, 8, 2, "ours") == {"error": "x"}


def test_figures_are_medians_with_their_range_and_ratios_are_taken_per_round():
    assert spread([3.0, 1.0, 2.0], "{:.1f}") == "2.0 [1.0-3.0]"
    assert spread([5.0], "{:.0f}", failed=1) == "5 (1 failed)"
    assert spread([], "{:.0f}") == "n/a"
    bench = Bench.__new__(Bench)
    run = lambda s: {"samples": 100, "seconds": s}  # noqa: E731
    # rounds: ours 1 s / 2 s / 4 s, litdata 2 s / 1 s / error: ratios 2.0 and 0.5 (round 3 has no pair)
    bench.results = {("s", "ours"): [run(1), run(2), run(4)], ("s", "litdata"): [run(2), run(1), {"error": "x"}]}
    assert ratio(bench, "s", "ours", "litdata") == "1.25 [0.50-2.00]"


@pytest.mark.s3
def test_the_proxy_records_every_request_with_its_times(moto):
    from shard_tools.storage import filesystem
    from stream_ssl.testing.servers import FaultProxy

    fs = filesystem("s3://x", moto.options())
    fs.call_s3("create_bucket", Bucket="rec")
    fs.pipe_file("s3://rec/a/data.bin", b"x" * 300_000)
    proxy = FaultProxy(moto.port, latency=0.05, rate=4e6)
    try:
        via = filesystem("s3://rec", moto.options(proxy.endpoint))
        t0 = time.perf_counter()
        assert len(via.cat_file("s3://rec/a/data.bin", start=0, end=200_000)) == 200_000
        time.sleep(0.1)  # the proxy's threads finish their bookkeeping
        gets = [r for r in proxy.records if r["method"] == "GET" and r["path"].startswith("/rec/a/data.bin")]
        assert len(gets) == 1 and proxy.requests >= 1
        r = gets[0]
        assert t0 <= r["start"] and r["first"] - r["start"] >= 0.05  # the latency, before the first byte
        assert r["end"] - r["first"] >= 0.04  # 200 KB at 4 MB/s, the last chunk sent as it comes
        assert 200_000 < r["bytes"] < 201_000  # the body and the response's headers
    finally:
        proxy.close()
