"""Pack images listed in a manifest (CSV, TSV, Parquet, YFCC100M metadata or a folder) into a shard set.

    python shard_tools/pack.py manifest.csv --out shards/pool --name pool --shard-size 1000 --seed 0
    python shard_tools/pack.py images/ --labels-from-subfolders --out shards/train
    python shard_tools/pack.py yfcc100m_dataset.bz2 --format yfcc --root-dir /data/yfcc --out s3://b/yfcc

Rows are shuffled globally (seeded) before writing, so any prefix of shards is a uniform random subset.
Images keep their original bytes unless --max-side asks to re-encode the larger ones. Rows that cannot be
packed (missing or unreadable file, empty file, not an image, corrupt image, over the pixel cap, malformed
row, missing label) are skipped, never fatal alone, and listed in `OUT/NAME-errors.csv` (row, path,
reason); the run fails with a one-line reason when they pass --max-error-rate.

Crash safety: each shard is written under a temporary name and published whole, with a small progress
record in `OUT/.NAME-pack/`; `index.json` is written last. Running the same command again after a crash
keeps the complete shards whose checksums still match and continues after them; the result is byte for
byte what an uninterrupted run writes. The output does not depend on --workers or --threads.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from tqdm import tqdm

from shard_tools.cli import progress_switch, run_main, tool_prog
from shard_tools.errors import (
    ShardSetTotals,
    ToolError,
    count_by_kind,
    error_kind,
    positive_int,
    read_errors,
    remove_partial_shards,
    shard_set_name,
    write_errors,
)
from shard_tools.images import MAX_PIXELS, ImageError, check_image
from shard_tools.manifest import FORMATS, PATH_COLUMNS, Manifest, label_ids, read_manifest, strip_compression
from shard_tools.outputs import Output, open_output
from shard_tools.processes import KILL_ENV, die_with_parent
from shard_tools.quantities import COUNT_HELP, SIZE_HELP, count_arg, size_arg
from shard_tools.shardset import ShardInfo, finished_index, idx_name, shard_name
from shard_tools.storage import STORAGE_OPTIONS_HELP, is_url, read_location, storage_options_arg
from shard_tools.writer import ShardWriter, make_index, write_index

__all__ = ["PATH_COLUMNS", "MAX_PIXELS", "PackError", "PackResult", "inspect_image", "label_ids", "pack", "main"]

SOURCES = ("real", "yfcc", "crawled", "generated", "downstream")
PACK_VERSION = 2  # bump when the bytes written for the same inputs change
NOT_ERRORS = ("duplicate",)  # skipped on purpose: listed, but not counted against --max-error-rate


class PackError(ToolError):
    """Packing failed as a whole."""


@dataclass
class PackResult(ShardSetTotals):
    index: dict
    packed: int
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    rows: int = 0
    duplicates: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    resumed_shards: int = 0
    already_complete: bool = False

    def summary(self, out: str = "") -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        line = (f"packed {self.packed} of {self.rows} rows into {self.shards} shards ({self.bytes / 1e6:.1f} MB)"
                f"{' at ' + out if out else ''} in {self.seconds:.1f}s "
                f"({self.packed / max(self.seconds, 1e-9):.0f} images/s); skipped {sum(self.skipped.values())}: "
                f"{skipped}")
        if self.filtered:
            line += "; left out: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered.items()))
        if self.resumed_shards:
            line += f"; resumed after {self.resumed_shards} complete shards"
        if self.already_complete:
            line += " (already complete: nothing rewritten)"
        return line


def inspect_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(extension, width, height) of an encoded image; raises ValueError with a reason."""
    c = check_image(data, max_pixels)
    return c.ext, c.width, c.height


# ---------------------------------------------------------------------------------------------------
# Per-image work: runs in the main process, in threads, or in worker processes. Pure function of the
# location and the options, so the output never depends on how the work is spread.


@dataclass(frozen=True)
class ImageOptions:
    max_pixels: int = MAX_PIXELS
    decode: bool = False
    max_side: int | None = None
    quality: int = 90
    dedup: bool = False
    storage_options: dict | None = None


