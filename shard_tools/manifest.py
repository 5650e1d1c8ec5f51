"""Manifest readers (CSV, TSV, Parquet, YFCC100M metadata, a folder of images) and the folder lister.

    shard-tools manifest DIR [--labels-from-subfolders] [--relative] > manifest.csv

lists the images under DIR (jpg, jpeg, png, webp; sorted, hidden files skipped) as a CSV with a `path`
column (absolute paths, or relative to DIR with --relative: then pack with --root-dir DIR) and, with
--labels-from-subfolders, a `label` column holding the name of each image's top-level subfolder (images
directly in DIR are then left out). `pack.py` maps class names to integer ids in sorted order, so the
ids match torchvision's ImageFolder.

Every reader returns a `Manifest`: the usable rows (with their file line or row number, where to read the
image, label, key and extra json fields), the rows that could not be used (malformed), and the columns,
so the packer never guesses. A row whose label cell is empty is usable, without a label (label None:
pretraining pools are often partly labelled); `--label-column ''` reads no labels at all, even from a `label`
column. A manifest that cannot be used at all raises `ManifestError` (an ordinary exception with a one-line
reason): unreadable file, no rows, or a named column that does not exist.

Streaming: `read_manifest(..., rows=callback)` hands every usable row to `callback` as it is read instead of
keeping it (labels as written; `Manifest.label_id` maps them), and returns the counts, label names, errors and
checksum only, so a manifest of any size is read in bounded memory (pack.py --part reads it this way).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import string
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote_plus

from shard_tools.cli import run_main, tool_prog
from shard_tools.errors import ToolError
from shard_tools.outputs import sha256_stream
from shard_tools.storage import filesystem, fs_path, is_url, parent, resolve

PATH_COLUMNS = ("path", "image_path", "filepath", "file", "url", "image", "image_url", "filename", "file_name")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FORMATS = ("csv", "tsv", "parquet", "yfcc", "folder")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")

# The yfcc100m_dataset layout: tab-separated, no header, one photo or video a line.
YFCC_COLUMNS = (
    "id", "user_nsid", "user_nickname", "date_taken", "date_uploaded", "capture_device", "title",
    "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url",
    "download_url", "license_name", "license_url", "server_id", "farm_id", "secret", "secret_original",
    "extension_original", "marker",
)
# The later release prefixes a line number and the photo hash.
YFCC_COLUMNS_LONG = ("line_number", "id", "hash", *YFCC_COLUMNS[1:])
YFCC_DEFAULT_TEMPLATE = "{id}.jpg"
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
_COMPACT = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # one encoder for every row: json.dumps with
# options builds a new one per call, a fifth of the time a row takes


class ManifestError(ToolError):
    """The manifest cannot be used at all."""


class Row(NamedTuple):
    """One usable manifest row, kept small: a manifest of 100M rows is held in memory."""

    row: int  # line in the file (header = line 1) or, for parquet, 1-based row number
    path: str  # the image path or URL as the manifest gives it (Manifest.location resolves it)
    label: int | None  # None: the row has no label (no label column, or an empty cell)
    key: str | None  # extra part of the sample key (yfcc photo id, --key-column)
    meta: str | None  # extra json fields (caption, yfcc title/tags...) as a compact JSON object


RowSink = Callable[[Row], None]  # receives the usable rows of a streamed manifest, in file order. A sink with a
# method `wants(index) -> bool` is asked first, for every usable row (index: 0, 1, ... in file order), and gets
# only the rows it wants: the others are counted but never built (no json of their fields), which is most of a
# row's cost


@dataclass
class Manifest:
    source: str
    format: str
    sha256: str
    columns: list[str]
    path_column: str | None
    label_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    rows: list[Row] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (row, path, reason)
    filtered: dict[str, int] = field(default_factory=dict)  # rows left out on purpose (yfcc videos)
    label_names: list[str] = field(default_factory=list)
    root: str = ""  # folder or URL that relative paths start from
    usable: int = 0  # usable rows: len(rows), or the count handed to the callback of a streamed read
    label_map: dict[str, int] = field(default_factory=dict)  # label as written -> id
    unlabeled: int = 0  # usable rows with an empty label cell (counted only when there is a label column)

    def label_id(self, row: Row) -> Row:
        """A streamed row (label as written) with its label id, as `rows` of a kept manifest have it."""
        return row if row.label is None else row._replace(label=self.label_map[row.label])

    def location(self, row: Row) -> str:
        """Where to read the row's image: an absolute path or a URL."""
        return resolve(row.path, self.root)

    def extra(self, row: Row) -> dict:
        return json.loads(row.meta) if row.meta else {}

    @property
    def total(self) -> int:
        """Rows that should have become samples: usable plus malformed (filtered ones are not counted)."""
        return self.usable + len(self.errors)


