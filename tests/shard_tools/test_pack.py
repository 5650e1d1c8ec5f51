"""shard_tools/pack.py: CSV/TSV manifests, labels, captions, limits, re-encoding, dedup, failures, determinism."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shard_tools.dedup import SetHashes, write_filtered
from shard_tools.errors import ToolError
from shard_tools.manifest import ManifestError
from shard_tools.pack import PackError, pack
from shard_tools.parts import Part
from shard_tools.shardset import load_shard_set, parse_idx, sample_boundaries
from stream_ssl.data.streaming import sample_label
from tests.helpers.packing import (
    http_server,
    jpeg_bytes,
    png_bomb,
    png_bytes,
    read_csv,
    run_tool,
    shard_samples,
    tree,
    write_csv,
    write_images,
)


def test_csv_with_class_names_captions_and_detected_path_column(tmp_path):
    rels = write_images(tmp_path / "img", 12)
    names = ["cat", "dog", "bird"]
    manifest = write_csv(tmp_path / "img" / "m.csv", ["caption", "image_path", "class"],
                         [[f"photo {i}", rel, names[i % 3]] for i, rel in enumerate(rels)])
    r = pack(manifest, tmp_path / "out", name="pool", shard_size=5, label_column="class", caption_column="caption")
    assert r.packed == 12 and r.skipped == {} and r.shards == 3
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["labels"] == {"column": "class", "names": ["bird", "cat", "dog"], "unlabeled": 0}  # sorted: stable
    assert index["fields"] == ["image", "json", "cls"] and index["source"] == "real"
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    samples = shard_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(12)]
    rows_seen = []
    for s in samples:
        meta = json.loads(s["json"])
        i = meta["row"] - 2
        rows_seen.append(i)
        assert s["jpg"] == (tmp_path / "img" / rels[i]).read_bytes()  # original bytes, untouched
        assert meta["path"] == rels[i] and meta["caption"] == f"photo {i}" and meta["source"] == "real"
        assert meta["label_name"] == names[i % 3]
        assert int(s["cls"]) == meta["label"] == sorted(names).index(names[i % 3])
        assert (meta["width"], meta["height"]) == (24, 16)
    assert sorted(rows_seen) == list(range(12)) and rows_seen != list(range(12))  # all rows, shuffled
    shard_set = load_shard_set(str(tmp_path / "out"))
    assert shard_set.labels == ("bird", "cat", "dog") and shard_set.num_samples == 12
    assert not (tmp_path / "out" / "pool-errors.csv").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_tsv_integer_labels_root_dir_and_key_column(tmp_path):
    rels = write_images(tmp_path / "images", 6)
    (tmp_path / "lists").mkdir()
    manifest = write_csv(tmp_path / "lists" / "m.tsv", ["file", "label", "id"],
                         [[rel, [7, 3][i % 2], f"ab.c/{i}"] for i, rel in enumerate(rels)],
                         delimiter="\t")
    r = pack(manifest, tmp_path / "out", shard_size=100, root_dir=tmp_path / "images", key_column="id")
    assert r.packed == 6
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["name"] == "out" and index["labels"] == {"column": "label", "names": [], "unlabeled": 0}
    for s in shard_samples(tmp_path / "out"):
        meta = json.loads(s["json"])
        i = meta["row"] - 2
        assert int(s["cls"]) == meta["label"] == [7, 3][i % 2] and "label_name" not in meta
        order, suffix = s["__key__"].split("_", 1)
        assert suffix == f"ab_c_{i}" and len(order) == 9  # key made safe: no dots or slashes


@pytest.mark.parametrize(
    "content,kwargs,message",
    [
        ("path,label\na.jpg,1\n", {"path_column": "image"},
         "--path-column 'image' not found; columns are ['path', 'label']"),
        ("name,label\na.jpg,1\n", {}, "no path column found; columns are ['name', 'label']"),
        ("path,label\na.jpg,1\n", {"label_column": "cls"}, "--label-column 'cls' not found"),
        ("", {}, "is empty"),
        ("path,label\n", {}, "has a header but no rows"),
        (b"\xff\xfe\x00garbage\x81\x82", {}, "not"),
    ],
)
def test_unusable_manifest_fails_with_a_reason(tmp_path, content, kwargs, message):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ToolError) as exc:  # an ordinary Exception: a library caller catches it
        pack(manifest, tmp_path / "out", **kwargs)
    assert message in str(exc.value) and isinstance(exc.value, Exception)
    assert not (tmp_path / "out" / "index.json").exists()


def test_missing_manifest_fails(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        pack(tmp_path / "nope.csv", tmp_path / "out")


def bad_files(root):
    """(name, bytes or None for 'do not create', expected reason kind)."""
    good = jpeg_bytes(40, 30, seed=99)
    return [
        ("missing.jpg", None, "missing file"),
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"just some text, not an image\n" * 3, "not an image"),
        ("truncated.jpg", good[: len(good) // 2], "corrupt image"),
        ("headeronly.jpg", good[:120], "corrupt image"),
        ("bomb.png", png_bomb(100_000, 100_000), "over pixel cap"),
        ("big.png", png_bomb(12_000, 12_000), "over pixel cap"),
        ("anim.gif", _gif(), "unsupported format"),
        ("damaged.png", png_bytes(16, 16)[:-20], "corrupt image"),
        ("bomb.jpg", patch_sof(good, 30_000, 20_000), "over pixel cap"),
        ("lossless.jpg", patch_sof(good, 40, 30, marker=0xC3), "unsupported format"),
    ]


def patch_sof(jpeg: bytes, w: int, h: int, marker: int | None = None) -> bytes:
    """The JPEG with its frame header claiming w x h pixels (and another coding process, if asked)."""
    i = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC1, 0xC2))
    data = bytearray(jpeg)
    data[i + 5 : i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    if marker is not None:
        data[i + 1] = marker
    return bytes(data)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, format="GIF")
    return buf.getvalue()


def test_bad_rows_are_skipped_listed_and_counted(tmp_path):
    rels = write_images(tmp_path, 30)
    rows = [[rel, i % 3] for i, rel in enumerate(rels)]
    expected = {}
    for name, data, kind in bad_files(tmp_path):
        if data is not None:
            (tmp_path / name).write_bytes(data)
        rows.append([name, 1])
        expected[name] = kind
    (tmp_path / "folder.jpg").mkdir()
    rows.append(["folder.jpg", 1])
    expected["folder.jpg"] = "unreadable file"
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], rows)
    with open(manifest, "a") as f:
        f.write("too,many,fields\n")  # malformed row
        f.write(",2\n")  # empty path
        f.write(f"{rels[0]},\n")  # no label: packed without one, not an error
    r = pack(manifest, tmp_path / "out", name="s", shard_size=8, max_error_rate=0.5)
    assert r.packed == 31 and r.unlabeled == 1
    errors = read_csv(tmp_path / "out" / "s-errors.csv")
    by_path = {e["path"]: e for e in errors}
    for name, kind in expected.items():
        assert by_path[name]["reason"].startswith(kind), (name, by_path[name])
        assert int(by_path[name]["row"]) == 2 + rows.index([name, 1])
    last = len(rows) + 1
    assert {(int(e["row"]), e["reason"].split(" (")[0]) for e in errors if int(e["row"]) > last} == {
        (last + 1, "malformed row"), (last + 2, "missing path")}
    assert [int(e["row"]) for e in errors] == sorted(int(e["row"]) for e in errors)
    assert sum(r.skipped.values()) == len(errors) == len(expected) + 2
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"] == r.skipped and index["num_samples"] == 31 and index["rows"] == 31 + len(errors)
    assert r.skipped["over pixel cap"] == 3 and r.skipped["corrupt image"] == 3


def test_error_rate_limit_and_cli_failure_is_one_line(tmp_path):
    rels = write_images(tmp_path, 18)
    manifest = write_csv(tmp_path / "m.csv", ["path"], [[r] for r in rels] + [["gone1.jpg"], ["gone2.jpg"]])
    # The run stops as soon as the limit is certainly passed (the second failure), instead of packing on.
    with pytest.raises(PackError, match=r"more than 5.0% of 20 rows failed \(--max-error-rate\): 2 failures"):
        pack(manifest, tmp_path / "out", shard_size=4)
    assert not (tmp_path / "out" / "index.json").exists()
    assert len(read_csv(tmp_path / "out" / "out-errors.csv")) == 2
    one_bad = write_csv(tmp_path / "one.csv", ["path"], [[r] for r in rels] + [["gone1.jpg"], [rels[0]]])
    assert pack(one_bad, tmp_path / "one", shard_size=4).packed == 19  # 1 of 20 = 5%: allowed
    # Raising the limit packs; the same command line through the CLI.
    proc = run_tool("pack.py", manifest, "--out", tmp_path / "cli", "--shard-size", "4", "--max-error-rate", "0.1",
                    "--progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("packed 18 of 20 rows into 5 shards") and "images/s" in proc.stdout
    assert "skipped 2: missing file: 2" in proc.stdout and "packing cli" in proc.stderr  # summary + bar
    proc = run_tool("pack.py", manifest, "--out", tmp_path / "cli2", "--path-column", "nope")
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()  # one line; the traceback is in the log it names
    assert line.startswith(f"error: {manifest}: --path-column 'nope' not found; columns are ['path'] (traceback: ")
    log = Path(line.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in log.read_text() and "ManifestError" in log.read_text()


def test_same_manifest_and_seed_give_identical_bytes_whatever_the_workers(tmp_path):
    rels = write_images(tmp_path / "img", 40)
    (tmp_path / "img" / "bad.jpg").write_bytes(b"nope")
    manifest = write_csv(tmp_path / "img" / "m.csv", ["path", "label"],
                         [[rel, i % 4] for i, rel in enumerate(rels)] + [["bad.jpg", 0]])
    kw = dict(name="set", shard_size=6, seed=3, max_error_rate=0.1)
    pack(manifest, tmp_path / "a", **kw)
    pack(manifest, tmp_path / "b", **kw, workers=2)
    pack(manifest, tmp_path / "c", **kw, threads=3)
    a = tree(tmp_path / "a")
    assert a == tree(tmp_path / "b") == tree(tmp_path / "c")
    assert "set-errors.csv" in a and len([k for k in a if k.endswith(".tar")]) == 7
    pack(manifest, tmp_path / "d", **{**kw, "seed": 4})
    d = tree(tmp_path / "d")
    assert d["set-000000.tar"] != a["set-000000.tar"]
    assert sorted(s["jpg"] for s in shard_samples(tmp_path / "d")) == sorted(s["jpg"] for s in shard_samples(
        tmp_path / "a"))


def test_shard_bytes_limit(tmp_path):
    rels = write_images(tmp_path, 20, size=(64, 48))
    (tmp_path / "huge.png").write_bytes(png_bytes(200, 200, seed=1))  # ~120 KB: alone in its shard
    manifest = write_csv(tmp_path / "m.csv", ["path"], [[r] for r in rels] + [["huge.png"]])
    limit = 40 * 1024
    r = pack(manifest, tmp_path / "out", shard_size=1000, shard_bytes=limit)
    assert r.packed == 21
    sizes = {s["path"]: (s["bytes"], s["samples"]) for s in r.index["shards"]}
    assert len(sizes) > 2
    oversized = [p for p, (b, n) in sizes.items() if b > limit]
    assert all(sizes[p][1] == 1 for p in oversized) and len(oversized) == 1
    for s in r.index["shards"]:
        assert (tmp_path / "out" / s["path"]).stat().st_size == s["bytes"]
    # Every shard but the last would have passed the limit with one more sample: shards are as full as allowed.
    assert sum(n for _, n in sizes.values()) == 21


def test_max_side_reencodes_large_images_only(tmp_path):
    (tmp_path / "wide.jpg").write_bytes(jpeg_bytes(200, 100, seed=1))
    (tmp_path / "tall.png").write_bytes(png_bytes(30, 90, seed=2, mode="RGBA"))
    (tmp_path / "small.png").write_bytes(png_bytes(20, 12, seed=3))
    (tmp_path / "gray.png").write_bytes(png_bytes(120, 120, seed=4, mode="L"))
    manifest = write_csv(tmp_path / "m.csv", ["path"], [["wide.jpg"], ["tall.png"], ["small.png"], ["gray.png"]])
    sizes = {}
    for quality in (90, 40):
        out = tmp_path / f"q{quality}"
        pack(manifest, out, max_side=64, quality=quality)
        got = {json.loads(s["json"])["path"]: s for s in shard_samples(out)}
        assert got["small.png"]["png"] == (tmp_path / "small.png").read_bytes()  # small: original bytes
        expect = {"wide.jpg": ((64, 32), (200, 100), "RGB"), "tall.png": ((21, 64), (30, 90), "RGB"),
                  "gray.png": ((64, 64), (120, 120), "L")}
        for path, (size, original, mode) in expect.items():
            meta = json.loads(got[path]["json"])
            with Image.open(io.BytesIO(got[path]["jpg"])) as im:
                assert im.format == "JPEG" and im.size == size and im.mode == mode
            assert (meta["width"], meta["height"]) == size
            assert (meta["original_width"], meta["original_height"]) == original
        sizes[quality] = len(got["wide.jpg"]["jpg"])
    assert sizes[40] < sizes[90]


def test_dedup_drops_exact_duplicates_and_reports_them(tmp_path):
    rels = write_images(tmp_path, 10)
    shutil.copy(tmp_path / rels[3], tmp_path / "copy.jpg")
    manifest = write_csv(tmp_path / "m.csv", ["path"], [[r] for r in rels] + [["copy.jpg"], [rels[5]]])
    r = pack(manifest, tmp_path / "out", name="s", dedup=True, max_error_rate=0.0)  # duplicates are not errors
    assert r.packed == 10 and r.duplicates == 2 and r.skipped == {"duplicate": 2}
    errors = read_csv(tmp_path / "out" / "s-errors.csv")
    assert {e["path"] for e in errors} <= {"copy.jpg", rels[3], rels[5]}
    assert all(e["reason"].startswith("duplicate (of row ") for e in errors)
    assert len({s["jpg"] for s in shard_samples(tmp_path / "out")}) == 10
    assert r.index["duplicates"] == 2
    assert pack(manifest, tmp_path / "nodedup", name="s").packed == 12


def test_http_urls_are_fetched(tmp_path):
    rels = write_images(tmp_path / "site", 8)
    with http_server(tmp_path / "site") as base:
        manifest = write_csv(tmp_path / "m.csv", ["url", "label"],
                             [[f"{base}/{r}", i % 2] for i, r in enumerate(rels)] + [[f"{base}/missing.jpg", 0]])
        r = pack(manifest, tmp_path / "out", name="web", max_error_rate=0.2)
    assert r.packed == 8 and r.skipped == {"missing file": 1}
    for s in shard_samples(tmp_path / "out"):
        meta = json.loads(s["json"])
        assert s["jpg"] == (tmp_path / "site" / meta["path"].rsplit("/", 1)[-1]).read_bytes()


def test_idx_matches_tar_members(tmp_path):
    rels = write_images(tmp_path, 9)
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], [[r, 1] for r in rels])
    r = pack(manifest, tmp_path / "out", name="s", shard_size=4)
    for s in r.index["shards"]:
        data = (tmp_path / "out" / s["path"]).read_bytes()
        idx = parse_idx((tmp_path / "out" / s["path"].replace(".tar", ".idx")).read_text())
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar]
        assert [(name, off, size) for sample in idx for _, off, size, name in sample] == members
        assert [[ext for ext, *_ in sample] for sample in idx] == [["jpg", "cls", "json"]] * s["samples"]
        bounds = sample_boundaries(idx)
        assert bounds[0] == 0 and bounds[-1] <= len(data)



def test_a_finished_set_of_other_settings_is_not_replaced_without_overwrite(tmp_path):
    rows = [[p] for p in write_images(tmp_path / "img", 6)]
    first = write_csv(tmp_path / "img" / "first.csv", ["path"], rows[:4])
    second = write_csv(tmp_path / "img" / "second.csv", ["path"], rows[2:])
    out = tmp_path / "shards"
    pack(first, out, shard_size=2)
    before = tree(out)
    with pytest.raises(PackError, match="use --overwrite"):
        pack(second, out, shard_size=2)
    assert tree(out) == before  # nothing of the finished set was touched
    assert pack(first, out, shard_size=2).already_complete  # the same run again: nothing to do
    assert pack(second, out, shard_size=2, overwrite=True).packed == 4 and tree(out) != before
    # What an unfinished run of other settings left (no index.json yet) is cleared without asking (docs/packing.md).
    unfinished = tmp_path / "again" / "shards"  # the same name as `out`
    pack(first, unfinished, shard_size=2, part=Part(1, 2))
    assert pack(second, unfinished, shard_size=2).packed == 4
    assert tree(unfinished, hidden=True) == tree(out, hidden=True)  # nothing of the first run left


def test_rows_without_a_label_are_packed_without_one_and_counted(tmp_path):
    """Half the rows have an empty label (a pretraining pool labelled in part): every row is packed, those
    without a .cls member (label -1 for the loader), counted in the summary and in index.json; none is an error."""
    rels = write_images(tmp_path / "img", 12)
    names = ["cat", "", "dog", ""]
    manifest = write_csv(tmp_path / "img" / "m.csv", ["path", "label"], [[r, names[i % 4]] for i, r in enumerate(rels)])
    r = pack(manifest, tmp_path / "out", name="pool", shard_size=5, max_error_rate=0.0)
    assert r.packed == 12 and r.skipped == {} and r.unlabeled == 6
    assert "; 6 samples without a label (no .cls)" in r.summary()
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["labels"] == {"column": "label", "names": ["cat", "dog"], "unlabeled": 6}
    assert index["fields"] == ["image", "json", "cls"] and index["skipped"] == {}
    assert not (tmp_path / "out" / "pool-errors.csv").exists()
    for s in shard_samples(tmp_path / "out"):
        meta = json.loads(s["json"])
        name = names[(meta["row"] - 2) % 4]
        if name:
            assert sample_label(s) == int(s["cls"]) == meta["label"] == ["cat", "dog"].index(name)
            assert meta["label_name"] == name
        else:
            assert "cls" not in s and "label" not in meta and "label_name" not in meta and sample_label(s) == -1
    # A filtered copy (dedup --write-filtered) keeps the count true.
    source = SetHashes(str(tmp_path / "out"), load_shard_set(str(tmp_path / "out")), [], np.zeros(0), [])
    dropped = {s["__key__"] for s in shard_samples(tmp_path / "out") if "cls" not in s}
    filtered = write_filtered(source, str(tmp_path / "filtered"), set(sorted(dropped)[:2]))
    assert filtered["num_samples"] == 10 and filtered["labels"]["unlabeled"] == 4


@pytest.mark.parametrize("options", [["--label-column", ""], ["--no-labels"]])
def test_labels_can_be_ignored(tmp_path, options):
    rels = write_images(tmp_path / "img", 4)
    manifest = write_csv(tmp_path / "img" / "m.csv", ["path", "label"], [[r, i] for i, r in enumerate(rels)])
    proc = run_tool("pack.py", manifest, "--out", tmp_path / "out", *options)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("packed 4 of 4 rows into 1 shard (") and "without a label" not in proc.stdout
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["labels"] == {"column": None, "names": []} and index["fields"] == ["image", "json"]
    assert all("cls" not in s and "label" not in json.loads(s["json"]) for s in shard_samples(tmp_path / "out"))


def test_no_labels_with_a_label_column_is_a_usage_error(tmp_path):
    proc = run_tool("pack.py", tmp_path / "m.csv", "--no-labels", "--label-column", "label")
    assert proc.returncode == 2 and "--no-labels reads no labels" in proc.stderr.splitlines()[-1]
    with pytest.raises(ManifestError, match="--labels-from-subfolders and --label-column '' .* contradict"):
        pack(tmp_path, tmp_path / "out", labels_from_subfolders=True, label_column="")


def test_counts_of_one_are_singular(tmp_path):
    rels = write_images(tmp_path, 3)
    manifest = write_csv(tmp_path / "m.csv", ["path"], [[r] for r in rels] + [["gone.jpg"]])
    r = pack(manifest, tmp_path / "out", shard_size=10, max_error_rate=0.5)
    assert r.summary().startswith("packed 3 of 4 rows into 1 shard (")
    with pytest.raises(PackError, match=r"more than 0.0% of 1 row failed \(--max-error-rate\): 1 failure after 1 of "
                                        r"1 row, stopped"):
        pack(write_csv(tmp_path / "one.csv", ["path"], [["gone.jpg"]]), tmp_path / "one", max_error_rate=0.0)
