"""The generated store of benchmarks/startup.py (stream_ssl/testing/fakestore.py): what it serves is what the real
code reads, index.json in the writer's format, listings, .idx and shard bytes whose tar headers match the .idx, and
s3:// is the real client again once it is no longer served."""

from __future__ import annotations

import json

import fsspec
import pytest

from shard_tools.listing import check_shards
from shard_tools.shardset import load_shard_set, parse_idx
from shard_tools.writer import index_bytes
from stream_ssl.data.plan import make_plan
from stream_ssl.data.readahead import ReadAhead
from stream_ssl.data.reader import ShardReader
from stream_ssl.testing.fakestore import FakeStore, Layout, serving


def test_index_json_is_the_writers_and_shards_match_their_idx():
    layout = Layout(shards=12, samples=5, sample_bytes=700)
    assert index_bytes(json.loads(layout.index_json())) == layout.index_json()
    big = Layout(shards=25_001, samples=3)  # (made 10,000 shards at a time)
    assert index_bytes(json.loads(big.index_json())) == big.index_json()
    members = parse_idx(layout.idx(3).decode())
    data = layout.shard_range(3, 0, layout.shard_bytes)
    assert len(data) == layout.shard_bytes and len(members) == 5
    for (ext, offset, size, name), in members:
        assert data[offset - 512:offset - 512 + len(name)] == name.encode() and size == 700 and ext == "jpg"
    assert layout.shard_range(3, 1000, 3000) == data[1000:3000]
    assert layout.shard_of("pool-000011.idx") == (11, "idx") and layout.shard_of("pool-000012.tar") is None


def test_the_real_code_reads_the_store_through_s3_urls():
    real = fsspec.get_filesystem_class("s3")
    store = FakeStore(Layout(shards=40, samples=10, sample_bytes=3000), latency=0.001)
    with serving(store):
        s = load_shard_set(store.url)
        assert len(s.shards) == 40 and s.num_samples == 400
        assert check_shards(s, range(40)).ok and store.listing.pages == 1
        plan = make_plan([s], 100, 200, batch_size=10, seed=0)
        reader = ShardReader(plan.sets, plan=plan)
        try:
            (step, samples), = list(ReadAhead(reader, plan, 0, [0]))
        finally:
            reader.close()
        assert step == 0 and len(samples) == 10 and all(len(x["jpg"]) == 3000 for x in samples)
        assert store.requests("index.json") == 1 and store.requests("idx") >= 1 and store.requests("shard") >= 1
        with pytest.raises(FileNotFoundError, match="not a shard set"):
            load_shard_set("s3://bucket/other")
    assert fsspec.get_filesystem_class("s3") is real
