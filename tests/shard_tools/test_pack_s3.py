"""Packing to, indexing and verifying on s3:// (a moto server on 127.0.0.1), resume included."""

from __future__ import annotations

import io
import json
import signal
import tarfile

import pytest

from shard_tools.index import index_folder
from shard_tools.pack import KILL_ENV, Part, merge, pack
from shard_tools.shardset import load_shard_set
from shard_tools.verify import verify
from tests.helpers.packing import moto_server, run_tool, shard_samples, tree, write_csv, write_images

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3():
    s3fs = pytest.importorskip("s3fs")
    with moto_server() as endpoint:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bucket")
        yield fs


@pytest.fixture
def manifest(tmp_path):
    rels = write_images(tmp_path / "img", 14)
    return write_csv(tmp_path / "img" / "m.csv", ["path", "label"],
                     [[r, i % 2] for i, r in enumerate(rels)] + [["gone.jpg", 0]])


def test_pack_to_s3_matches_local_and_verifies(tmp_path, s3, manifest):
    local = tmp_path / "local"
    pack(manifest, local, name="pool", shard_size=4, max_error_rate=0.1)
    url = "s3://bucket/sets/pool"
    r = pack(manifest, url, name="pool", shard_size=4, max_error_rate=0.1, tmp_dir=tmp_path)
    assert r.packed == 14 and r.shards == 4
    s3.invalidate_cache()
    remote = {p.rsplit("/", 1)[-1]: s3.cat_file(p) for p in s3.find("bucket/sets/pool", withdirs=False)}
    assert remote == tree(local)  # same bytes; no state or temporary objects left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("shard-stage-")] == []
    out = io.StringIO()
    assert verify(url, decode=True, out=out), out.getvalue()
    shard_set = load_shard_set(url)
    assert shard_set.num_samples == 14 and shard_set.shard_url(0) == f"{url}/pool-000000.tar"
    # The trainer's reader streams a byte range of an s3 shard located by its .idx.
    from stream_ssl.data.plan import Slice
    from stream_ssl.data.reader import ShardReader

    samples = ShardReader((shard_set,)).read(Slice(0, 1, 1, 3))
    assert [s["__key__"] for s in samples] == ["000000005", "000000006"]
    # A damaged object is named by verify.
    s3.pipe_file("bucket/sets/pool/pool-000002.tar", remote["pool-000002.tar"][:-1024])
    out = io.StringIO()
    assert not verify(url, out=out)
    assert "BAD pool-000002.tar: size" in out.getvalue() and "pool-000001" not in out.getvalue()


def test_killed_s3_pack_resumes(tmp_path, s3, manifest):
    url = "s3://bucket/resume/set"
    args = [manifest, "--out", url, "--name", "set", "--shard-size", "3", "--max-error-rate", "0.1",
            "--tmp-dir", tmp_path]
    killed = run_tool("pack.py", *args, env={KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    s3.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.find("bucket/resume/set"))
    assert "index.json" not in names and "set-000001.tar" in names and "set-000002.tar" not in names
    done = run_tool("pack.py", *args)
    assert done.returncode == 0, done.stderr
    assert "resumed after 2 complete shards" in done.stdout
    pack(manifest, tmp_path / "clean", name="set", shard_size=3, max_error_rate=0.1)
    s3.invalidate_cache()
    remote = {p.rsplit("/", 1)[-1]: s3.cat_file(p) for p in s3.find("bucket/resume/set")}
    assert remote == tree(tmp_path / "clean")


def test_parts_on_s3_merge_to_one_runs_bytes(tmp_path, s3, manifest):
    """Object stores have no locks and no renames: the parts and the merge still leave one run's objects."""
    pack(manifest, tmp_path / "clean", name="set", shard_size=4, max_error_rate=0.1)
    url = "s3://bucket/parts/set"
    for k in (2, 1):
        pack(manifest, url, name="set", shard_size=4, max_error_rate=0.1, part=Part(k, 2), tmp_dir=tmp_path)
    assert merge(url).merged == 2
    s3.invalidate_cache()
    remote = {p.rsplit("/", 1)[-1]: s3.cat_file(p) for p in s3.find("bucket/parts/set")}
    assert remote == tree(tmp_path / "clean")


def test_index_existing_tars_on_s3(tmp_path, s3):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            for ext, data in (("jpg", b"x" * (100 + i)), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    s3.pipe_file("bucket/laion/00000.tar", buf.getvalue())
    s3.pipe_file("bucket/laion/00000_stats.json", json.dumps({"successes": 3, "count": 5}).encode())
    index = index_folder("s3://bucket/laion", source="crawled")
    assert index["num_samples"] == 3 and index["source"] == "crawled" and index["fields"] == ["jpg", "txt"]
    s3.invalidate_cache()
    assert s3.cat_file("bucket/laion/00000.idx").decode().startswith("v1.2 3\n")
    assert verify("s3://bucket/laion", out=io.StringIO())


def test_images_read_from_s3_urls(tmp_path, s3):
    rels = write_images(tmp_path / "img", 5)
    for rel in rels:
        s3.pipe_file(f"bucket/raw/{rel}", (tmp_path / "img" / rel).read_bytes())
    manifest = write_csv(tmp_path / "m.csv", ["url"], [[f"s3://bucket/raw/{r}"] for r in rels] +
                         [["s3://bucket/raw/missing.jpg"]])
    r = pack(manifest, tmp_path / "out", max_error_rate=0.2)
    assert r.packed == 5 and r.skipped == {"missing file": 1}
    relative = write_csv(tmp_path / "rel.csv", ["path"], [[r] for r in rels])
    assert pack(relative, tmp_path / "out2", root_dir="s3://bucket/raw", threads=2).packed == 5
    images = sorted((tmp_path / "img" / rel).read_bytes() for rel in rels)
    assert sorted(s["jpg"] for s in shard_samples(tmp_path / "out")) == images
    assert sorted(s["jpg"] for s in shard_samples(tmp_path / "out2")) == images