# ---------------------------------------------------------------------------------------------------
# Helpers.


class _HashingReader(io.RawIOBase):
    """Wraps a binary file, hashing what is read through it."""

    def __init__(self, f):
        self.f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.hash.update(data)
        b[: len(data)] = data
        return len(data)


def strip_compression(name: str) -> str:
    low = name.lower()
    for suffix in COMPRESSIONS:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_format(source: str, storage_options: dict | None = None) -> str:
    if not is_url(source) and os.path.isdir(source):
        return "folder"
    name = strip_compression(source.rstrip("/").rsplit("/", 1)[-1]).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if "yfcc100m" in name and not name.endswith(".csv"):
        return "yfcc"
    return "csv"


def label_ids(values: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Integer labels stay as they are; class names map to ids in sorted order (stable across runs)."""
    present = sorted({v for v in values if v != ""})
    if all(re.fullmatch(r"-?\d+", v) for v in present):
        return {v: int(v) for v in present}, []
    return {v: i for i, v in enumerate(present)}, present


def key_part(value: str) -> str:
    """A value made safe for a sample key (no dots, slashes or spaces; at most 64 characters)."""
    return _KEY_BAD.sub("_", value.strip())[:64]


def _open_text(source: str, storage_options: dict | None):
    """(hashing reader, text stream) over a local or remote, possibly compressed, text file."""
    try:
        raw = filesystem(source, storage_options).open(fs_path(source), "rb", compression="infer")
    except FileNotFoundError:
        raise ManifestError(f"manifest {source} does not exist") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {source} is a folder; use --format folder or give a file") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read manifest {source}: {e}") from None
    hashing = _HashingReader(raw)
    text = io.TextIOWrapper(io.BufferedReader(hashing, 1 << 20), encoding="utf-8-sig", newline="")
    return hashing, text


def _choose_column(option: str, wanted: str | None, columns: list[str], source: str) -> str | None:
    if wanted == "":  # an empty name: no column (--label-column '' reads no labels, not even from 'label')
        return None
    if wanted is not None and wanted not in columns:
        raise ManifestError(f"{source}: {option} {wanted!r} not found; columns are {columns}")
    return wanted


def _detect_path_column(columns: list[str], source: str) -> str:
    for name in PATH_COLUMNS:
        if name in columns:
            return name
    lower = {c.lower().strip(): c for c in columns}
    for name in PATH_COLUMNS:
        if name in lower:
            return lower[name]
    raise ManifestError(f"{source}: no path column found; columns are {columns}. Name one with --path-column")


def _with_columns(source: str, fmt: str, digest: str, columns: list[str], path_column: str | None,
                  label_column: str | None, caption_column: str | None, key_column: str | None) -> Manifest:
    """The manifest header of a table (CSV, TSV, Parquet): the columns the options name, checked, or detected (the
    path column; 'label' when present and no --label-column is given)."""
    if not columns:
        raise ManifestError(f"manifest {source} is empty (no columns)")
    m = Manifest(source, fmt, digest, list(columns), None)
    m.path_column = _choose_column("--path-column", path_column, columns, source) or _detect_path_column(
        columns, source)
    m.label_column = _choose_column("--label-column", "label" if label_column is None and "label" in columns
                                    else label_column, columns, source)
    m.caption_column = _choose_column("--caption-column", caption_column, columns, source)
    m.key_column = _choose_column("--key-column", key_column, columns, source)
    return m


class _Builder:
    """Turns raw records into rows (labels, captions and keys checked) for `sink`: by default the manifest's
    own row list; with a callback, the rows stream through and only their count and label names stay."""

    def __init__(self, m: Manifest, root: str, sink: RowSink | None = None):
        self.m = m
        m.root = root
        self.sink = m.rows.append if sink is None else sink
        self.wants = getattr(sink, "wants", None)
        self.labels: set[str] = set()

    def add(self, row: int, path: str, label: str | None = None, key: str | None = None,
            meta: dict | None = None) -> None:
        path = (path or "").strip()
        if not path:
            self.m.errors.append((row, "", f"missing path (empty {self.m.path_column})"))
            return
        if self.m.label_column is not None:
            label = (label or "").strip() or None  # an empty cell: a row without a label, packed as such
        if key is not None:
            key = key_part(key)
            if not key:
                self.m.errors.append((row, path, f"malformed row (empty {self.m.key_column or 'key'})"))
                return
        index = self.m.usable
        self.m.usable += 1
        if label is None:
            self.m.unlabeled += self.m.label_column is not None
        else:
            self.labels.add(label)
        if self.wants is None or self.wants(index):
            meta_text = _COMPACT.encode(meta) if meta else None
            self.sink(Row(row, path, label, key, meta_text))  # the label as written, until done()

    def done(self) -> Manifest:
        m = self.m
        if m.label_column is not None and m.usable:
            m.label_map, m.label_names = label_ids(self.labels)
            rows = m.rows
            for i, r in enumerate(rows):  # in place: peak memory stays at one copy of the rows
                rows[i] = m.label_id(r)
        return m


# ---------------------------------------------------------------------------------------------------
# Readers.


def read_csv(source: str, delimiter: str = ",", path_column: str | None = None, label_column: str | None = None,
             caption_column: str | None = None, key_column: str | None = None, root_dir: str | None = None,
             storage_options: dict | None = None, fmt: str = "csv", sink: RowSink | None = None) -> Manifest:
    """CSV or TSV with a header row, read line by line (memory: the rows kept, none with a `sink`)."""
    hashing, text = _open_text(source, storage_options)
    csv.field_size_limit(1 << 24)
    try:
        with text:
            reader = csv.reader(text, delimiter=delimiter)
            header = _csv_header(reader, source, delimiter)
            m = _with_columns(source, fmt, "", header, path_column, label_column, caption_column, key_column)
            col = {c: i for i, c in enumerate(header)}
            b = _Builder(m, root_dir or parent(source), sink)
            line = reader.line_num
            while True:
                start = line + 1
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except UnicodeDecodeError as e:
                    raise ManifestError(f"manifest {source} is not UTF-8 text near line {start} ({e.reason})") from None
                except csv.Error as e:
                    raise ManifestError(f"manifest {source}: unreadable at line {start} ({e})") from None
                line = reader.line_num
                if not values or (len(values) == 1 and not values[0].strip()):
                    continue  # blank line
                if len(values) != len(header):
                    path = values[col[m.path_column]] if col[m.path_column] < len(values) else ""
                    m.errors.append((start, path.strip(), f"malformed row ({len(values)} fields, header has "
                                                          f"{len(header)})"))
                    continue
                meta = None
                if m.caption_column is not None and values[col[m.caption_column]].strip():
                    meta = {"caption": values[col[m.caption_column]].strip()}
                b.add(start, values[col[m.path_column]],
                      values[col[m.label_column]] if m.label_column is not None else None,
                      values[col[m.key_column]] if m.key_column is not None else None, meta)
    except OSError as e:
        raise ManifestError(f"cannot read manifest {source}: {e}") from None
    m.sha256 = hashing.hash.hexdigest()
    if not m.total:
        raise ManifestError(f"manifest {source} has a header but no rows")
    return b.done()


def _csv_header(reader, source: str, delimiter: str) -> list[str]:
    """The column names of a CSV/TSV manifest's first line; ManifestError when there are none."""
    try:
        header = next(reader, None)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"manifest {source} is not readable CSV text ({e})") from None
    if not header or not any(h.strip() for h in header):
        raise ManifestError(f"manifest {source} is empty (no header row)")
    if delimiter == "," and len(header) == 1 and "\t" in header[0]:
        raise ManifestError(f"{source}: the header has tabs, not commas; use --format tsv")
    return [h.strip() for h in header]


