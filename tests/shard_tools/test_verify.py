"""shard_tools/verify.py: a sound set passes; every kind of damage is found and the bad shard named."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from shard_tools.pack import pack
from shard_tools.verify import verify
from shard_tools.writer import ShardWriter
from tests.helpers.packing import jpeg_bytes, run_tool, write_csv, write_images


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    rels = write_images(root / "img", 12)
    manifest = write_csv(root / "img" / "m.csv", ["path", "label"], [[r, i % 3] for i, r in enumerate(rels)])
    pack(manifest, root / "set", name="set", shard_size=4)
    return root / "set"


@pytest.fixture
def shard_set(packed, tmp_path):
    return shutil.copytree(packed, tmp_path / "set")


def report(folder, decode=False) -> tuple[bool, str]:
    out = io.StringIO()
    ok = verify(str(folder), decode=decode, out=out)
    return ok, out.getvalue()


def bad_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("BAD ")]


def test_cli_passes_a_sound_set_and_names_a_truncated_shard(shard_set):
    proc = run_tool("verify.py", shard_set, "--decode")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified 3 shards, 12 samples" in proc.stdout and "all good" in proc.stdout
    data = (shard_set / "set-000001.tar").read_bytes()
    (shard_set / "set-000001.tar").write_bytes(data[:3000])
    proc = run_tool("verify.py", shard_set)
    assert proc.returncode == 1
    lines = bad_lines(proc.stdout)
    assert len(lines) == 1 and lines[0].startswith("BAD set-000001.tar: size 3000 bytes, index.json says")
    assert "truncated" in lines[0] and "1 bad" in proc.stdout


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("flip", "sha256"),
        ("idx_offset", ".idx disagrees with the tar's members from sample 1"),
        ("idx_missing", "no set-000002.idx"),
        ("idx_count", ".idx holds 3 samples, index.json says 4"),
        ("tar_missing", "missing"),
        ("garbage", "not a readable tar archive"),
    ],
)
def test_damage_is_found(shard_set, damage, expected):
    tar, idx = shard_set / "set-000002.tar", shard_set / "set-000002.idx"
    if damage == "flip":
        data = bytearray(tar.read_bytes())
        data[1500] ^= 0x01
        tar.write_bytes(bytes(data))
    elif damage == "idx_offset":
        lines = idx.read_text().splitlines()
        parts = lines[2].split()
        parts[1] = str(int(parts[1]) + 512)
        lines[2] = " ".join(parts)
        idx.write_text("\n".join(lines) + "\n")
    elif damage == "idx_missing":
        idx.unlink()
    elif damage == "idx_count":
        lines = idx.read_text().splitlines()
        idx.write_text("\n".join(["v1.2 3", *lines[1:4]]) + "\n")
    elif damage == "tar_missing":
        tar.unlink()
    elif damage == "garbage":
        tar.write_bytes(b"\x01" * tar.stat().st_size)
    ok, text = report(shard_set)
    assert not ok
    lines = bad_lines(text)
    assert lines[0].startswith("BAD set-000002.tar: ") and expected in lines[0], text
    # a .idx changed after index.json: the index pack (written with the old one) no longer agrees with it
    pack = ["BAD index-000000.idxpack: holds another .idx than the file of 1 shard (e.g. set-000002.tar); "
            "rewrite the index with shard_tools/index.py"]
    assert lines[1:] == (pack if damage.startswith("idx") else []), text


@pytest.mark.parametrize("damage, expected", [
    ("missing", "missing (index.json lists it in idx_packs)"),
    ("changed", "size 0 bytes or its sha256 differ from index.json's"),
])
def test_a_damaged_index_pack_is_found(shard_set, damage, expected):
    pack = shard_set / "index-000000.idxpack"
    pack.unlink() if damage == "missing" else pack.write_bytes(b"")
    ok, text = report(shard_set)
    listed = "" if damage == "missing" else f" ({_listed_bytes(shard_set)} bytes)"
    assert not ok and bad_lines(text) == [f"BAD index-000000.idxpack: {expected}{listed}"]


def _listed_bytes(folder) -> int:
    return json.loads((folder / "index.json").read_text())["idx_packs"][0]["bytes"]


def test_decode_finds_undecodable_images_and_keys_must_be_unique(tmp_path):
    w = ShardWriter(tmp_path / "s", "s", shard_size=2)
    good = jpeg_bytes(seed=1)
    w.add("000000000", {"jpg": good, "json": b"{}"})
    w.add("000000001", {"jpg": good[:200] + b"\0" * 300 + b"\xff\xd9", "json": b"{}", "cls": b"x"})
    w.add("000000001", {"jpg": good, "json": b"{not json"})
    w.finish(source="real")
    ok, text = report(tmp_path / "s")  # structure and checksums are fine...
    lines = bad_lines(text)
    assert [line.split(":")[0] for line in lines] == ["BAD s-000001.tar"] and "also in s-000000.tar" in lines[0]
    ok, text = report(tmp_path / "s", decode=True)  # ...the content is not
    first, second = bad_lines(text)
    assert first.startswith("BAD s-000000.tar: 000000001.jpg: corrupt image") and "000000001.cls: label" in first
    assert "000000001.json: invalid json" in second


def test_not_a_shard_set(tmp_path):
    ok, text = report(tmp_path)
    assert not ok and "not a shard set (no index.json)" in text
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    ok, text = report(tmp_path)
    assert not ok and "field 'format'" in text


def test_counts_of_one_are_singular(tmp_path):
    w = ShardWriter(tmp_path / "s", "s")
    w.add("000000000", {"jpg": jpeg_bytes(seed=1), "json": b"{}"})
    w.finish(source="real")
    ok, text = report(tmp_path / "s")
    assert ok and "verified 1 shard, 1 sample, " in text
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["shards"][0]["samples"] = index["num_samples"] = 2
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    ok, text = report(tmp_path / "s")
    assert not ok and ".idx holds 1 sample, index.json says 2" in text
