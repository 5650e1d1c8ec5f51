"""pack.py --part K/N and --merge: the parts write, byte for byte, the shard set one run writes (also after a
part is killed and run again); the manifest streams, a part keeping only its rows; --plan-only writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from shard_tools.manifest import read_manifest
from shard_tools.pack import KILL_ENV, PackError, merge, pack, plan
from shard_tools.parts import Assigner, Layout, Part
from shard_tools.shuffle import Shuffle
from tests.helpers import PYTHON, REPO
from tests.helpers.packing import png_bytes, run_tool, shard_samples, tree, write_csv, write_images

NAMES = ["cat", "dog", "bird"]
KW = dict(name="set", shard_size=4, seed=5, max_error_rate=0.2)
ARGS = ["--name", "set", "--shard-size", "4", "--seed", "5", "--max-error-rate", "0.2"]


@pytest.fixture
def manifest(tmp_path):
    """40 images with class names and captions, two rows that fail (not an image, missing) and a malformed one."""
    rels = write_images(tmp_path / "img", 40)
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
    rows = [[rel, NAMES[i % 3], f"photo {i}"] for i, rel in enumerate(rels)]
    rows[7:7] = [["bad.jpg", "cat", ""], ["missing.jpg", "dog", "gone"]]
    path = write_csv(tmp_path / "img" / "m.csv", ["path", "label", "caption"], rows)
    with open(path, "a") as f:
        f.write("too,many,fields,here\n")
    return path


def one_run(manifest, out, **kw) -> dict[str, bytes]:
    pack(manifest, out, caption_column="caption", **{**KW, **kw})
    return tree(out, hidden=True)


@pytest.mark.multiprocess
def test_parts_and_merge_write_one_runs_bytes_even_after_a_killed_part(tmp_path, manifest):
    expected = one_run(manifest, tmp_path / "whole")
    out = tmp_path / "parts"
    args = [manifest, "--out", out, "--caption-column", "caption", *ARGS]
    # Part 3 first (parts run in any order), through the SLURM array script as an array task would.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": PYTHON}
    env.pop("PYTHONPATH", None)
    task = subprocess.run(["bash", str(REPO / "launch" / "slurm_pack.sbatch"), "3", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert task.returncode == 0, task.stderr
    assert "of part 3/3 (of 43)" in task.stdout and "--merge" in task.stdout
    # Part 2 is killed in the middle of its second shard: one finished block, one temporary file.
    killed = run_tool("pack.py", *args, "--part", "2/3", env={KILL_ENV: "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list(out.glob("*.tar.tmp"))) == 1 and not (out / ".set-pack" / "part-2-of-3.json").exists()
    with pytest.raises(PackError, match=r"parts 1/3, 2/3 of set have not finished"):
        merge(out, "set")
    pack(manifest, out, caption_column="caption", **KW, part=Part(1, 3), workers=2)
    resumed = run_tool("pack.py", *args, "--part", "2/3")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after 1 complete shard;" in resumed.stdout
    merged = run_tool("pack.py", "--out", out, "--name", "set", "--merge")
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.startswith("merged 3 parts: 40 of 43 rows in 11 shards")
    assert tree(out, hidden=True) == expected  # shards, .idx files, index.json, errors: nothing else left
    again = merge(out, "set")
    assert again.already_complete and again.packed == 40


def test_missing_parts_are_named_and_a_new_part_count_keeps_finished_shards(tmp_path, manifest):
    expected = one_run(manifest, tmp_path / "whole")
    out = tmp_path / "parts"
    for k in (1, 3):
        r = pack(manifest, out, caption_column="caption", **KW, part=Part(k, 3))
        assert r.part == f"{k}/3" and not (out / "index.json").exists()
    with pytest.raises(PackError, match=r"^part 2/3 of set has not finished in .*: run it .*--part K/3"):
        merge(out, "set")
    # The same settings in 4 parts: the blocks the 3-part run finished are kept, its part records are not.
    results = [pack(manifest, out, caption_column="caption", **KW, part=Part(k, 4)) for k in (1, 2, 3, 4)]
    assert results[0].resumed_shards == 2 and results[3].resumed_shards == 3
    assert sorted(p.name for p in (out / ".set-pack").glob("part-*")) == [f"part-{k}-of-4.json" for k in (1, 2, 3, 4)]
    assert merge(out, "set").merged == 4
    assert tree(out, hidden=True) == expected
    # A part of the finished set checks its own shards only: part 4 does not notice a damaged shard of part 1.
    (out / "set-000000.tar").write_bytes(b"damaged")
    assert pack(manifest, out, caption_column="caption", **KW, part=Part(4, 4)).already_complete
    redo = pack(manifest, out, caption_column="caption", **KW, part=Part(1, 4))
    assert not redo.already_complete and not (out / "index.json").exists()  # no longer a shard set
    with pytest.raises(PackError, match=r"^parts 2/4, 3/4, 4/4 of set have not finished"):
        merge(out, "set")  # the merge dropped the parts' records: every part runs again (as a whole run would)
    for k in (2, 3, 4):
        pack(manifest, out, caption_column="caption", **KW, part=Part(k, 4))
    merge(out, "set")
    assert tree(out, hidden=True) == expected
    index = json.loads(expected["index.json"])
    counts = [s["samples"] for s in index["shards"]]  # 42 usable rows: 10 blocks of 4, one of 2
    assert len(counts) == 11 and sum(counts) == 40 and max(counts) == 4 and counts[-1] <= 2  # 2 failed: short
    assert index["skipped"] == {"malformed row": 1, "missing file": 1, "not an image": 1} and index["rows"] == 43


def test_shard_bytes_pieces_and_more_parts_than_shards(tmp_path):
    rels = write_images(tmp_path, 10, size=(64, 48))
    (tmp_path / "huge.png").write_bytes(png_bytes(200, 200, seed=1))
    manifest = write_csv(tmp_path / "m.csv", ["path"], [[r] for r in rels] + [["huge.png"]])
    kw = dict(name="s", shard_size=6, shard_bytes=40 * 1024, seed=1)
    whole = pack(manifest, tmp_path / "whole", **kw)
    names = [s["path"] for s in whole.index["shards"]]
    assert len(names) > 2 and any("_" in n for n in names)  # a block past the size goes on in NAME-k_1.tar
    assert sorted(names) == names and {n.split("_")[0].removesuffix(".tar") for n in names} == {"s-000000",
                                                                                                  "s-000001"}
    for k in range(1, 6):  # 5 parts over 2 blocks: three parts have nothing to write
        pack(manifest, tmp_path / "parts", **kw, part=Part(k, 5))
    assert merge(tmp_path / "parts", "s").packed == 11
    assert tree(tmp_path / "parts", hidden=True) == tree(tmp_path / "whole", hidden=True)
    assert [s["__key__"] for s in shard_samples(tmp_path / "whole")] == [f"{i:09d}" for i in range(11)]


def test_settings_that_parts_cannot_honour_are_refused_in_one_line(tmp_path, manifest):
    with pytest.raises(PackError, match="--dedup with --part 1/2: a duplicate is judged against every image"):
        pack(manifest, tmp_path / "out", dedup=True, part=Part(1, 2))
    for bad, message in (("0/3", "K/N needs 1 <= K <= N"), ("4/3", "K/N needs 1 <= K <= N"),
                         ("3", "write K/N, e.g. 3/16")):
        proc = run_tool("pack.py", manifest, "--out", tmp_path / "o", "--part", bad)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = run_tool("pack.py", manifest, "--out", tmp_path / "o", "--merge")
    assert proc.returncode == 2 and "--merge takes --out (and --name) only" in proc.stderr
    proc = run_tool("pack.py", "--out", tmp_path / "nothing", "--merge")
    assert proc.returncode == 1 and "no such folder; pack the parts into it first" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_tool("pack.py", "--out", tmp_path / "empty", "--merge")
    assert proc.returncode == 1 and "error: no part of empty has finished" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    script = str(REPO / "launch" / "slurm_pack.sbatch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", script, "many", manifest], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "the first argument is the number of parts N, got 'many'" in proc.stderr
    proc = subprocess.run(["bash", script, "4", manifest], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "not an array task: submit with sbatch --array=1-4" in proc.stderr


def test_plan_only_assigns_rows_to_shards_without_images_or_output(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], [[f"nowhere/{i}.jpg", i % 7] for i in range(1000)])
    out = tmp_path / "never"
    proc = run_tool("pack.py", manifest, "--out", out, "--shard-size", "100", "--part", "2/3", "--plan-only")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("part 2/3: 300 of 1000 usable rows (1000 rows, 100 per shard) -> shards 3..5 of 10 "
                                  "(never-000003.tar .. never-000005.tar); read ")
    assert "manifest rows/s); peak memory " in proc.stdout and not out.exists()
    plans = [plan(manifest, out, shard_size=100, part=Part(k, 3)) for k in (1, 2, 3)]
    assert [p.part_rows for p in plans] == [300, 300, 400] and not out.exists()


def test_a_streamed_manifest_gives_each_part_exactly_its_rows(tmp_path, manifest):
    """The rows of the parts, read by streaming the manifest (nothing kept but their own rows), laid end to end
    are the rows of the whole run in its shuffled order; the streamed reads keep no rows themselves."""
    whole = read_manifest(manifest, caption_column="caption")
    n, seed = whole.usable, 5
    order = [whole.rows[i] for i in Shuffle(n, seed).order()]
    got = []
    for k in (1, 2, 3):
        layout = Layout(n, 4, Part(k, 3))
        assign = Assigner(Shuffle(n, seed), *layout.span, chunk=5)  # small chunks: rows cross chunk boundaries
        streamed = read_manifest(manifest, caption_column="caption", rows=assign)
        positions, rows = assign.result()
        assert streamed.rows == [] and streamed.usable == n and streamed.label_names == whole.label_names
        assert positions.tolist() == list(range(*layout.span))
        got += [streamed.label_id(r) for r in rows]
        held = Assigner(Shuffle(n, seed), *layout.span, chunk=7)  # rows in memory, offered a chunk at a time
        held.extend(whole.rows)
        assert held.result()[1] == got[-len(rows):]
    assert got == order and whole.total == 43 and n == 42


def test_a_manifest_without_a_usable_row_fails_listing_its_rows(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n,1\na.jpg,1,extra\n")  # an empty path, a row of too many fields
    with pytest.raises(PackError, match=r"no usable rows in .*m.csv: all 2 are malformed; see .*out-errors.csv"):
        pack(manifest, tmp_path / "out", max_error_rate=1.0)
    assert (tmp_path / "out" / "out-errors.csv").read_text().count("\n") == 3 and not (tmp_path / "out" /
                                                                                      "index.json").exists()


def test_merge_finds_the_parts_name_or_asks_for_it(tmp_path):
    """--merge without --name merges the parts of the one run in the folder whatever its --name (the parts of
    rows without labels included: the merge counts them as one run does); with runs of several names it names
    them; a --name with no parts points at the names there are."""
    rels = write_images(tmp_path / "img", 12)
    manifest = write_csv(tmp_path / "img" / "m.csv", ["path", "label"],
                         [[r, ["a", "", "b"][i % 3]] for i, r in enumerate(rels)])
    pack(manifest, tmp_path / "whole", **KW)
    whole = tree(tmp_path / "whole", hidden=True)
    out = tmp_path / "parts"
    for k in (1, 2):
        assert f"--out {out} --name set --merge" in pack(manifest, out, **KW, part=Part(k, 2)).summary(str(out))
    proc = run_tool("pack.py", "--out", out, "--merge")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("merged 2 parts: 12 of 12 rows in 3 shards") and "4 samples without a label" in \
        proc.stdout
    assert tree(out, hidden=True) == whole and json.loads(whole["index.json"])["labels"]["unlabeled"] == 4
    assert merge(out).already_complete  # merged before: the name comes from index.json
    mixed = tmp_path / "mixed"
    for name in ("b", "a"):
        pack(manifest, mixed, **{**KW, "name": name}, part=Part(1, 2))
    with pytest.raises(PackError, match=r"holds parts of runs named a, b; say which to merge with --name$"):
        merge(mixed)
    with pytest.raises(PackError, match=r"no part of c has finished .* the parts there are named a, b: merge with "
                                        r"--name NAME$"):
        merge(mixed, "c")
    with pytest.raises(PackError, match=r"^part 2/2 of a has not finished"):
        merge(mixed, "a")