def read_parquet(source: str, path_column: str | None = None, label_column: str | None = None,
                 caption_column: str | None = None, key_column: str | None = None, root_dir: str | None = None,
                 storage_options: dict | None = None, sink: RowSink | None = None) -> Manifest:
    """Parquet, read in record batches of the columns in use (memory: one batch, whatever the file's size)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ManifestError("reading parquet manifests needs pyarrow (pip install pyarrow)") from None
    fs, path = filesystem(source, storage_options), fs_path(source)
    try:
        with fs.open(path, "rb") as f:
            digest, _ = sha256_stream(f)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            m = _with_columns(source, "parquet", digest, pf.schema_arrow.names, path_column, label_column,
                              caption_column, key_column)
            if pf.metadata.num_rows == 0:
                raise ManifestError(f"manifest {source} has no rows")
            b = _Builder(m, root_dir or parent(source), sink)
            wanted = list(dict.fromkeys(c for c in (m.path_column, m.label_column, m.caption_column, m.key_column)
                                        if c is not None))
            number = 0
            for batch in pf.iter_batches(batch_size=1 << 16, columns=wanted):
                cols = {c: [_cell(v) for v in batch.column(c).to_pylist()] for c in wanted}
                for i in range(batch.num_rows):
                    number += 1
                    caption = cols[m.caption_column][i].strip() if m.caption_column else ""
                    b.add(number, cols[m.path_column][i], cols[m.label_column][i] if m.label_column else None,
                          cols[m.key_column][i] if m.key_column else None, {"caption": caption} if caption else None)
    except FileNotFoundError:
        raise ManifestError(f"manifest {source} does not exist") from None
    except ManifestError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise ManifestError(f"cannot read parquet manifest {source}: {e}") from None
    return b.done()


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _floats(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_yfcc(source: str, path_column: str | None = None, root_dir: str | None = None,
              path_template: str | None = None, storage_options: dict | None = None,
              sink: RowSink | None = None) -> Manifest:
    """YFCC100M metadata: photos only, photo id as key, title/description/tags kept for the sample json.

    Images come from `path_column` (a YFCC column, relative to `root_dir`), else from a local mirror under
    `root_dir` named by `path_template` (fields: the YFCC column names, plus hash3/hash6 = hash[:3] and
    hash[3:6], and url_name = the download URL's file name; default `{id}.jpg`), else from the download URL.
    """
    path_column, template = _yfcc_image_source(source, path_column, root_dir, path_template)
    m = Manifest(source, "yfcc", "", list(YFCC_COLUMNS), path_column or f"template {template}", key_column="id")
    b = _Builder(m, root_dir or parent(source), sink)
    hashing, text = _open_text(source, storage_options)
    try:
        with text:
            for number, line in enumerate(text, start=1):
                rec = _yfcc_record(m, number, line)
                if rec is None:
                    continue
                if template is not None and "hash" in template and not rec.get("hash", ""):
                    m.errors.append((number, "", "malformed row (no photo hash for --path-template)"))
                    continue
                path = _yfcc_path(rec, template) if template is not None else rec.get(path_column, "")
                b.add(number, path, None, rec["id"], _yfcc_meta(rec))
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {source} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ManifestError(f"cannot read manifest {source}: {e}") from None
    m.sha256 = hashing.hash.hexdigest()
    if not m.total:
        videos = m.filtered.get("video", 0)
        raise ManifestError(f"manifest {source} has no photo rows" + (f" ({videos} videos left out)" if videos
                                                                        else " (empty)"))
    return b.done()


def _yfcc_image_source(source: str, path_column: str | None, root_dir: str | None,
                       path_template: str | None) -> tuple[str | None, str | None]:
    """(path column, mirror file-name template): exactly one of them is set."""
    if path_column is not None and path_column not in YFCC_COLUMNS_LONG:
        raise ManifestError(f"{source}: --path-column {path_column!r} is not a YFCC100M column; columns are "
                            f"{list(YFCC_COLUMNS_LONG)}")
    if path_column is None and root_dir is None:
        return "download_url", None
    if path_column is not None:
        return path_column, None
    template = path_template or YFCC_DEFAULT_TEMPLATE
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    allowed = set(YFCC_COLUMNS_LONG) | {"hash3", "hash6", "url_name"}
    if not names <= allowed:
        raise ManifestError(f"--path-template {template!r}: unknown fields {sorted(names - allowed)}; "
                            f"known: {sorted(allowed)}")
    return None, template


def _yfcc_record(m: Manifest, number: int, line: str) -> dict | None:
    """The fields of one metadata line, or None for a blank line, a header, a video (counted in m.filtered) or
    a malformed line (recorded in m.errors)."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    parts = line.split("\t")
    if len(parts) not in (len(YFCC_COLUMNS_LONG), len(YFCC_COLUMNS)):
        if not (number == 1 and not parts[0].strip().isdigit()):  # else a header line someone added
            m.errors.append((number, "", f"malformed row ({len(parts)} fields, expected "
                                         f"{len(YFCC_COLUMNS)} or {len(YFCC_COLUMNS_LONG)})"))
        return None
    rec = dict(zip(YFCC_COLUMNS_LONG if len(parts) == len(YFCC_COLUMNS_LONG) else YFCC_COLUMNS, parts))
    if not rec["id"].strip().isdigit():
        if number != 1:  # line 1: a header
            m.errors.append((number, "", "malformed row (photo id is not a number)"))
        return None
    marker = rec["marker"].strip()
    if marker == "1":
        m.filtered["video"] = m.filtered.get("video", 0) + 1
        return None
    if marker != "0":
        m.errors.append((number, "", f"malformed row (photo/video marker {marker!r})"))
        return None
    return rec


def _yfcc_path(rec: dict, template: str) -> str:
    h = rec.get("hash", "")
    return template.format(**rec, hash3=h[:3], hash6=h[3:6], url_name=rec["download_url"].rsplit("/", 1)[-1])


def _yfcc_meta(rec: dict) -> dict:
    """What a photo's sample json keeps of its metadata (URL-encoded text decoded)."""
    unq = unquote_plus
    return {
        "id": rec["id"].strip(),
        "title": unq(rec["title"]),
        "description": unq(rec["description"]),
        "tags": [unq(t) for t in rec["user_tags"].split(",") if t],
        "machine_tags": [unq(t) for t in rec["machine_tags"].split(",") if t],
        "user_nsid": rec["user_nsid"],
        "date_taken": rec["date_taken"],
        "date_uploaded": rec["date_uploaded"],
        "longitude": _floats(rec["longitude"]),
        "latitude": _floats(rec["latitude"]),
        "license": unq(rec["license_name"]),
        "license_url": rec["license_url"],
        "page_url": rec["page_url"],
        "url": rec["download_url"],
    }


def list_folder(folder: str | Path, labels_from_subfolders: bool = False) -> tuple[list[tuple[str, str]], int]:
    """(sorted [(path relative to folder, label or '')], files ignored) for the images under `folder`."""
    root = Path(folder)
    found, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for fn in filenames:
            if fn.startswith("."):
                continue
            if not fn.lower().endswith(IMAGE_SUFFIXES):
                ignored += 1
                continue
            rel = (rel_dir / fn).as_posix()
            if labels_from_subfolders:
                if rel_dir == Path("."):
                    ignored += 1
                    continue
                found.append((rel, rel_dir.parts[0]))
            else:
                found.append((rel, ""))
    found.sort()
    return found, ignored


def folder_csv(folder: str | Path, labels_from_subfolders: bool = False, relative: bool = False) -> tuple[str, int]:
    """The manifest CSV text for a folder of images, and the number of files left out."""
    files, ignored = list_folder(folder, labels_from_subfolders)
    root = Path(folder).resolve()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"] if labels_from_subfolders else ["path"])
    for rel, label in files:
        path = rel if relative else (root / rel).as_posix()
        w.writerow([path, label] if labels_from_subfolders else [path])
    return buf.getvalue(), ignored


def read_folder(folder: str, labels_from_subfolders: bool = False, sink: RowSink | None = None) -> Manifest:
    if not os.path.isdir(folder):
        raise ManifestError(f"{folder} is not a folder")
    text, _ = folder_csv(folder, labels_from_subfolders, relative=True)
    columns = ["path", "label"] if labels_from_subfolders else ["path"]
    m = Manifest(folder, "folder", hashlib.sha256(text.encode()).hexdigest(), columns, "path",
                 label_column="label" if labels_from_subfolders else None)
    b = _Builder(m, str(Path(folder).resolve()), sink)
    for number, values in enumerate(csv.reader(io.StringIO(text)), start=1):
        if number == 1:
            continue
        b.add(number, values[0], values[1] if labels_from_subfolders else None)
    if not m.total:
        raise ManifestError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return b.done()


def read_manifest(source: str | Path, format: str | None = None, path_column: str | None = None,
                  label_column: str | None = None, caption_column: str | None = None,
                  key_column: str | None = None, root_dir: str | Path | None = None,
                  path_template: str | None = None, labels_from_subfolders: bool = False,
                  storage_options: dict | None = None, rows: RowSink | None = None) -> Manifest:
    """Read any supported manifest. `format` is one of FORMATS, or None to infer it from the name. With `rows`,
    the usable rows stream through that callback instead of being kept (see the module doc)."""
    source = str(source)
    root = str(root_dir) if root_dir is not None else None
    fmt = format or detect_format(source, storage_options)
    if fmt not in FORMATS:
        raise ManifestError(f"unknown manifest format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "folder":
        if labels_from_subfolders and label_column == "":
            raise ManifestError(f"{source}: --labels-from-subfolders and --label-column '' (no labels) contradict "
                                "each other; give one of them")
        return read_folder(source, labels_from_subfolders, rows)
    if fmt == "parquet":
        return read_parquet(source, path_column, label_column, caption_column, key_column, root, storage_options,
                            rows)
    if fmt == "yfcc":
        for option, value in (("--label-column", label_column), ("--caption-column", caption_column),
                              ("--key-column", key_column)):
            if value:  # '' (no such column) is what yfcc reads anyway
                raise ManifestError(f"{option} does not apply to --format yfcc (title and tags go to the json, "
                                    "the photo id is the key)")
        return read_yfcc(source, path_column, root, path_template, storage_options, rows)
    return read_csv(source, "\t" if fmt == "tsv" else ",", path_column, label_column, caption_column, key_column,
                    root, storage_options, fmt, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=tool_prog("manifest.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="folder of images")
    p.add_argument("--labels-from-subfolders", action=argparse.BooleanOptionalAction, default=False,
                   help="add a 'label' column: the name of each image's top-level subfolder (default: off)")
    p.add_argument("--relative", action=argparse.BooleanOptionalAction, default=False,
                   help="paths relative to FOLDER (pack with --root-dir; default: absolute paths)")
    a = p.parse_args(argv)
    if not a.folder.is_dir():
        p.error(f"{a.folder} is not a folder")

    def run() -> int:
        text, ignored = folder_csv(a.folder, a.labels_from_subfolders, a.relative)
        rows = text.count("\n") - 1
        if rows == 0:
            raise ManifestError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {a.folder}")
        sys.stdout.write(text)
        print(f"listed {rows} images" + (f"; left out {ignored} other files" if ignored else ""), file=sys.stderr)
        return 0

    return run_main("manifest", run)


if __name__ == "__main__":
    sys.exit(main())