# An outcome is ("", ext, data, width, height, original_width, original_height, digest) for a packable
# image, or (reason kind, detail) for a row to skip. Tuples pickle cheaply between processes.
Outcome = tuple


def process_location(location: str, opts: ImageOptions) -> Outcome:
    try:
        data = read_location(location, opts.storage_options)
    except FileNotFoundError:
        return ("missing file", "")
    except IsADirectoryError:
        return ("unreadable file", "is a folder")
    except PermissionError:
        return ("unreadable file", "permission denied")
    except Exception as e:  # local OSError, or anything a remote backend raises
        kind = "fetch failed" if is_url(location) else "unreadable file"
        return (kind, f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest() if opts.dedup else ""
    try:
        c = check_image(data, opts.max_pixels, opts.decode, opts.max_side, opts.quality)
    except ImageError as e:
        return (e.kind, e.detail)
    return ("", c.ext, c.data, c.width, c.height, c.original_width, c.original_height, digest)


_WORKER: dict = {}


def _init_worker(opts: ImageOptions, threads: int, parent: int) -> None:
    die_with_parent(parent)  # even when it is SIGKILLed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER["opts"] = opts
    _WORKER["pool"] = ThreadPoolExecutor(threads) if threads > 1 else None


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _process_chunk(locations: list[str]) -> list[Outcome]:
    opts, pool = _WORKER["opts"], _WORKER["pool"]
    if pool is None:
        return [process_location(loc, opts) for loc in locations]
    return list(pool.map(lambda loc: process_location(loc, opts), locations))


def _ordered(executor: Executor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """fn(item) for every item, in order, with at most `window` submitted ahead (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def outcomes(locations: Iterable[str], opts: ImageOptions, workers: int = 1, threads: int = 1,
             chunk: int = 32) -> Iterator[Outcome]:
    """The outcome of every location, in order."""
    if workers <= 1 and threads <= 1:
        for loc in locations:
            yield process_location(loc, opts)
        return
    if workers <= 1:
        with ThreadPoolExecutor(threads) as ex:
            try:
                yield from _ordered(ex, lambda loc: process_location(loc, opts), locations, 4 * threads)
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
        return
    ctx = multiprocessing.get_context("spawn")  # clean workers; with PDEATHSIG they die with us
    chunks = _batches(locations, chunk)
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(opts, threads, os.getpid()))
    try:
        for results in _ordered(ex, _process_chunk, chunks, 3 * workers):
            yield from results
    except BrokenProcessPool:
        raise PackError("a worker process died (killed, out of memory, or: a script calling pack(workers > 1) "
                        "must do so under `if __name__ == '__main__':`)") from None
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------
# Resume records.


def _state_dir(name: str) -> str:
    return f".{name}-pack"


def _state_file(name: str, k: int) -> str:
    return f"{_state_dir(name)}/{k:06d}.json"


@dataclass
class Resume:
    shards: list[ShardInfo] = field(default_factory=list)
    next: int = 0  # position in the shuffled row order where packing continues
    packed: int = 0
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    hashes: dict[str, int] = field(default_factory=dict)


def _load_resume(output: Output, name: str, config: str) -> Resume:
    """The complete shards of an interrupted run with the same configuration whose checksums still match."""
    r = Resume()
    present = set(output.list(_state_dir(name)))
    k = 0
    while f"{k:06d}.json" in present:
        try:
            st = json.loads(output.read_bytes(_state_file(name, k)) or b"")
            info = ShardInfo(**st["shard"])
        except (ValueError, TypeError, KeyError):
            break
        if st.get("config") != config or info.path != shard_name(name, k):
            break
        idx = output.read_bytes(idx_name(info.path))
        if idx is None or hashlib.sha256(idx).hexdigest() != st.get("idx_sha256"):
            break
        if output.sha256(info.path) != (info.sha256, info.bytes):
            break
        r.shards.append(info)
        r.next, r.packed = int(st["next"]), int(st["packed"])
        r.errors.extend((int(a), str(b), str(c)) for a, b, c in st.get("errors", []))
        r.hashes.update((h, int(row)) for h, row in st.get("hashes", []))
        k += 1
    for stale in present - {f"{i:06d}.json" for i in range(k)}:
        output.remove(f"{_state_dir(name)}/{stale}")
    return r


def _failures(errors: list[tuple[int, str, str]]) -> int:
    return sum(1 for _, _, reason in errors if error_kind(reason) not in NOT_ERRORS)


# ---------------------------------------------------------------------------------------------------


def pack(
    manifest: str | Path,
    out: str | Path,
    name: str | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    path_column: str | None = None,
    label_column: str | None = None,
    root_dir: str | Path | None = None,
    source: str | None = None,
    max_error_rate: float = 0.05,
    *,
    format: str | None = None,
    caption_column: str | None = None,
    key_column: str | None = None,
    path_template: str | None = None,
    labels_from_subfolders: bool = False,
    shard_bytes: int | None = None,
    max_side: int | None = None,
    quality: int = 90,
    max_pixels: int = MAX_PIXELS,
    decode: bool = False,
    dedup: bool = False,
    workers: int = 1,
    threads: int | None = None,
    storage_options: dict | None = None,
    tmp_dir: str | Path | None = None,
    progress: bool | None = False,
) -> PackResult:
    """Pack `manifest` into the shard set `out` (a folder or an fsspec URL such as s3://bucket/prefix).

    `source` defaults to 'yfcc' for --format yfcc, else 'real'. `progress` None shows the bar on a terminal.
    Raises ManifestError / PackError (ToolError: ordinary exceptions with a one-line message) when the run
    fails as a whole. The phases: check the settings, read the manifest, resume or start, write, finish.
    """
    start, out = time.perf_counter(), str(out)
    name = _check_settings(out, name, shard_size, max_side, quality, max_error_rate)
    m: Manifest = read_manifest(manifest, format, path_column, label_column, caption_column, key_column, root_dir,
                                path_template, labels_from_subfolders, storage_options)
    source = source or ("yfcc" if m.format == "yfcc" else "real")
    config = _settings(m, name, seed, shard_size, shard_bytes, source, root_dir, max_side, quality, max_pixels,
                       decode, dedup)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    opts = ImageOptions(max_pixels, decode, max_side, quality, dedup, storage_options)
    threads = threads or (8 if m.rows and is_url(m.location(m.rows[0])) else 1)
    output = open_output(out, storage_options, tmp_dir)
    try:
        output.lock(f"pack.py --name {name}")
        done = finished_index(output, "packing", digest, name)
        if done is not None:
            output.remove(_state_dir(name))  # left behind if a run was killed right after writing index.json
            errors = read_errors(output, name)
            return PackResult(done, done["num_samples"], count_by_kind(errors), errors, time.perf_counter() - start,
                              m.total, done.get("duplicates", 0), m.filtered, len(done["shards"]), True)
        run = _start(output, m, name, source, seed, digest, shard_size, shard_bytes, max_error_rate, dedup)
        _write_rows(run, outcomes((m.location(m.rows[i]) for i in run.order[run.position:]), opts, workers, threads),
                    progress)
        result = _finish(run, manifest, config)
        result.seconds = time.perf_counter() - start
        return result
    finally:
        output.close()


def _check_settings(out: str, name: str | None, shard_size: int, max_side: int | None, quality: int,
                    max_error_rate: float) -> str:
    """Raise PackError for a setting out of range; returns the shard name (default: the folder's name)."""
    name = shard_set_name(out, name, PackError)
    if shard_size < 1:
        raise PackError("--shard-size must be >= 1")
    if max_side is not None and max_side < 1:
        raise PackError("--max-side must be >= 1")
    if not 1 <= quality <= 100:
        raise PackError("--quality must be in 1..100")
    if not 0 <= max_error_rate <= 1:
        raise PackError("--max-error-rate must be in 0..1")
    return name


def _settings(m: Manifest, name: str, seed: int, shard_size: int, shard_bytes: int | None, source: str,
              root_dir, max_side: int | None, quality: int, max_pixels: int, decode: bool, dedup: bool) -> dict:
    """Everything that shapes the bytes written: its digest tells a resumable run from another one."""
    return {
        "pack_version": PACK_VERSION,
        "manifest_sha256": m.sha256,
        "format": m.format,
        "name": name,
        "seed": seed,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "source": source,
        "path_column": m.path_column,
        "label_column": m.label_column,
        "caption_column": m.caption_column,
        "key_column": m.key_column,
        "root": str(root_dir) if root_dir is not None else None,
        "max_side": max_side,
        "quality": quality if max_side else None,
        "encoder": PIL.__version__ if max_side else None,
        "max_pixels": max_pixels,
        "decode": decode,
        "dedup": dedup,
    }


@dataclass
class _Run:
    """One pack run in progress: where it is in the shuffled rows, what it skipped, what it wrote."""

    output: Output
    m: Manifest
    name: str
    source: str
    digest: str
    order: np.ndarray  # the shuffled row order
    limit: float  # failures allowed (--max-error-rate x rows)
    max_error_rate: float
    dedup: bool
    result: PackResult
    errors: list[tuple[int, str, str]]
    hashes: dict[str, int]  # content hash -> first row (--dedup)
    position: int  # in `order`: the next row to pack
    failures: int = 0  # errors that count against --max-error-rate (kept up to date: errors can number millions)
    span: dict = field(default_factory=lambda: {"errors": [], "hashes": []})  # since the last published shard
    writer: ShardWriter | None = None

    @property
    def width(self) -> int:
        return max(9, len(str(self.m.total - 1)))

    def errors_file(self) -> str:
        return self.output.location(f"{self.name}-errors.csv")

    def fail(self, message: str) -> PackError:
        write_errors(self.output, self.name, self.errors)
        return PackError(f"{message}; see {self.errors_file()}. No index.json was written")

    def skip(self, row, reason: str, counts: bool = True) -> None:
        """Leave `row` out for `reason`; past --max-error-rate the run stops."""
        self.errors.append((row.row, row.path, reason))
        self.span["errors"].append((row.row, row.path, reason))
        if counts:
            self.failures += 1
            if self.failures > self.limit:
                raise self.fail(f"more than {self.max_error_rate:.1%} of {self.m.total} rows failed "
                                f"(--max-error-rate): {self.failures} failures after {self.position + 1} of "
                                f"{len(self.m.rows)} rows, stopped")

    def save_state(self, info: ShardInfo, idx_text: str) -> None:
        """The resume record of a published shard (the writer calls it)."""
        state = {
            "config": self.digest,
            "shard": vars(info),
            "idx_sha256": hashlib.sha256(idx_text.encode()).hexdigest(),
            "next": self.position,
            "packed": self.result.packed,
            "errors": self.span["errors"],
            "hashes": self.span["hashes"],
        }
        self.output.write_bytes(_state_file(self.name, len(self.writer.shards) - 1), json.dumps(state).encode())
        self.span = {"errors": [], "hashes": []}


def _start(output: Output, m: Manifest, name: str, source: str, seed: int, digest: str, shard_size: int,
           shard_bytes: int | None, max_error_rate: float, dedup: bool) -> _Run:
    """Take over the complete shards of an interrupted run with the same settings, or start afresh."""
    output.remove("index.json")  # the folder stops being a shard set until we finish
    resume = _load_resume(output, name, digest)
    remove_partial_shards(output, name, keep=len(resume.shards))
    result = PackResult({}, resume.packed, rows=m.total, filtered=m.filtered, resumed_shards=len(resume.shards))
    run = _Run(output, m, name, source, digest, np.random.default_rng(seed).permutation(len(m.rows)),
               max_error_rate * m.total, max_error_rate, dedup, result, list(m.errors) + resume.errors,
               dict(resume.hashes), resume.next)
    run.writer = ShardWriter(output, name, shard_size, shard_bytes, shards=resume.shards, on_shard=run.save_state)
    run.failures = _failures(run.errors)
    if run.failures > run.limit:
        raise run.fail(f"{run.failures} of {m.total} rows are malformed ({run.failures / m.total:.1%} > "
                       f"--max-error-rate {max_error_rate:.1%})")
    return run


def _sample(run: _Run, row, ext: str, data: bytes, size: tuple[int, int], original: tuple[int, int]) -> tuple:
    """(key, fields) of the sample made of `row`'s image."""
    m = run.m
    key = f"{run.result.packed:0{run.width}d}" + (f"_{row.key}" if row.key else "")
    meta = {"source": run.source, "path": row.path, "row": row.row, "width": size[0], "height": size[1]}
    if size != original:
        meta["original_width"], meta["original_height"] = original
    if row.meta:
        meta.update(m.extra(row))
    fields = {ext: data}
    if row.label is not None:
        meta["label"] = row.label
        if m.label_names:
            meta["label_name"] = m.label_names[row.label]
        fields["cls"] = str(row.label).encode()
    fields["json"] = json.dumps(meta, sort_keys=True).encode()
    return key, fields


def _take(run: _Run, row, outcome: Outcome) -> bool:
    """Add the sample of `row` to the writer (True), or record why it is left out (False)."""
    if outcome[0]:
        kind, detail = outcome
        run.skip(row, f"{kind} ({detail})" if detail else kind)
        return False
    _, ext, data, w, h, ow, oh, content_hash = outcome
    if run.dedup:
        if content_hash in run.hashes:
            run.skip(row, f"duplicate (of row {run.hashes[content_hash]})", counts=False)
            return False
        run.hashes[content_hash] = row.row
        run.span["hashes"].append((content_hash, row.row))
    key, fields = _sample(run, row, ext, data, (w, h), (ow, oh))
    if not run.writer.fits(key, fields):
        run.writer.flush()  # `position` (this row) is where a resume continues
    run.writer.add(key, fields, flush=False)
    run.result.packed += 1
    return True


def _write_rows(run: _Run, stream: Iterator[Outcome], progress: bool | None) -> None:
    """Pack the outcome of every remaining row, in the shuffled order, publishing shards as they fill."""
    writer, kill_after = run.writer, int(os.environ.get(KILL_ENV, "-1"))
    bar = tqdm(total=len(run.m.rows), initial=run.position, unit="img", file=sys.stderr, mininterval=0.5,
               disable=None if progress is None else not progress, desc=f"packing {run.name}")
    try:
        for outcome in stream:
            added = _take(run, run.m.rows[run.order[run.position]], outcome)
            run.position += 1
            bar.update(1)
            if not added:
                continue
            if writer.full:
                writer.flush()
            if kill_after >= 0 and len(writer.shards) >= kill_after and writer.pending == -(-writer.shard_size // 2):
                os.kill(os.getpid(), signal.SIGKILL)
        writer.flush()
    finally:
        stream.close()  # stops worker processes and threads, also on errors
        bar.close()
        writer.abort()


def _finish(run: _Run, manifest, config: dict) -> PackResult:
    """The errors file, the last checks, and index.json (written last: now the folder is a shard set)."""
    output, name, m, result = run.output, run.name, run.m, run.result
    write_errors(output, name, run.errors)
    if run.failures > run.limit:
        raise PackError(f"{run.failures} of {m.total} rows failed ({run.failures / m.total:.1%} > --max-error-rate "
                        f"{run.max_error_rate:.1%}); see {run.errors_file()}. No index.json was written")
    if result.packed == 0:
        raise PackError(f"no usable rows in {manifest}; see {run.errors_file()}")
    result.errors = sorted(run.errors)
    result.skipped = count_by_kind(run.errors)
    result.duplicates = result.skipped.get("duplicate", 0)
    remove_partial_shards(output, name, keep=len(run.writer.shards))
    packing = {k: config[k] for k in ("shard_size", "shard_bytes", "max_side", "quality", "max_pixels", "decode",
                                      "dedup", "path_column", "caption_column", "key_column")}
    result.index = make_index(
        name, run.writer.shards, source=run.source, seed=config["seed"], manifest=str(manifest),
        manifest_format=m.format, manifest_sha256=m.sha256,
        fields=["image", "json", *(["cls"] if m.label_column else [])],
        labels={"column": m.label_column, "names": m.label_names}, rows=m.total, skipped=result.skipped,
        duplicates=result.duplicates, filtered=m.filtered, packing={**packing, "config_sha256": run.digest},
    )
    write_index(output, result.index)
    output.remove(_state_dir(name))
    return result


# ---------------------------------------------------------------------------------------------------
# Command line.


def default_out(manifest: str) -> str:
    """`shards/<manifest name>`: shards/pool for pool.csv, pool.csv.gz or the folder pool/."""
    name = str(manifest).rstrip("/").rsplit("/", 1)[-1]
    if is_url(str(manifest)) or not os.path.isdir(manifest):
        name = Path(strip_compression(name)).stem
    return os.path.join("shards", name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=tool_prog("pack.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="CSV/TSV (header row), Parquet, YFCC100M metadata file, or a folder of images; "
                                    "local or an fsspec URL, optionally .gz/.bz2/.xz compressed")
    p.add_argument("--out", help="output folder of the shard set, or an fsspec URL (s3://bucket/prefix) (default: "
                                 "shards/<manifest name>, e.g. shards/pool for pool.csv)")
    p.add_argument("--name", help="shard name prefix (default: the output folder's name)")
    p.add_argument("--format", choices=FORMATS, help="manifest format (default: from the name; folder for a folder)")
    p.add_argument("--shard-size", type=count_arg, default=1000, help=f"samples per shard, {COUNT_HELP} (default 1000)")
    p.add_argument("--shard-bytes", type=size_arg, help=f"also start a new shard before passing this size; {SIZE_HELP}")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    p.add_argument("--path-column", help=f"column with image paths or URLs (default: first of {', '.join(PATH_COLUMNS)}"
                                         ")")
    p.add_argument("--label-column", help="column with integer labels or class names (default: 'label' if present)")
    p.add_argument("--caption-column", help="column with a caption, kept in each sample's json")
    p.add_argument("--key-column", help="column with an id appended to each sample key (KEY_ID)")
    p.add_argument("--root-dir", help="folder (or URL) relative paths start from (default: the manifest's); for "
                                      "yfcc, the local mirror holding the images")
    p.add_argument("--path-template", help="yfcc: mirror file name from the YFCC columns (default {id}.jpg; "
                                           "e.g. {hash3}/{hash6}/{hash}.jpg)")
    p.add_argument("--labels-from-subfolders", action=argparse.BooleanOptionalAction, default=False,
                   help="folder input: label = top-level subfolder (default: off)")
    p.add_argument("--source", choices=SOURCES, help="recorded in index.json and each sample's json "
                                                     "(default: yfcc for --format yfcc, else real)")
    p.add_argument("--max-side", type=positive_int, help="re-encode images whose longer side is larger, down to this "
                                                      "(JPEG, aspect kept); others keep their original bytes")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--max-pixels", type=count_arg, default=MAX_PIXELS,
                   help=f"refuse larger images as possible decompression bombs, {COUNT_HELP} (default {MAX_PIXELS})")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=False,
                   help="fully decode every image to catch damaged data (slower; default: off)")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=False,
                   help="drop exact duplicate images (content hash); listed in the errors file, not counted as errors "
                        "(default: off)")
    p.add_argument("--max-error-rate", type=float, default=0.05, help="fail past this fraction of bad rows (0.05)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes checking/encoding images (default 1)")
    p.add_argument("--threads", type=positive_int, help="I/O threads per worker (default 8 for URLs, else 1)")
    p.add_argument("--storage-options", type=storage_options_arg, help=STORAGE_OPTIONS_HELP)
    p.add_argument("--tmp-dir", help="local folder for staging shards of a remote --out (default: system temp)")
    progress_switch(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    out = a.out or default_out(a.manifest)

    def run() -> int:
        r = pack(a.manifest, out, a.name, a.shard_size, a.seed, a.path_column, a.label_column, a.root_dir, a.source,
                 a.max_error_rate, format=a.format, caption_column=a.caption_column, key_column=a.key_column,
                 path_template=a.path_template, labels_from_subfolders=a.labels_from_subfolders,
                 shard_bytes=a.shard_bytes, max_side=a.max_side, quality=a.quality, max_pixels=a.max_pixels,
                 decode=a.decode, dedup=a.dedup, workers=a.workers, threads=a.threads,
                 storage_options=a.storage_options, tmp_dir=a.tmp_dir, progress=a.progress)
        print(r.summary(out))
        return 0

    return run_main("pack", run, log_folder=out)


if __name__ == "__main__":
    sys.exit(main())
