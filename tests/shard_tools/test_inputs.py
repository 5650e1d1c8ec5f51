"""`--data` / `data=` inputs users already have: a folder of un-indexed tars, one tar and a brace pattern read the
same samples as the indexed set over the same tars, through a reused cache that never writes next to the tars;
tar patterns at a URL take their shards from the folder's index.json, or say which command writes one."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

import shard_tools.inputs as inputs
from shard_tools.inputs import open_shard_sets, split_locations
from shard_tools.shardset import ShardSet, load_shard_set
from shard_tools.storage import filesystem
from stream_ssl.data.plan import Slice, make_plan
from stream_ssl.data.reader import ShardReader
from stream_ssl.plan import print_keys
from stream_ssl.testing.servers import upload_folder

NAMES = [f"set-{i:06d}.tar" for i in range(4)]


@pytest.fixture(scope="module")
def indexed(make_shard_set) -> Path:
    return make_shard_set(110, shard_size=30, seed=5)  # 4 shards: 30, 30, 30, 20 samples


@pytest.fixture(scope="module")
def plain(indexed, tmp_path_factory) -> Path:
    """The indexed set's tars alone, in a folder with no .idx and no index.json."""
    folder = tmp_path_factory.mktemp("plain")
    for name in NAMES:
        shutil.copy2(indexed / name, folder / name)
    return folder


