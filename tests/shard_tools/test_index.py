"""shard_tools/index.py: existing WebDataset tars become a shard set without repacking."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pytest

from shard_tools.index import IndexingError, index_folder
from shard_tools.shardset import load_shard_set, parse_idx
from stream_ssl.data.plan import Slice
from stream_ssl.data.reader import ShardReader
from tests.helpers.packing import img2dataset_shard, run_tool, tree, write_tar

LONG = "a-rather-long-folder-name-that-does-not-fit-in-a-classic-tar-header/" * 2


@pytest.fixture
def laion(tmp_path):
    """Three img2dataset-style shards: gaps in the keys (failed downloads), directory entries, long names
    written with GNU and PAX extensions, and one shard without a stats file."""
    folder = tmp_path / "laion"
    written = [
        img2dataset_shard(folder, "00000", ["000000000", "000000002", "000000003", "000000007"], seed=1),
        img2dataset_shard(folder, "00001", [f"{LONG}00001000{i}" for i in range(3)], seed=2, fmt=tarfile.PAX_FORMAT,
                          stats=False),
        img2dataset_shard(folder, "00002", [f"{LONG}00002000{i}" for i in range(2)], seed=3, fmt=tarfile.GNU_FORMAT),
    ]
    (folder / "00000.parquet").write_bytes(b"PAR1 not read")
    return folder, written


def test_index_cli_makes_a_readable_shard_set_without_touching_tars(laion):
    folder, written = laion
    before = {k: v for k, v in tree(folder).items() if k.endswith(".tar")}
    proc = run_tool("index.py", folder, "--name", "laion", "--source", "crawled")
    assert proc.returncode == 0, proc.stderr
    assert "indexed 9 samples in 3 shards" in proc.stdout and "3 scanned" in proc.stdout
    after = tree(folder)
    assert {k: v for k, v in after.items() if k.endswith(".tar")} == before
    index = json.loads(after["index.json"])
    assert index["name"] == "laion" and index["source"] == "crawled" and index["fields"] == ["jpg", "json", "txt"]
    assert [(s["path"], s["samples"]) for s in index["shards"]] == [("00000.tar", 4), ("00001.tar", 3),
                                                                     ("00002.tar", 2)]
    for s in index["shards"]:
        assert s["sha256"] == hashlib.sha256(before[s["path"]]).hexdigest() and s["bytes"] == len(before[s["path"]])
    shard_set = load_shard_set(str(folder))
    reader = ShardReader((shard_set,))
    for i, samples in enumerate(written):
        got = reader.read(Slice(0, i, 0, len(samples)))
        assert [(g["__key__"], g["jpg"], g["txt"], g["json"]) for g in got] == [
            (k, f["jpg"], f["txt"], f["json"]) for k, f in samples]
        tail = reader.read(Slice(0, i, 1, len(samples)))  # a byte range starting mid-shard
        assert [g["__key__"] for g in tail] == [k for k, _ in samples[1:]]
    # Indexing again reuses the .idx of shards that have stats (their count matches the successes).
    index = index_folder(str(folder))
    assert index["indexed"]["reused_idx"] == 2 and index["indexed"]["scanned"] == 1
    again = tree(folder)
    assert json.loads(again.pop("index.json"))["shards"] == json.loads(after.pop("index.json"))["shards"]
    assert again == after


def test_stats_disagreeing_with_tar_marks_the_shard_bad(laion, capsys):
    folder, _ = laion
    (folder / "00002_stats.json").write_text(json.dumps({"successes": 5}))
    proc = run_tool("index.py", folder)
    assert proc.returncode == 1
    assert "BAD" in proc.stderr and "00002_stats.json says 5 successes, the tar holds 2 samples" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 shards is bad")  # one shard: "is"
    assert not (folder / "index.json").exists()
    index = index_folder(str(folder), skip_bad=True)
    assert [s["path"] for s in index["shards"]] == ["00000.tar", "00001.tar"]
    assert index["indexed"]["left_out"] == ["00002.tar"]


def test_truncated_and_empty_tars(tmp_path, capsys):
    folder = tmp_path / "set"
    img2dataset_shard(folder, "a", ["k0", "k1", "k2"], stats=False)
    data = (folder / "a.tar").read_bytes()
    (folder / "b.tar").write_bytes(data[: len(data) // 2])
    write_tar(folder / "c.tar", [])
    with pytest.raises(IndexingError, match="1 of 3 shards is bad"):
        index_folder(str(folder))
    err = capsys.readouterr().err
    assert "BAD" in err and "b.tar" in err and "truncated" in err
    assert "c.tar holds no samples; left out" in err
    index = index_folder(str(folder), skip_bad=True, checksum=False)
    assert [s["path"] for s in index["shards"]] == ["a.tar"] and index["shards"][0]["sha256"] == ""
    assert len(parse_idx((folder / "a.idx").read_text())) == 3
    with pytest.raises(IndexingError, match="no .tar files"):
        index_folder(str(tmp_path))
    with pytest.raises(IndexingError, match="no such folder"):
        index_folder(str(tmp_path / "nope"))


def test_a_stale_idx_with_the_right_count_is_not_trusted(laion):
    """img2dataset re-run: same number of successes, different bytes. The old .idx must not be reused."""
    folder, _ = laion
    index_folder(str(folder))
    stale = (folder / "00000.idx").read_text()
    rewritten = img2dataset_shard(folder, "00000", ["000000010", "000000011", "000000012", "000000013"], seed=9)
    assert (folder / "00000.idx").read_text() == stale  # still the old one, with the same sample count
    index = index_folder(str(folder))
    assert index["indexed"]["scanned"] == 2 and index["indexed"]["reused_idx"] == 1
    got = ShardReader((load_shard_set(str(folder)),)).read(Slice(0, 0, 0, 4))
    assert [(g["__key__"], g["jpg"]) for g in got] == [(k, f["jpg"]) for k, f in rewritten]


def test_counts_of_one_are_singular(tmp_path):
    img2dataset_shard(tmp_path / "one", "00000", ["k0"])
    proc = run_tool("index.py", tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("indexed 1 sample in 1 shard at ")
