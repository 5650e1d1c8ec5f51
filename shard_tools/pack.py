"""Pack an image manifest (CSV/TSV with a path column, optional label column) into a shard set.

    python shard_tools/pack.py manifest.csv --out shards/pool --name pool --shard-size 1000 --seed 0

Rows are shuffled globally (seeded) before writing, so any prefix of shards is a uniform random subset.
Unusable rows are skipped, never fatal alone, and listed in `OUT/NAME-errors.csv`.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import the project, not this folder
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import csv
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shard_tools.writer import ShardWriter

PATH_COLUMNS = ("path", "image_path", "filepath", "file", "url")
MAX_PIXELS = 16384 * 16384  # larger images are refused as possible decompression bombs
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class PackResult:
    index: dict
    packed: int
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0


def read_manifest(path: Path, path_column: str | None, label_column: str | None) -> tuple[list[dict], str]:
    """Rows of the manifest as dicts, plus the path column that was chosen."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SystemExit(f"error: cannot read manifest {path}: {e.strerror}") from None
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = reader.fieldnames or []
    if not columns:
        raise SystemExit(f"error: manifest {path} is empty (no header row)")
    if path_column is None:
        path_column = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_column is None:
            raise SystemExit(
                f"error: {path}: no path column found; columns are {columns}. Name one with --path-column"
            )
    for option, col in (("--path-column", path_column), ("--label-column", label_column)):
        if col is not None and col not in columns:
            raise SystemExit(f"error: {path}: {option} {col!r} not found; columns are {columns}")
    rows = list(reader)
    if not rows:
        raise SystemExit(f"error: manifest {path} has a header but no rows")
    return rows, path_column


def label_ids(values: list[str]) -> tuple[dict[str, int], list[str]]:
    """Integer labels stay as they are; class names map to ids in sorted order (stable across runs)."""
    present = sorted({v for v in values if v != ""})
    if all(v.lstrip("-").isdigit() for v in present):
        return {v: int(v) for v in present}, []
    names = present
    return {v: i for i, v in enumerate(names)}, names


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """(extension, width, height) of an encoded image; raises ValueError with a reason."""
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"image too large ({w}x{h} pixels)")
            im.verify()
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    if fmt not in _FORMATS:
        raise ValueError(f"unsupported image format {fmt}")
    return _FORMATS[fmt], w, h


def pack(
    manifest: Path,
    out: Path,
    name: str | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    path_column: str | None = None,
    label_column: str | None = None,
    root_dir: Path | None = None,
    source: str = "real",
    max_error_rate: float = 0.05,
) -> PackResult:
    start = time.perf_counter()
    manifest = Path(manifest)
    out = Path(out)
    name = name or out.name
    root = Path(root_dir) if root_dir else manifest.parent
    rows, path_column = read_manifest(manifest, path_column, label_column)
    if label_column is None and "label" in rows[0]:
        label_column = "label"
    labels, names = label_ids([r.get(label_column, "") for r in rows]) if label_column else ({}, [])

    order = np.random.default_rng(seed).permutation(len(rows))
    (out / "index.json").unlink(missing_ok=True)  # the folder stops being a shard set until we finish
    writer = ShardWriter(out, name, shard_size)
    width = max(9, len(str(len(rows) - 1)))
    result = PackResult(index={}, packed=0)

    def skip(row_number: int, path: str, reason: str) -> None:
        result.errors.append((row_number, path, reason))
        kind = reason.split(" (")[0]
        result.skipped[kind] = result.skipped.get(kind, 0) + 1

    for i in order:
        row, row_number = rows[i], int(i) + 2  # +2: header line, 1-based
        rel = (row.get(path_column) or "").strip()
        if not rel:
            skip(row_number, rel, f"empty {path_column}")
            continue
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        try:
            data = path.read_bytes()
        except OSError as e:
            skip(row_number, rel, f"cannot read file ({e.strerror})")
            continue
        try:
            ext, w, h = inspect_image(data)
        except ValueError as e:
            skip(row_number, rel, str(e))
            continue
        meta = {"source": source, "path": rel, "width": w, "height": h, "row": row_number}
        fields = {ext: data}
        if label_column:
            raw = (row.get(label_column) or "").strip()
            if raw not in labels:
                skip(row_number, rel, f"missing {label_column}")
                continue
            meta["label"] = labels[raw]
            if names:
                meta["label_name"] = raw
            fields["cls"] = str(labels[raw]).encode()
        fields["json"] = json.dumps(meta, sort_keys=True).encode()
        writer.add(f"{result.packed:0{width}d}", fields)
        result.packed += 1

    _write_errors(out / f"{name}-errors.csv", result.errors)
    error_rate = len(result.errors) / len(rows)
    if error_rate > max_error_rate:
        raise SystemExit(
            f"error: {len(result.errors)} of {len(rows)} rows failed ({error_rate:.1%} > --max-error-rate "
            f"{max_error_rate:.1%}); see {out / f'{name}-errors.csv'}. No index.json was written."
        )
    if result.packed == 0:
        raise SystemExit(f"error: no usable rows in {manifest}")
    result.index = writer.finish(
        source=source,
        seed=seed,
        manifest=str(manifest),
        manifest_sha256=hashlib.sha256(manifest.read_bytes()).hexdigest(),
        fields=["image", "json", *(["cls"] if label_column else [])],
        labels={"column": label_column, "names": names},
        skipped=result.skipped,
    )
    result.seconds = time.perf_counter() - start
    return result


def _write_errors(path: Path, errors: list[tuple[int, str, str]]) -> None:
    if not errors:
        path.unlink(missing_ok=True)
        return
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "reason"])
        w.writerows(sorted(errors))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="CSV (or .tsv) with a header row")
    p.add_argument("--out", type=Path, required=True, help="output folder of the shard set")
    p.add_argument("--name", help="shard name prefix (default: the output folder's name)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    p.add_argument("--path-column", help=f"column with image paths (default: first of {', '.join(PATH_COLUMNS)})")
    p.add_argument("--label-column", help="column with integer labels or class names (default: 'label' if present)")
    p.add_argument("--root-dir", type=Path, help="folder relative paths start from (default: the manifest's)")
    p.add_argument("--source", default="real", help="real|yfcc|crawled|generated|downstream")
    p.add_argument("--max-error-rate", type=float, default=0.05)
    a = p.parse_args(argv)
    if a.shard_size < 1:
        p.error("--shard-size must be >= 1")
    r = pack(a.manifest, a.out, a.name, a.shard_size, a.seed, a.path_column, a.label_column, a.root_dir,
             a.source, a.max_error_rate)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(r.skipped.items())) or "none"
    mb = sum(s["bytes"] for s in r.index["shards"]) / 1e6
    print(f"packed {r.packed} samples into {len(r.index['shards'])} shards ({mb:.1f} MB) at {a.out} "
          f"in {r.seconds:.1f}s ({r.packed / max(r.seconds, 1e-9):.0f} images/s); skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
