"""One writer per output folder: a second pack/index into a folder being written fails at once, naming the
first; a killed writer leaves no stale lock; the lock file is gone once the writer finishes."""

from __future__ import annotations

import signal
import subprocess

from shard_tools.outputs import LOCK_NAME
from shard_tools.pack import pack
from tests.helpers import PYTHON, REPO
from tests.helpers.packing import run_tool, write_csv, write_images

HOLD = ("import sys; from shard_tools.outputs import LocalOutput; "
        "o = LocalOutput(sys.argv[1]); o.lock('pack.py --name held'); print('locked', flush=True); "
        "sys.stdin.readline(); o.close()")


def _holder(folder) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-c", HOLD, str(folder), str(REPO)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _manifest(tmp_path):
    rels = write_images(tmp_path / "img", 6)
    return write_csv(tmp_path / "m.csv", ["path"], [[r] for r in rels])


def test_a_second_writer_fails_naming_the_first_then_runs_once_it_is_gone(tmp_path):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    try:
        r = run_tool("pack.py", manifest, "--out", out, "--root-dir", tmp_path / "img")
        assert r.returncode != 0
        assert f"{out} is being written by pack.py --name held (pid {holder.pid} on " in r.stderr
        assert not (out / "index.json").exists() and not list(out.glob("*.tar"))
        r = run_tool("index.py", out)  # any tool that writes a shard set takes the same lock
        assert r.returncode != 0 and "is being written by pack.py --name held" in r.stderr
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0 and not (out / LOCK_NAME).exists()
    result = pack(manifest, out, root_dir=tmp_path / "img")
    assert result.packed == 6 and not (out / LOCK_NAME).exists()


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # the file stays, the kernel dropped the lock
    result = pack(manifest, out, root_dir=tmp_path / "img")
    assert result.packed == 6 and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_lock_file_is_not_listed_as_output(tmp_path):
    from shard_tools.outputs import LocalOutput

    o = LocalOutput(tmp_path)
    o.lock("test")
    try:
        assert (tmp_path / LOCK_NAME).read_text().startswith("test (pid ")
        assert o.list() == []
    finally:
        o.close()
    assert not (tmp_path / LOCK_NAME).exists()
