"""Pack round trip: every manifest row lands in exactly one shard, bytes and labels intact, order shuffled."""

from __future__ import annotations

import csv
import json
import subprocess

import webdataset as wds

from shard_tools.pack import pack
from shard_tools.shardset import load_shard_set
from shard_tools.synth import synthesize
from tests.helpers import PYTHON, REPO


def _rows(manifest):
    with open(manifest) as f:
        return list(csv.DictReader(f))


def test_round_trip_with_plain_webdataset(tmp_path):
    manifest = synthesize(tmp_path / "img", 230, classes=7, size=32, seed=3)
    out = tmp_path / "shards"
    result = pack(manifest, out, name="demo", shard_size=50, seed=1)
    assert result.packed == 230 and not result.errors
    index = load_shard_set(str(out))
    assert [s.samples for s in index.shards] == [50, 50, 50, 50, 30]

    urls = [str(out / s.path) for s in index.shards]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert meta["path"] not in seen, "a manifest row was packed twice"
        seen[meta["path"]] = sample
    rows = _rows(manifest)
    assert set(seen) == {r["path"] for r in rows}
    for r in rows:
        sample = seen[r["path"]]
        assert sample["jpg"] == (manifest.parent / r["path"]).read_bytes()  # original bytes, untouched
        assert int(sample["cls"]) == int(r["label"]) == json.loads(sample["json"])["label"]


def test_packing_shuffles_so_a_prefix_is_not_the_first_rows(tmp_path):
    manifest = synthesize(tmp_path / "img", 200, classes=10, size=16, seed=0)
    out = tmp_path / "shards"
    pack(manifest, out, shard_size=40, seed=0)
    first = load_shard_set(str(out)).shards[0]
    paths = [json.loads(s["json"])["path"] for s in wds.WebDataset(str(out / first.path), shardshuffle=False,
                                                                   empty_check=False)]
    manifest_order = [r["path"] for r in _rows(manifest)]
    assert paths != manifest_order[:40]
    # The first shard draws from the whole manifest, not from its beginning.
    positions = sorted(manifest_order.index(p) for p in paths)
    assert positions[-1] > 100
    # The same seed gives the same order; another seed another order.
    again = tmp_path / "again"
    pack(manifest, again, name=out.name, shard_size=40, seed=0)
    assert (again / first.path).read_bytes() == (out / first.path).read_bytes()
    other = tmp_path / "other"
    pack(manifest, other, name=out.name, shard_size=40, seed=1)
    assert (other / first.path).read_bytes() != (out / first.path).read_bytes()


def test_bad_rows_are_skipped_and_listed(tmp_path):
    manifest = synthesize(tmp_path / "img", 60, size=16)
    rows = _rows(manifest)
    (manifest.parent / rows[5]["path"]).write_bytes(b"")  # zero-byte
    (manifest.parent / rows[9]["path"]).write_bytes(b"not an image at all")
    (manifest.parent / rows[11]["path"]).unlink()  # missing
    out = tmp_path / "shards"
    result = pack(manifest, out, shard_size=25, max_error_rate=0.1)
    assert result.packed == 57
    errors = _rows(out / "shards-errors.csv")
    assert sorted(int(e["row"]) for e in errors) == [7, 11, 13]  # 1-based file lines, after the header
    assert {e["path"] for e in errors} == {rows[i]["path"] for i in (5, 9, 11)}
    assert load_shard_set(str(out)).num_samples == 57


def test_cli_rejects_unknown_column_naming_the_columns(tmp_path):
    manifest = synthesize(tmp_path / "img", 5, size=16)
    proc = subprocess.run([PYTHON, str(REPO / "shard_tools/pack.py"), str(manifest), "--out", str(tmp_path / "o"),
                           "--path-column", "nope"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "path" in proc.stderr and "label" in proc.stderr
    assert not (tmp_path / "o" / "index.json").exists()
