"""Index packs as written: every packing path publishes them before index.json, they hold the shards' `.idx`
texts byte for byte, one pack per IDX_PACK_SHARDS shards, and a smaller rewrite removes the packs it no longer
lists."""

from __future__ import annotations

import hashlib
import json

from shard_tools import shardset, writer
from shard_tools.index import index_folder
from shard_tools.shardset import idx_name, load_shard_set
from shard_tools.writer import ShardWriter


def _write(out, samples: int, per_shard: int) -> dict:
    w = ShardWriter(out, "p", per_shard)
    for i in range(samples):
        w.add(f"{i:06d}", {"jpg": b"\xff\xd8" + bytes([i % 256]) * (100 + i), "cls": b"1"})
    return w.finish(source="test")


def test_packs_hold_each_shards_idx_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "IDX_PACK_SHARDS", 2)
    monkeypatch.setattr(shardset, "IDX_PACK_SHARDS", 2)
    index = _write(tmp_path, 25, 5)  # 5 shards: packs of 2, 2 and 1
    assert [(p["path"], p["first"]) for p in index["idx_packs"]] == [
        ("index-000000.idxpack", 0), ("index-000001.idxpack", 2), ("index-000002.idxpack", 4)]
    assert list(json.loads((tmp_path / "index.json").read_text())) [-1] == "shards"
    s = load_shard_set(str(tmp_path))
    for i, info in enumerate(s.shards):
        k = s.pack_of(i)
        pack = s.packs[k]
        data = (tmp_path / pack.path).read_bytes()
        j = i - pack.first
        assert data[pack.offsets[j]:pack.offsets[j + 1]] == (tmp_path / idx_name(info.path)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == pack.sha256 and len(data) == pack.bytes
    for f in tmp_path.iterdir():  # a rewrite with fewer shards leaves no pack it does not list
        f.unlink()
    _write(tmp_path, 6, 5)
    (tmp_path / "index-000002.idxpack").write_bytes(b"left by an earlier, larger set")
    index = index_folder(str(tmp_path))
    assert [p["path"] for p in index["idx_packs"]] == ["index-000000.idxpack"]
    assert sorted(p.name for p in tmp_path.glob("*.idxpack")) == ["index-000000.idxpack"]


def test_a_folder_of_tars_indexed_gets_its_pack(tmp_path):
    _write(tmp_path, 12, 4)
    for f in [*tmp_path.glob("*.idx"), *tmp_path.glob("*.idxpack"), tmp_path / "index.json"]:
        f.unlink()
    index = index_folder(str(tmp_path))
    assert index["idx_packs"][0]["offsets"][-1] == sum(p.stat().st_size for p in tmp_path.glob("*.idx"))
    assert load_shard_set(str(tmp_path)).packs[0].stop == 3
