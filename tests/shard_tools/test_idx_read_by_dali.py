"""The `.idx` files we write are DALI's: a CPU-only DALI webdataset reader reads every sample, bytes equal."""

from __future__ import annotations

import json
import tarfile

import pytest

from shard_tools.index import index_folder
from shard_tools.pack import pack
from tests.helpers.packing import img2dataset_shard, png_bytes, shard_samples, write_csv, write_images

dali = pytest.importorskip("nvidia.dali")
fn = pytest.importorskip("nvidia.dali.fn")


def dali_read(tars: list[str], exts: list[str], count: int) -> list[list[bytes]]:
    """All `count` samples of `tars`, in order, through fn.readers.webdataset with our index files."""

    @dali.pipeline_def(batch_size=count, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=exts,
                                           missing_component_behavior="error", name="reader"))

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == count
    outputs = p.run()
    return [[bytes(memoryview(out.at(i))) for out in outputs] for i in range(count)]


def test_dali_reads_every_packed_sample(tmp_path):
    rels = write_images(tmp_path, 17)
    for i in range(6):
        (tmp_path / f"p{i}.png").write_bytes(png_bytes(12, 10, seed=i))
        rels.append(f"p{i}.png")
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], [[r, i % 5] for i, r in enumerate(rels)])
    r = pack(manifest, tmp_path / "out", name="set", shard_size=7)
    assert r.shards == 4
    tars = [str(tmp_path / "out" / s["path"]) for s in r.index["shards"]]
    got = dali_read(tars, ["jpg;png", "cls", "json"], 23)
    expected = [[s.get("jpg", s.get("png")), s["cls"], s["json"]] for s in shard_samples(tmp_path / "out")]
    assert got == expected
    assert sorted(json.loads(j)["path"] for _, _, j in got) == sorted(rels)


def test_dali_reads_indexed_foreign_tars(tmp_path):
    long = "a-folder-name-long-enough-to-need-a-tar-extension-header/" * 3
    written = img2dataset_shard(tmp_path, "00000", ["000000001", "000000004"], seed=1)
    written += img2dataset_shard(tmp_path, "00001", [f"{long}0000100{i}" for i in range(3)], seed=2,
                                 fmt=tarfile.PAX_FORMAT)
    index_folder(str(tmp_path))
    got = dali_read([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], ["jpg", "txt", "json"], 5)
    assert got == [[f["jpg"], f["txt"], f["json"]] for _, f in written]
