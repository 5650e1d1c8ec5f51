"""Crash safety of shard_tools/pack.py: SIGKILL mid-run, re-run, and get the bytes of an uninterrupted run."""

from __future__ import annotations

import signal

import pytest

from shard_tools.pack import KILL_ENV, PackError, pack
from tests.helpers.packing import run_tool, tree, write_csv, write_images


@pytest.fixture
def manifest(tmp_path):
    rels = write_images(tmp_path / "img", 30)
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
    rows = [[rel, i % 3] for i, rel in enumerate(rels)]
    rows[10:10] = [["bad.jpg", 1], ["missing.jpg", 2]]  # errors spread through the run
    return write_csv(tmp_path / "img" / "m.csv", ["path", "label"], rows)


def clean_run(manifest, out, shard_size=4):
    pack(manifest, out, name="set", shard_size=shard_size, max_error_rate=0.2)
    return tree(out)


@pytest.mark.faults
@pytest.mark.parametrize("workers", [1, 2])
def test_killed_run_resumes_to_identical_output(tmp_path, manifest, workers, fault_row):
    out = tmp_path / "out"
    args = [manifest, "--out", out, "--name", "set", "--shard-size", "4", "--max-error-rate", "0.2",
            "--workers", str(workers)]
    killed = run_tool("pack.py", *args, env={KILL_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names = sorted(p.name for p in out.iterdir())
    assert not (out / "index.json").exists()
    assert [n for n in names if n.endswith(".tar")] == [f"set-00000{i}.tar" for i in range(3)]
    assert "set-000003.tar.tmp" in names  # the shard being written when the process died
    assert len(list((out / ".set-pack").iterdir())) == 3

    resumed = run_tool("pack.py", *args[:-2], "--workers", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after 3 complete shards" in resumed.stdout
    assert "skipped 2: missing file: 1, not an image: 1" in resumed.stdout  # errors before the kill kept
    final = tree(out, hidden=True)
    clean = clean_run(manifest, tmp_path / "clean")
    fault_row(f"pack killed -9 in shard 4 ({workers} worker{'s' * (workers > 1)}), then re-run", 0, 0,
              shards_kept=3, output="byte-identical to an uninterrupted pack" if final == clean else "DIFFERENT")
    assert final == clean
    assert "set-errors.csv" in final and not any(k.startswith(".") or k.endswith(".tmp") for k in final)


def test_damaged_shard_is_rewritten_not_kept(tmp_path, manifest):
    out = tmp_path / "out"
    args = [manifest, "--out", out, "--name", "set", "--shard-size", "4", "--max-error-rate", "0.2"]
    assert run_tool("pack.py", *args, env={KILL_ENV: "4"}).returncode == -signal.SIGKILL
    data = bytearray((out / "set-000001.tar").read_bytes())
    data[700] ^= 0xFF  # same size, different checksum
    (out / "set-000001.tar").write_bytes(bytes(data))
    r = pack(manifest, out, name="set", shard_size=4, max_error_rate=0.2)
    assert r.resumed_shards == 3  # shards 0, 2 and 3 kept: a shard is a block of its own rows; 1 is redone
    assert tree(out, hidden=True) == clean_run(manifest, tmp_path / "clean")


def test_rerun_of_complete_set_rewrites_nothing_and_changed_options_start_over(tmp_path, manifest):
    out = tmp_path / "out"
    first = clean_run(manifest, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = pack(manifest, out, name="set", shard_size=4, max_error_rate=0.2)
    assert r.already_complete and r.packed == 30 and r.skipped == {"missing file": 1, "not an image": 1}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # Different shard size: refused without --overwrite (as crawl and generate do); with it, nothing of the old
    # run is reused and no shard of it is left behind.
    with pytest.raises(PackError, match="--overwrite"):
        pack(manifest, out, name="set", shard_size=7, max_error_rate=0.2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    r = pack(manifest, out, name="set", shard_size=7, max_error_rate=0.2, overwrite=True)
    assert not r.already_complete and r.resumed_shards == 0
    assert tree(out, hidden=True) == clean_run(manifest, tmp_path / "clean7", shard_size=7)
    assert sorted(p.name for p in out.glob("*.tar")) == [f"set-00000{i}.tar" for i in range(5)]
    assert tree(out) != first
