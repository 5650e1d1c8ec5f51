"""The reader's tar header check, vectorized over a range: it flags exactly the samples that the check member by
member flags (name and size against the `.idx`), catches a shard replaced under its index, and lets valid
headers written another way (GNU long names, pax, a ustar prefix, non-ASCII names) through."""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pytest

from shard_tools.inputs import open_shard_sets
from shard_tools.shardset import TAR_BLOCK, load_shard_set
from stream_ssl.data.plan import make_plan
from stream_ssl.data.readahead import ReadAhead
from stream_ssl.data.reader import ShardIndex, ShardReader, _header_mismatch


@pytest.fixture(scope="module")
def folder(make_shard_set):
    return make_shard_set(120, shard_size=40)


def per_member(reader: ShardReader, data, shard: int, first: int, stop: int) -> dict[int, str]:
    """The check as it was, member by member: the exact name and size bytes, else the parsed header."""
    idx = reader.index(0, shard)
    base = int(idx.bounds[first])
    out = {}
    for i in range(first, stop):
        for _, offset, size, name in idx.members[i]:
            a = offset - base
            header = data[a - TAR_BLOCK: a] if a >= TAR_BLOCK else b""
            if header[124:136] == b"%011o\0" % size and header[: len(name.encode()[:100])] == name.encode()[:100]:
                continue
            why = _header_mismatch(header, name, size)
            if why:
                out[i] = f"{reader.sets[0].shard_url(shard)} sample {i}: {why}"
                break
    return out


def test_every_range_of_a_valid_shard_passes_and_splits_as_the_idx_says(folder):
    reader = ShardReader((load_shard_set(str(folder)),))
    data = reader.read_range(0, 0, 0, 40)
    for first, stop in [(0, 40), (0, 1), (39, 40), (7, 23), (5, 5)]:
        assert reader.mismatches(data[int(reader.index(0, 0).bounds[first]):], 0, 0, first, stop) == {}
    samples = reader.split(data, 0, 0, 0, 40)
    idx = reader.index(0, 0)
    for i, s in enumerate(samples):
        assert list(s)[:5] == ["__key__", "__url__", "__source__", "__shard__", "__index__"]
        assert [k for k in s if not k.startswith("__")] == [m[0] for m in idx.members[i]]
        for ext, offset, size, _ in idx.members[i]:
            assert bytes(s[ext]) == bytes(data[offset: offset + size])
    assert isinstance(samples[0]["jpg"], memoryview) and isinstance(samples[0]["cls"], bytes)


def test_an_index_out_of_order_or_past_the_bytes_is_checked_member_by_member(folder):
    reader = ShardReader((load_shard_set(str(folder)),))
    data = reader.read_range(0, 0, 0, 40)
    idx = reader.index(0, 0)
    swapped = ShardIndex.of([idx.members[1], idx.members[0]] + idx.members[2:])  # headers not in member order
    assert idx.ascending and not swapped.ascending and len(swapped.suspects(data, 0, 40, 0)) == 0
    short = data[: int(idx.bounds[39]) + 100]  # the last sample's headers cut
    assert list(idx.suspects(short, 0, 40, 0)) == list(range(int(idx.first[40])))
    found = reader.mismatches(short, 0, 0, 0, 40)
    assert list(found) == [39] and "missing header" in found[39]


def test_random_header_damage_is_flagged_as_member_by_member(folder):
    """Bytes of the name and size fields (and elsewhere in headers) changed at random: the vectorized check
    flags the same samples, with the same reason, as the member-by-member check."""
    reader = ShardReader((load_shard_set(str(folder)),))
    idx = reader.index(0, 1)
    clean = bytes(reader.read_range(0, 1, 0, 40))
    base = int(idx.bounds[0])
    rng = np.random.default_rng(0)
    heads = [o - TAR_BLOCK - base for ms in idx.members for _, o, _, _ in ms]
    flagged = 0
    for trial in range(200):
        data = bytearray(clean)
        for _ in range(int(rng.integers(1, 4))):
            at = heads[int(rng.integers(len(heads)))] + int(rng.choice([0, 3, 9, 99, 124, 130, 135, 136, 200]))
            data[at] = int(rng.integers(256)) if trial % 3 else ord(" ") if data[at] == 0 else 0
        data = memoryview(bytes(data))
        first = int(rng.integers(0, 39))
        stop = int(rng.integers(first + 1, 41))
        sub = data[int(idx.bounds[first]) - base:]
        got = reader.mismatches(sub, 0, 1, first, stop)
        assert got == per_member(reader, sub, 1, first, stop)
        flagged += len(got)
        split = reader.split(sub, 0, 1, first, stop)
        assert [s["__index__"] for s in split if "__error__" in s] == sorted(got)
    assert flagged > 50


