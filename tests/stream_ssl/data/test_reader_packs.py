"""Index packs in the reader: one object for many shards' `.idx`, fetched whole when the run reads enough of its
shards, as ranges when it reads few; sets without packs read each `.idx`; a pack that is not the listed one is
one clear error."""

from __future__ import annotations

import json
import shutil

import fsspec
import pytest

from shard_tools.shardset import load_shard_set
from stream_ssl.data import reader as reader_module
from stream_ssl.data.fetch import Fetcher
from stream_ssl.data.plan import make_plan
from stream_ssl.data.readahead import ReadAhead
from stream_ssl.data.reader import ShardReader


class Recording:
    """A local filesystem that records (file name, start, end) of every GET."""

    def __init__(self):
        self.fs, self.requests = fsspec.filesystem("file"), []

    def _strip_protocol(self, url):
        return self.fs._strip_protocol(url)

    def cat_file(self, path, start=None, end=None):
        self.requests.append((path.rsplit("/", 1)[-1], start, end))
        return self.fs.cat_file(path, start=start, end=end)


@pytest.fixture(scope="module")
def folder(make_shard_set):
    return make_shard_set(300, shard_size=40)  # 8 shards


def _pass(plan) -> tuple[list, Recording]:
    rec = Recording()
    reader = ShardReader(plan.sets, plan=plan, fetcher=Fetcher(filesystems={"file": rec}, direct_local=False))
    keys = [[s["__key__"] for s in samples] for _, samples in ReadAhead(reader, plan, 0, range(plan.steps))]
    return keys, rec


def _index_requests(rec: Recording) -> list:
    return [r for r in rec.requests if not r[0].endswith(".tar")]


def test_a_pass_over_a_set_fetches_its_one_pack_whole_and_no_idx(folder):
    shards = load_shard_set(str(folder))
    assert len(shards.packs) == 1 and shards.packs[0].stop == len(shards.shards) == 8
    keys, rec = _pass(make_plan([shards], 300, 300, batch_size=10))
    assert _index_requests(rec) == [("index-000000.idxpack", None, None)]
    assert sum(map(len, keys)) == 300


def test_few_shards_of_a_large_pack_are_read_as_ranges_with_the_same_samples(folder, monkeypatch):
    shards = load_shard_set(str(folder))
    small = make_plan([shards], 30, 60, batch_size=10)  # 30 of 300 samples: a pool of 1 of the 8 shards
    want, _ = _pass(small)
    monkeypatch.setattr(reader_module, "WHOLE_PACK_BYTES", 0)  # as if the pack held a thousand shards
    got, rec = _pass(small)
    assert got == want
    pool = sorted(set(small.unit_shard.tolist()))
    pack = shards.packs[0]
    assert sorted(_index_requests(rec)) == [("index-000000.idxpack", pack.offsets[i], pack.offsets[i + 1])
                                            for i in pool]
    _, rec = _pass(make_plan([shards], 300, 300, batch_size=10))  # the whole pool: the pack whole, once
    assert _index_requests(rec) == [("index-000000.idxpack", None, None)]


def test_a_set_without_packs_reads_each_shards_idx(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "old")
    index = json.loads((copy / "index.json").read_text())
    del index["idx_packs"]  # as written before packs, or by another tool
    (copy / "index.json").write_text(json.dumps(index))
    old, new = load_shard_set(str(copy)), load_shard_set(str(folder))
    assert old.packs == () and old.pack_of(0) is None
    got, rec = _pass(make_plan([old], 300, 300, batch_size=10))
    want, _ = _pass(make_plan([new], 300, 300, batch_size=10))
    assert got == want
    assert sorted(_index_requests(rec)) == sorted((f"set-{i:06d}.idx", None, None) for i in range(8))


def test_a_pack_that_is_not_the_listed_one_is_one_clear_error(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "changed")
    pack = copy / "index-000000.idxpack"
    pack.write_bytes(pack.read_bytes().replace(b"jpg", b"JPG", 1))  # same size, other bytes
    shards = load_shard_set(str(copy))
    with pytest.raises(ValueError, match=r"index-000000.idxpack: not the index pack that index.json lists.*"
                                         r"shard_tools/index.py"):
        ShardReader((shards,)).index(0, 0)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(first=1), "does not hold shards 0-7"),
    (lambda p: p.update(offsets=p["offsets"][:-1]), "does not hold shards 0-7"),
    (lambda p: p.pop("offsets"), "malformed idx_packs"),
    (lambda p: p.update(bytes=1), "does not hold shards 0-7"),
])
def test_a_malformed_pack_list_names_the_field(folder, tmp_path, change, message):
    copy = shutil.copytree(folder, tmp_path / "bad")
    index = json.loads((copy / "index.json").read_text())
    change(index["idx_packs"][0])
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message) as e:
        load_shard_set(str(copy))
    assert "index.json: malformed idx_packs" in str(e.value)
