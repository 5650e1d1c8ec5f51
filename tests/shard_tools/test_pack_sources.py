"""Manifest formats beyond CSV: a folder of images (manifest.py), Parquet, YFCC100M metadata."""

from __future__ import annotations

import bz2
import hashlib
import json

import pytest

from shard_tools.manifest import YFCC_COLUMNS, ManifestError, read_manifest
from shard_tools.pack import pack
from tests.helpers.packing import http_server, jpeg_bytes, read_csv, run_tool, shard_samples, write_images


def make_class_folders(root):
    for c, n in (("zebra", 3), ("ant", 2), ("moth", 4)):
        write_images(root / c / "sub" if c == "moth" else root / c, n, prefix=c, seed=len(c))
    (root / "loose.jpg").write_bytes(jpeg_bytes(seed=5))  # not in a class folder
    (root / "ant" / "readme.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(jpeg_bytes(seed=6))


def test_manifest_cli_lists_folder_with_subfolder_labels(tmp_path):
    make_class_folders(tmp_path / "data")
    proc = run_tool("manifest.py", tmp_path / "data", "--labels-from-subfolders")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "m.csv").write_text(proc.stdout)
    rows = read_csv(tmp_path / "m.csv")
    assert [r["label"] for r in rows] == ["ant"] * 2 + ["moth"] * 4 + ["zebra"] * 3
    assert all(r["path"].startswith(str(tmp_path / "data")) for r in rows)
    assert "listed 9 images; left out 2 other files" in proc.stderr
    r = pack(tmp_path / "m.csv", tmp_path / "out")
    assert r.packed == 9 and r.index["labels"]["names"] == ["ant", "moth", "zebra"]
    # Without labels every image is listed, relative paths on request.
    proc = run_tool("manifest.py", tmp_path / "data", "--relative")
    lines = proc.stdout.splitlines()
    assert lines[0] == "path" and "loose.jpg" in lines and "moth/sub/moth0003.jpg" in lines and len(lines) == 11
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_tool("manifest.py", empty).returncode == 1


def test_pack_accepts_a_folder(tmp_path):
    make_class_folders(tmp_path / "data")
    r = pack(tmp_path / "data", tmp_path / "out", labels_from_subfolders=True, shard_size=4)
    assert r.packed == 9 and r.index["manifest_format"] == "folder"
    labels = {json.loads(s["json"])["path"]: int(s["cls"]) for s in shard_samples(tmp_path / "out")}
    assert labels["zebra/zebra0002.jpg"] == 2 and labels["moth/sub/moth0000.jpg"] == 1
    r = pack(tmp_path / "data", tmp_path / "flat")
    assert r.packed == 10 and r.index["fields"] == ["image", "json"]