def test_a_shard_replaced_under_its_index_is_caught(folder, make_shard_set, tmp_path):
    """Another shard's bytes under this shard's name and .idx (one of the same set, one of another set): every
    sample read comes back with an __error__, counted, however the range is read."""
    other = load_shard_set(str(make_shard_set(120, shard_size=40, seed=5)))
    out = tmp_path / "swapped"
    shutil.copytree(folder, out)
    sset = load_shard_set(str(out))
    shutil.copyfile(out / sset.shards[1].path, out / sset.shards[0].path)
    shutil.copyfile(other.shard_url(2), out / sset.shards[2].path)
    for shard in (0, 2):
        reader = ShardReader((sset,))
        n = sset.shards[shard].samples
        data = reader.read_range(0, shard, 0, n)
        samples = reader.split(data, 0, shard, 0, n)
        bad = [s for s in samples if "__error__" in s]
        assert len(bad) == n and reader.stats.corrupt == n, shard
        assert all(set(s) == {"__key__", "__url__", "__source__", "__shard__", "__index__", "__error__"} for s in bad)
    plan = make_plan([sset], 120, 120, batch_size=8, shuffle_block=0)
    reader = ShardReader(plan.sets)
    got = [s for _, samples in ReadAhead(reader, plan, 0, range(plan.steps)) for s in samples]
    errors = {s["__shard__"] for s in got if "__error__" in s}
    assert errors == {0, 2} and reader.stats.corrupt == sum(s["__shard__"] in (0, 2) for s in got)


def test_headers_written_another_way_pass(tmp_path):
    """GNU long names, pax headers, a ustar prefix and non-ASCII names differ from the expected bytes, but are
    valid: the parsed header decides, and every sample comes back whole. (A non-ASCII name in pax format is left
    out: its ustar header holds '?' for each such character, and the check, as before, flags it.)"""
    truth = {}
    for fmt, stem in [(tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax"), (tarfile.USTAR_FORMAT, "ustar")]:
        accented = fmt != tarfile.PAX_FORMAT
        path = tmp_path / "tars" / f"{stem}.tar"
        path.parent.mkdir(exist_ok=True)
        with tarfile.open(path, "w", format=fmt) as tar:
            for i in range(6):
                folder = "d" * 100 + "/" if i % 2 and fmt == tarfile.USTAR_FORMAT else ""  # in the prefix field
                accent = "é" if i == 3 and accented else ""
                long = 120 if i == 4 and fmt != tarfile.USTAR_FORMAT else 3  # a GNU long name, a pax path
                key = f"{folder}{accent}{'k' * long}{i}"
                for ext, body in (("jpg", bytes([i]) * (700 + i)), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
                    truth[(stem, f"{key}.{ext}")] = body
    sets = open_shard_sets([str(tmp_path / "tars" / f"{stem}.tar") for stem in ("gnu", "pax", "ustar")],
                           cache_dir=tmp_path / "indexes")
    assert len(sets) == 3
    parsed = 0  # headers not as expected byte for byte, parsed, and passed
    for sset in sets:
        reader = ShardReader((sset,))
        for shard, info in enumerate(sset.shards):
            data = reader.read_range(0, shard, 0, info.samples)
            stem = sset.shard_url(shard).rsplit("/", 1)[-1][:-4]
            parsed += len(reader.index(0, shard).suspects(data, 0, info.samples, 0))
            samples = reader.split(data, 0, shard, 0, info.samples)
            assert len(samples) == 6 and reader.stats.corrupt == 0
            for s in samples:
                assert bytes(s["jpg"]) == truth[(stem, s["__key__"] + ".jpg")]
                assert s["cls"] == truth[(stem, s["__key__"] + ".cls")]
    assert parsed >= 3