def copy_tars(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in NAMES:
        shutil.copy2(src / name, dst / name)
    return dst


def samples(shard_set: ShardSet, options: dict | None = None) -> dict[str, list]:
    """Every sample of every shard, by shard file name: [(key, {ext: bytes})] in shard order."""
    reader = ShardReader((shard_set,), options)
    try:
        return {info.path: [(s["__key__"], {k: bytes(v) for k, v in s.items() if not k.startswith("__")})
                            for s in reader.read(Slice(0, i, 0, info.samples))]
                for i, info in enumerate(shard_set.shards)}
    finally:
        reader.close()


@pytest.mark.parametrize("pattern, names", [
    ("", NAMES),
    ("set-000002.tar", NAMES[2:3]),
    ("set-{000001..000003}.tar", NAMES[1:]),
    ("set-{000003,000000}.tar", [NAMES[0], NAMES[3]]),
    ("set-00000[12].tar", NAMES[1:3]),
])
def test_unindexed_tars_read_the_same_samples_as_the_indexed_set(indexed, plain, tmp_path, pattern, names):
    before = sorted(os.listdir(plain))
    [got] = open_shard_sets(str(plain / pattern) if pattern else str(plain), cache_dir=tmp_path)
    assert Path(got.url).parent == tmp_path and got.source == "real"
    assert [s.path for s in got.shards] == names  # natural order, whatever order the pattern names them in
    assert got.num_samples == sum(s.samples for s in got.shards)
    want = {k: v for k, v in samples(load_shard_set(str(indexed))).items() if k in names}
    assert samples(got) == want
    assert sorted(os.listdir(plain)) == before  # nothing written next to the user's tars
    assert all(os.path.islink(os.path.join(got.url, n)) for n in names)


def test_the_cache_is_reused_and_a_changed_tar_gets_a_new_entry(plain, tmp_path, monkeypatch):
    tars = copy_tars(plain, tmp_path / "tars")
    scanned = []
    real = inputs.index_shard
    monkeypatch.setattr(inputs, "index_shard", lambda output, tar, **kw: scanned.append(tar) or real(output, tar, **kw))
    first = open_shard_sets(str(tars), cache_dir=tmp_path / "cache")[0]
    stamp = os.stat(Path(first.url) / "index.json").st_mtime_ns
    assert len(scanned) == 4 and first.name == "tars"
    again = open_shard_sets(str(tars), cache_dir=tmp_path / "cache")[0]
    assert again.url == first.url and len(scanned) == 4  # no scan
    assert os.stat(Path(first.url) / "index.json").st_mtime_ns == stamp

    shutil.copyfile(tars / NAMES[0], tars / NAMES[1])  # shard 1 now holds shard 0's samples
    changed = open_shard_sets(str(tars), cache_dir=tmp_path / "cache")[0]
    assert changed.url != first.url and len(scanned) == 8
    read = samples(changed)
    assert read[NAMES[1]] == read[NAMES[0]] and read[NAMES[1]] != samples(first)[NAMES[1]]
    assert [s.samples for s in changed.shards] == [30, 30, 30, 20]
    st = os.stat(tars / NAMES[2])
    os.utime(tars / NAMES[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    touched = open_shard_sets(str(tars), cache_dir=tmp_path / "cache")[0]
    assert touched.url not in (first.url, changed.url) and len(scanned) == 12
    assert sorted(os.listdir(tars)) == NAMES


def test_a_concurrent_builder_that_publishes_first_wins(plain, tmp_path, monkeypatch):
    real, calls = inputs.build_set, []

    def racing(folder, tars, name):  # another process publishes the same entry while this one builds
        calls.append(folder)
        if len(calls) == 1:
            inputs.cached_set(tars, name, tmp_path)
        return real(folder, tars, name)

    monkeypatch.setattr(inputs, "build_set", racing)
    [got] = open_shard_sets(str(plain), cache_dir=tmp_path)
    assert len(calls) == 2 and not any(Path(c).exists() for c in calls)  # both temporary folders are gone
    assert os.listdir(tmp_path) == [Path(got.url).name] and got.num_samples == 110


def test_the_default_cache_is_under_xdg_cache_home(plain, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    [got] = open_shard_sets(str(plain / "set-{000000..000001}.tar"))
    assert Path(got.url).parent == tmp_path / "stream-ssl" / "indexes" and got.name == "set"


def test_tars_of_an_indexed_folder_come_from_its_index(indexed, tmp_path):
    full = load_shard_set(str(indexed))
    [whole] = open_shard_sets(str(indexed), cache_dir=tmp_path)
    [part] = open_shard_sets(str(indexed / "set-{000001..000002}.tar"), cache_dir=tmp_path)
    assert whole == full and not os.listdir(tmp_path)
    assert (part.url, part.name, part.labels) == (full.url, full.name, full.labels)
    assert part.shards == full.shards[1:3] and part.num_samples == 60 == part.meta["num_samples"]


def test_comma_separated_locations_keep_brace_commas(indexed, plain, tmp_path):
    assert split_locations(f"{indexed}, {plain}/set-{{000000,000002}}.tar,") == [
        str(indexed), f"{plain}/set-{{000000,000002}}.tar"]
    a, b = open_shard_sets(f"{indexed},{plain}/set-{{000000,000002}}.tar", cache_dir=tmp_path)
    assert a.num_samples == 110 and [s.path for s in b.shards] == [NAMES[0], NAMES[2]]
    assert open_shard_sets([indexed, str(plain)], cache_dir=tmp_path)[1].num_samples == 110


@pytest.mark.parametrize("location, error, names", [
    ("missing", FileNotFoundError, "missing: no such file or folder"),
    ("set-*.tgz", FileNotFoundError, "set-*.tgz: no file matches"),
    ("set-{000003..000004}.tar", FileNotFoundError, "set-000004.tar: no such file (from"),
    ("empty", FileNotFoundError, "empty: not a shard set (no index.json) and no .tar files in it"),
    ("notes.txt", ValueError, "notes.txt: not a .tar file"),
])
def test_inputs_that_name_no_tars_fail_in_one_line(plain, tmp_path, location, error, names):
    folder = copy_tars(plain, tmp_path / "tars")
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(error) as e:
        open_shard_sets(str(folder / location), cache_dir=tmp_path / "cache")
    assert names in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_a_bad_tar_is_named_and_nothing_is_cached(plain, tmp_path):
    folder = copy_tars(plain, tmp_path / "tars")
    with open(folder / NAMES[1], "r+b") as f:
        f.truncate(5000)
    with pytest.raises(ValueError, match="truncated|not a readable tar") as e:
        open_shard_sets(str(folder), cache_dir=tmp_path / "cache")
    assert str(e.value).startswith(str(folder / NAMES[1])) and "\n" not in str(e.value)
    assert os.listdir(tmp_path / "cache") == []


def test_a_plan_over_unindexed_tars_reads_the_indexed_sets_keys(indexed, plain, tmp_path):
    kw = dict(unique_samples=90, budget_samples=250, world_size=2, batch_size=8, seed=3)
    ours = make_plan(open_shard_sets(str(plain), cache_dir=tmp_path), **kw)
    theirs = make_plan([load_shard_set(str(indexed))], **kw)
    assert (ours.steps, ours.per_source) == (theirs.steps, theirs.per_source)
    for rank in range(2):
        a, b = io.StringIO(), io.StringIO()
        assert print_keys(ours, rank, out=a) == print_keys(theirs, rank, out=b) > 0
        assert a.getvalue() == b.getvalue()


# ------------------------------------------------------------------------------------------------------------
# URLs (moto S3 on loopback).

BUCKET = "inputs"


@pytest.fixture(scope="module")
def s3(moto, indexed, plain):
    fs = filesystem("s3://x", moto.options())
    fs.call_s3("create_bucket", Bucket=BUCKET)
    upload_folder(fs, indexed, f"s3://{BUCKET}/pool")
    upload_folder(fs, plain, f"s3://{BUCKET}/plain")
    return moto.options()


@pytest.mark.s3
@pytest.mark.parametrize("pattern, names", [
    ("set-{000001..000002}.tar", NAMES[1:3]),
    ("set-000003.tar", NAMES[3:]),
    ("set-*.tar", NAMES),
])
def test_a_url_tar_pattern_is_the_subset_of_the_folders_index(s3, indexed, pattern, names):
    [got] = open_shard_sets(f"s3://{BUCKET}/pool/{pattern}", storage_options=s3)
    assert got.url == f"s3://{BUCKET}/pool" and [s.path for s in got.shards] == names
    assert got.num_samples == sum(s.samples for s in got.shards)
    want = {k: v for k, v in samples(load_shard_set(str(indexed))).items() if k in names}
    assert samples(got, s3) == want


@pytest.mark.s3
@pytest.mark.parametrize("location, message", [
    ("plain/set-{000000..000001}.tar",
     f"s3://{BUCKET}/plain/set-{{000000..000001}}.tar: no index for these tars; write one with "
     f"`shard-tools index s3://{BUCKET}/plain`"),
    ("plain", f"s3://{BUCKET}/plain: not a shard set (no index.json)"),
    ("pool/set-{000003..000004}.tar", f"s3://{BUCKET}/pool/set-000004.tar: not listed in "
                                      f"s3://{BUCKET}/pool/index.json; write one with `shard-tools index"),
])
def test_a_url_without_an_index_names_the_command_that_writes_it(s3, location, message):
    with pytest.raises(FileNotFoundError) as e:
        open_shard_sets(f"s3://{BUCKET}/{location}", storage_options=s3)
    assert message in str(e.value) and "`shard-tools index s3://" in str(e.value) and "\n" not in str(e.value)