def test_parquet_manifest(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rels = write_images(tmp_path, 7)
    table = pa.table({"image": rels + ["missing.jpg"], "label": [i % 2 for i in range(8)],
                      "text": [f"caption {i}" for i in range(7)] + [None]})
    pq.write_table(table, tmp_path / "m.parquet")
    r = pack(tmp_path / "m.parquet", tmp_path / "out", caption_column="text", max_error_rate=0.2)
    assert r.packed == 7 and r.skipped == {"missing file": 1} and r.index["manifest_format"] == "parquet"
    for s in shard_samples(tmp_path / "out"):
        meta = json.loads(s["json"])
        assert meta["caption"] == f"caption {meta['row'] - 1}" and int(s["cls"]) == (meta["row"] - 1) % 2
    with pytest.raises(ManifestError, match=r"--label-column 'y' not found; columns are \['image', 'label', 'text'\]"):
        read_manifest(tmp_path / "m.parquet", label_column="y")


def yfcc_line(photo_id: int, marker: int = 0, title: str = "Sunset+at+the+beach", tags: str = "sea,sunset,new+york",
              url: str = "", long: bool = False) -> str:
    rec = {c: "" for c in YFCC_COLUMNS}
    rec.update(id=str(photo_id), user_nsid="12345@N00", user_nickname="someone", date_taken="2012-02-16 09:56:37.0",
               date_uploaded="1331840483", title=title, description="A+%22quoted%22+text", user_tags=tags,
               machine_tags="", longitude="-81.8", latitude="24.5", accuracy="12",
               page_url=f"http://www.flickr.com/photos/x/{photo_id}/",
               download_url=url or f"http://farm8.staticflickr.com/7205/{photo_id}_abc.jpg",
               license_name="Attribution+License", license_url="http://creativecommons.org/licenses/by/2.0/",
               server_id="7205", farm_id="8", secret="abc", secret_original="def", extension_original="jpg",
               marker=str(marker))
    values = [rec[c] for c in YFCC_COLUMNS]
    if long:
        values = [str(photo_id % 97), values[0], hashlib.md5(str(photo_id).encode()).hexdigest(), *values[1:]]
    return "\t".join(values)


def test_yfcc_local_mirror_photos_only(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    ids = [6985418911 + 17 * i for i in range(6)]
    for i, pid in enumerate(ids):
        (mirror / f"{pid}.jpg").write_bytes(jpeg_bytes(seed=i))
    lines = [yfcc_line(pid) for pid in ids] + [yfcc_line(555, marker=1), "only\tthree\tfields",
                                               yfcc_line(777)]  # 777: photo missing from the mirror
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "yfcc100m_dataset.bz2").write_bytes(bz2.compress(data))
    r = pack(tmp_path / "yfcc100m_dataset.bz2", tmp_path / "out", root_dir=mirror, shard_size=4, max_error_rate=0.3)
    assert r.packed == 6 and r.filtered == {"video": 1}
    assert r.skipped == {"malformed row": 1, "missing file": 1}
    assert r.index["source"] == "yfcc" and r.index["manifest_format"] == "yfcc" and r.index["filtered"] == {"video": 1}
    assert r.index["manifest_sha256"] == hashlib.sha256(data).hexdigest()  # of the text, not the .bz2
    seen = set()
    for s in shard_samples(tmp_path / "out"):
        meta = json.loads(s["json"])
        pid = int(meta["id"])
        seen.add(pid)
        assert s["__key__"].endswith(f"_{pid}") and "cls" not in s
        assert s["jpg"] == (mirror / f"{pid}.jpg").read_bytes()
        assert meta["title"] == "Sunset at the beach" and meta["tags"] == ["sea", "sunset", "new york"]
        assert meta["description"] == 'A "quoted" text' and meta["license"] == "Attribution License"
        assert meta["source"] == "yfcc" and meta["longitude"] == -81.8 and meta["path"] == f"{pid}.jpg"
    assert seen == set(ids)
    errors = read_csv(tmp_path / "out" / "out-errors.csv")
    assert [(e["row"], e["reason"].split(" (")[0]) for e in errors] == [("8", "malformed row"), ("9", "missing file")]


def test_yfcc_hash_layout_and_download_urls(tmp_path):
    ids = [1001, 1002, 1003]
    mirror = tmp_path / "mirror"
    for i, pid in enumerate(ids):
        h = hashlib.md5(str(pid).encode()).hexdigest()
        (mirror / h[:3] / h[3:6]).mkdir(parents=True)
        (mirror / h[:3] / h[3:6] / f"{h}.jpg").write_bytes(jpeg_bytes(seed=i))
    (tmp_path / "meta.tsv").write_text("\n".join(yfcc_line(pid, long=True) for pid in ids) + "\n")
    r = pack(tmp_path / "meta.tsv", tmp_path / "hashed", format="yfcc", root_dir=mirror,
             path_template="{hash3}/{hash6}/{hash}.jpg")
    assert r.packed == 3
    # No mirror: images come from the download URL column.
    site = tmp_path / "site"
    write_images(site, 3)
    with http_server(site) as base:
        (tmp_path / "web.tsv").write_text("\n".join(yfcc_line(pid, url=f"{base}/img{i:04d}.jpg")
                                                    for i, pid in enumerate(ids)) + "\n")
        r = pack(tmp_path / "web.tsv", tmp_path / "web", format="yfcc", source="crawled")
    assert r.packed == 3
    for s in shard_samples(tmp_path / "web"):
        meta = json.loads(s["json"])
        assert meta["source"] == "crawled" and s["jpg"] == (site / meta["url"].rsplit("/", 1)[-1]).read_bytes()
    with pytest.raises(ManifestError, match="unknown fields"):
        read_manifest(tmp_path / "meta.tsv", format="yfcc", root_dir=mirror, path_template="{nope}.jpg")
    with pytest.raises(ManifestError, match="does not apply"):
        read_manifest(tmp_path / "meta.tsv", format="yfcc", label_column="x")


def test_yfcc_without_photos_is_unusable(tmp_path):
    (tmp_path / "v.tsv").write_text(yfcc_line(1, marker=1) + "\n")
    with pytest.raises(ManifestError, match="no photo rows"):
        pack(tmp_path / "v.tsv", tmp_path / "out", format="yfcc")


def test_every_format_streams_the_rows_it_would_keep(tmp_path):
    """read_manifest(rows=callback) hands over the rows a kept read holds (labels as written, mapped by
    label_id), with the same counts, label names, errors and checksum, and keeps none itself."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    make_class_folders(tmp_path / "data")
    table = pa.table({"image": ["a.jpg", "", "c.jpg", "d.jpg"] * 20000, "label": ["x", "y", "", "z"] * 20000,
                      "text": ["one", None, "three", "four"] * 20000})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=30000)  # several batches and row groups
    ids = [6985418911 + 17 * i for i in range(5)]
    (tmp_path / "yfcc100m_dataset").write_text("\n".join([yfcc_line(p) for p in ids] + [yfcc_line(9, marker=1),
                                                                                         "a\tb"]) + "\n")
    cases = [(tmp_path / "m.parquet", dict(caption_column="text")), (tmp_path / "yfcc100m_dataset", {}),
             (tmp_path / "data", dict(labels_from_subfolders=True))]
    for source, options in cases:
        kept = read_manifest(source, **options)
        streamed_rows = []
        streamed = read_manifest(source, **options, rows=streamed_rows.append)
        assert streamed.rows == [] and [streamed.label_id(r) for r in streamed_rows] == kept.rows, source
        for field in ("usable", "total", "errors", "filtered", "label_names", "sha256", "format", "unlabeled"):
            assert getattr(streamed, field) == getattr(kept, field), (source, field)
    parquet = read_manifest(tmp_path / "m.parquet", caption_column="text")
    assert parquet.usable == 60000 and parquet.total == 80000 and parquet.label_names == ["x", "z"]
    assert parquet.unlabeled == 20000 and {r.label for r in parquet.rows} == {0, 1, None}  # "" -> no label
    assert parquet.sha256 == hashlib.sha256((tmp_path / "m.parquet").read_bytes()).hexdigest()
