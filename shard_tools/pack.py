"""Pack images listed in a manifest (CSV, TSV, Parquet, YFCC100M metadata or a folder) into a shard set.

    shard-tools pack manifest.csv --out shards/pool --name pool --shard-size 1000 --seed 0
    shard-tools pack images/ --labels-from-subfolders --out shards/train
    shard-tools pack yfcc100m_dataset.bz2 --format yfcc --root-dir /data/yfcc --out s3://b/yfcc

Rows are shuffled globally (seeded) before writing, so any prefix of shards is a uniform random subset.
Images keep their original bytes unless --max-side asks to re-encode the larger ones. Rows that cannot be
packed (missing or unreadable file, empty file, not an image, corrupt image, over the pixel cap, malformed
row) are skipped, never fatal alone, and listed in `OUT/NAME-errors.csv` (row, path, reason); the run fails
with a one-line reason when they pass --max-error-rate. A row with an empty label is packed without one (no
.cls member), and counted (`labels.unlabeled` in index.json); --no-labels (--label-column '') ignores labels.

Shards: the shuffled order is cut into blocks of --shard-size positions, and block k becomes shard k
(`NAME-00000k.tar`) holding the block's rows that could be packed, so a skipped row leaves its shard one
sample short. Sample keys are the shuffled positions.

Crash safety: each shard is written under a temporary name and published whole, with a small record of its
block in `OUT/.NAME-pack/`; `index.json` is written last. Running the same command again after a crash
keeps the complete blocks whose checksums still match and writes the others; the result is byte for
byte what an uninterrupted run writes. The output does not depend on --workers or --threads.

Many machines: `--part K/N` writes only the shards of part K of N (reading the manifest twice, holding only
its own rows), each part resumable as above, and `--merge` writes `index.json` once all N are done:

    pack.py manifest.csv --out /shared/pool --part 3/16 ...     # parts 1/16 .. 16/16, anywhere, any order
    pack.py --out /shared/pool --merge      # finds the parts' --name; give it if runs of several names are there

The result is byte for byte what one run writes (launch/slurm_pack.sbatch runs the parts as a SLURM array).
`--plan-only` reads the manifest and assigns rows to shards without writing or opening images.
"""

from __future__ import annotations

import functools
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL
from tqdm import tqdm

from shard_tools.cli import run_main, tool_prog
from shard_tools.errors import (
    ShardSetTotals,
    ToolError,
    count_by_kind,
    error_kind,
    positive_int,
    read_errors,
    shard_set_name,
    write_errors,
)
from shard_tools.images import MAX_PIXELS, ImageError, check_image
from shard_tools.manifest import FORMATS, PATH_COLUMNS, Manifest, label_ids, read_manifest, strip_compression
from shard_tools.outputs import Output, open_output
from shard_tools.parts import (
    PART_RECORD,
    Assigner,
    Layout,
    Part,
    block_of,
    block_record_path,
    clean_part,
    errors_stem,
    kept_blocks,
    part_arg,
    part_errors_file,
    part_record_names,
    part_record_path,
    piece_name,
    read_record,
    state_dir,
    write_record,
)
from shard_tools.processes import KILL_ENV, die_with_parent
from shard_tools.quantities import COUNT_HELP, SIZE_HELP, count_arg, format_bytes, plural, size_arg
from shard_tools.settings import (
    check_choices,
    config_sha256,
    configure,
    digest_of,
    options_of,
    parse_settings,
    progress_setting,
    setting,
    settings_parser,
)
from shard_tools.shardset import ShardInfo, finished_index, idx_name, shard_name
from shard_tools.shuffle import Shuffle
from shard_tools.storage import STORAGE_OPTIONS_HELP, is_url, read_location, storage_options_arg
from shard_tools.writer import ShardWriter, make_index, write_index

__all__ = ["PATH_COLUMNS", "MAX_PIXELS", "PackCommand", "PackError", "PackResult", "PackSettings", "Part", "PartPlan",
           "inspect_image", "label_ids", "merge", "pack", "plan", "main"]

SOURCES = ("real", "yfcc", "crawled", "generated", "downstream")
PACK_VERSION = 3  # bump when the bytes written for the same inputs change (3: shards are blocks of positions)
NOT_ERRORS = ("duplicate",)  # skipped on purpose: listed, but not counted against --max-error-rate


PARTS = "packing in parts (many machines: see docs/packing-at-scale.md)"


@dataclass
class PackSettings:
    """What pack() and plan() take besides the manifest and the output: one field per option of the command
    line (the same name, with dashes), its help, choices and default. `digest` marks what shapes the bytes
    written: their digest (see `_digest_settings`) tells a resumable run from another one."""

    name: str | None = setting(None, "shard name prefix (default: the output folder's name)", digest=True)
    format: str | None = setting(None, "manifest format (default: from the name; folder for a folder)", FORMATS,
                                 digest=True)
    shard_size: int = setting(1000, f"samples per shard, {COUNT_HELP}", parse=count_arg, digest=True)
    shard_bytes: int | None = setting(None, f"also start a new shard before passing this size; {SIZE_HELP}",
                                      parse=size_arg, digest=True)
    seed: int = setting(0, "seed of the global shuffle", digest=True)
    path_column: str | None = setting(None, "column with image paths or URLs (default: first of "
                                            f"{', '.join(PATH_COLUMNS)})", digest=True)
    label_column: str | None = setting(None, "column with integer labels or class names; a row with an empty cell "
                                             "is packed without a label; '' reads no labels (default: 'label' if "
                                             "present)", digest=True)
    caption_column: str | None = setting(None, "column with a caption, kept in each sample's json", digest=True)
    key_column: str | None = setting(None, "column with an id appended to each sample key (KEY_ID)", digest=True)
    root_dir: str | None = setting(None, "folder (or URL) relative paths start from (default: the manifest's); for "
                                         "yfcc, the local mirror holding the images", digest="root")
    path_template: str | None = setting(None, "yfcc: mirror file name from the YFCC columns (default {id}.jpg; "
                                              "e.g. {hash3}/{hash6}/{hash}.jpg)")
    labels_from_subfolders: bool = setting(False, "folder input: label = top-level subfolder")
    source: str | None = setting(None, "recorded in index.json and each sample's json (default: yfcc for --format "
                                       "yfcc, else real)", SOURCES, digest=True)
    max_side: int | None = setting(None, "re-encode images whose longer side is larger, down to this (JPEG, aspect "
                                         "kept); others keep their original bytes", parse=positive_int, digest=True)
    quality: int = setting(90, "JPEG quality of re-encoded images", digest=True)
    max_pixels: int = setting(MAX_PIXELS, f"refuse larger images as possible decompression bombs, {COUNT_HELP}",
                              parse=count_arg, digest=True)
    decode: bool = setting(False, "fully decode every image to catch damaged data (slower)", digest=True)
    dedup: bool = setting(False, "drop exact duplicate images (content hash); listed in the errors file, not counted "
                                 "as errors (not with --part)", digest=True)
    max_error_rate: float = setting(0.05, "fail past this fraction of bad rows")
    workers: int = setting(1, "processes checking/encoding images", parse=positive_int)
    threads: int | None = setting(None, "I/O threads per worker (default 8 for URLs, else 1)", parse=positive_int)
    storage_options: dict | None = setting(None, STORAGE_OPTIONS_HELP, parse=storage_options_arg)
    tmp_dir: str | None = setting(None, "local folder for staging shards of a remote --out (default: system temp)")
    overwrite: bool = setting(False, "replace a finished shard set of other settings in --out (default: off: stop)")
    part: Part | None = setting(None, "K/N: write only the shards of part K of N (counted from 1), e.g. 3/16; every "
                                      "part gets the same other options, then --merge (launch/slurm_pack.sbatch runs "
                                      "the parts as a SLURM array)", parse=part_arg, group=PARTS)
    progress: bool | None = progress_setting(False)


@dataclass
class _Where:
    """What pack.py reads and where it writes (first in its `--help`)."""

    manifest: str | None = setting(None, "CSV/TSV (header row), Parquet, YFCC100M metadata file, or a folder of "
                                         "images; local or an fsspec URL, optionally .gz/.bz2/.xz compressed (not "
                                         "with --merge)", positional=True)
    out: str | None = setting(None, "output folder of the shard set, or an fsspec URL (s3://bucket/prefix) "
                                    "(default: shards/<manifest name>, e.g. shards/pool for pool.csv)")


@dataclass
class PackCommand(PackSettings, _Where):
    """The command line of pack.py: the manifest and the output, PackSettings, and what only the command does."""

    labels: bool = setting(True, "read labels from --label-column (or a 'label' column); --no-labels packs every row "
                                 "without one, as --label-column '' does")
    merge: bool = setting(False, "write index.json of --out once all its parts are done (no manifest; the parts' "
                                 "--name is found in --out unless given; names the parts still missing otherwise; "
                                 "checks the highest --max-error-rate the parts ran with)", group=PARTS)
    plan_only: bool = setting(False, "read the manifest and assign the rows (of --part) to shards, write nothing, "
                                     "print the shards, the time and the peak memory (image paths need not exist)",
                              group=PARTS)
    progress: bool | None = progress_setting(None)


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
    part: str = ""  # "K/N" for one part of a run in parts: then `index` is the part's record (its shards)
    merged: int = 0  # parts whose records made index.json (1 for the whole run)
    unlabeled: int = 0  # samples packed without a label (no .cls) although the manifest has a label column

    def summary(self, out: str = "") -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        where = f" at {out}" if out else ""
        if self.merged > 1:
            line = (f"merged {self.merged} parts: {self.packed} of {plural(self.rows, 'row')} in "
                    f"{plural(self.shards, 'shard')} ({self.bytes / 1e6:.1f} MB){where}; skipped "
                    f"{sum(self.skipped.values())}: {skipped}")
        else:
            rows = plural(self.rows, "row")
            if self.part:
                lo, hi = self.index["positions"]
                rows = f"the {plural(hi - lo, 'row')} of part {self.part} (of {self.rows})"
            line = (f"packed {self.packed} of {rows} into {plural(self.shards, 'shard')} ({self.bytes / 1e6:.1f} MB)"
                    f"{where} in {self.seconds:.1f}s ({self.packed / max(self.seconds, 1e-9):.0f} images/s); skipped "
                    f"{sum(self.skipped.values())}: {skipped}")
        if self.unlabeled:
            line += f"; {plural(self.unlabeled, 'sample')} without a label (no .cls)"
        if self.filtered:
            line += "; left out: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered.items()))
        if self.resumed_shards:
            line += f"; resumed after {plural(self.resumed_shards, 'complete shard')}"
        if self.already_complete:
            line += " (already complete: nothing rewritten)"
        if self.part:
            name = self.index["settings"]["name"]
            named = "" if not out or name == out.rstrip("/").rsplit("/", 1)[-1] else f" --name {name}"
            line += f"; once all {self.part.split('/')[1]} parts are done: pack.py --out {out or 'OUT'}{named} --merge"
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
# Reading the manifest: the whole run keeps every row; a part reads it twice, the second time keeping its own.


class _CountOnly:
    """The sink of a part's first read: the reader counts the rows and collects their labels, building none."""

    def wants(self, index: int) -> bool:
        return False

    def __call__(self, row) -> None:
        raise AssertionError("a row nobody wanted")


def _owned_rows(m: Manifest, read: Callable[..., Manifest], seed: int, layout: Layout) -> tuple[np.ndarray, list]:
    """(positions, rows) of the rows the run packs, in shuffled order. The whole run hands its rows over from
    memory; a part reads the manifest again, keeping only the rows whose positions fall in its blocks."""
    lo, hi = layout.span
    assign = Assigner(Shuffle(m.usable, seed), lo, hi)
    if m.rows:
        assign.extend(m.rows)
        m.rows = []  # the assigner holds them now, in shuffled order
        return assign.result()
    again = read(rows=assign)
    positions, rows = assign.result()
    if (again.sha256, again.usable) != (m.sha256, m.usable) or len(positions) != hi - lo:
        raise PackError(f"{m.source} changed between two reads; pack it again once it stays the same")
    return positions, [m.label_id(r) for r in rows]


def _reader(manifest, s: PackSettings) -> Callable[..., Manifest]:
    """read(rows=None): the manifest read with the settings' options (see read_manifest)."""
    return functools.partial(read_manifest, manifest, s.format, s.path_column, s.label_column, s.caption_column,
                             s.key_column, s.root_dir, s.path_template, s.labels_from_subfolders, s.storage_options)


def _none_usable(manifest, total: int) -> str:
    return f"no usable rows in {manifest}: " + ("its one row is malformed" if total == 1 else
                                                 f"all {total} are malformed")


def _failures(errors: list[tuple[int, str, str]]) -> int:
    return sum(1 for _, _, reason in errors if error_kind(reason) not in NOT_ERRORS)


# ---------------------------------------------------------------------------------------------------


def pack(manifest: str | Path, out: str | Path, settings: PackSettings | None = None, **options) -> PackResult:
    """Pack `manifest` into the shard set `out` (a folder or an fsspec URL such as s3://bucket/prefix), with
    `settings` and keyword `options` named like its fields (pack(m, out, name="pool", shard_size=500)).

    `source` defaults to 'yfcc' for --format yfcc, else 'real'. Rows with an empty label are packed without one;
    `label_column` '' reads no labels at all. `progress` None shows the bar on a terminal. A
    finished shard set of other settings (another manifest, seed, ...) in `out` is replaced only with `overwrite`.
    `part` (Part(K, N)) writes only the shards of part K of N (see shard_tools/parts.py); `merge` then writes
    index.json once every part is done. Raises ManifestError / PackError (ToolError: ordinary exceptions with a one-
    line message) when the run fails as a whole. The phases: check the settings, read the manifest, resume or start,
    write, record the part, merge (the whole run).
    """
    start, out, s = time.perf_counter(), str(out), configure(PackSettings, settings, options)
    part = s.part or Part()
    name = _check_settings(out, s)
    read = _reader(manifest, s)
    m: Manifest = read() if part.whole else read(rows=_CountOnly())
    s = _resolved(s, m, name)
    config = _digest_settings(s, m)
    digest = config_sha256(config)
    output = open_output(out, s.storage_options, s.tmp_dir)
    try:
        output.lock(f"pack.py --name {name}" + ("" if part.whole else f" --part {part}"), part.scope)
        if not m.usable:
            write_errors(output, errors_stem(name, part), m.errors)
            raise PackError(f"{_none_usable(manifest, m.total)}; see "
                            f"{output.location(errors_stem(name, part) + '-errors.csv')}")
        layout = Layout(m.usable, s.shard_size, part)
        done = finished_index(output, "packing", digest, name, lambda path: layout.writes(block_of(name, path)))
        if done is not None:  # a part checks its own shards only: the others' are theirs to check
            output.remove(state_dir(name))  # left behind if a run was killed right after writing index.json
            return _finished(output, name, done, m, start)
        if not s.overwrite and _other_settings(output, digest):
            raise PackError(f"{out} holds a finished shard set packed from another manifest or with other settings; "
                            "use --overwrite to replace it, or choose another --out")
        positions, rows = _owned_rows(m, read, s.seed, layout)
        run = _start(output, m, layout, name, s.source, digest, s.shard_bytes, s.max_error_rate, s.dedup)
        opts = ImageOptions(s.max_pixels, s.decode, s.max_side, s.quality, s.dedup, s.storage_options)
        _write_part(run, positions, rows, opts, s.workers, s.threads, s.progress)
        record = _record_part(run, manifest, config)
        result = _merge(output, name) if part.whole else _part_result(record, m)
        result.resumed_shards = sum(len(r["shards"]) for r in run.kept.values())
        result.seconds = time.perf_counter() - start
        return result
    finally:
        output.close()


def _finished(output: Output, name: str, index: dict, m: Manifest, start: float) -> PackResult:
    """The result of a run whose shard set is already complete (its index.json)."""
    errors = read_errors(output, name)
    return PackResult(index, index["num_samples"], count_by_kind(errors), errors, time.perf_counter() - start,
                      m.total, index.get("duplicates", 0), m.filtered, len(index["shards"]), True,
                      unlabeled=_unlabeled(index))


def _unlabeled(index: dict) -> int:
    """The samples of a packed set (its index.json) that have no label although the manifest had a label column."""
    return (index.get("labels") or {}).get("unlabeled", 0)


def _other_settings(output: Output, digest: str) -> bool:
    """Whether `output` holds a finished shard set whose settings digest is not `digest`."""
    data = output.read_bytes("index.json")
    try:
        return data is not None and (json.loads(data).get("packing") or {}).get("config_sha256") != digest
    except ValueError:
        return False  # a damaged index.json is no finished set


def _check_settings(out: str, s: PackSettings) -> str:
    """Raise PackError for a setting out of range; returns the shard name (default: the folder's name)."""
    name = shard_set_name(out, s.name, PackError)
    check_choices(s, PackError)
    if s.shard_size < 1:
        raise PackError("--shard-size must be >= 1")
    if s.max_side is not None and s.max_side < 1:
        raise PackError("--max-side must be >= 1")
    if not 1 <= s.quality <= 100:
        raise PackError("--quality must be in 1..100")
    if not 0 <= s.max_error_rate <= 1:
        raise PackError("--max-error-rate must be in 0..1")
    if s.dedup and s.part is not None and not s.part.whole:
        raise PackError(f"--dedup with --part {s.part}: a duplicate is judged against every image before it in the "
                        "whole shuffled order, which no part sees; pack with --dedup in one run, or without it")
    return name


def _resolved(s: PackSettings, m: Manifest, name: str) -> PackSettings:
    """The settings as the run uses them: the shard name, the source, and the manifest's format and columns as
    its reader chose them."""
    return replace(s, name=name, source=s.source or ("yfcc" if m.format == "yfcc" else "real"),
                    format=m.format, path_column=m.path_column, label_column=m.label_column,
                    caption_column=m.caption_column, key_column=m.key_column)


def _digest_settings(s: PackSettings, m: Manifest) -> dict:
    """Everything that shapes the bytes written (`s` resolved): the settings declared with `digest`, the pack
    version and the manifest's checksum. Its digest tells a resumable run from another one. The quality and the
    encoder count only when images are re-encoded; rows without a label are named only when there are some (pack
    version 3 refused them), so the sets it packed keep their digest."""
    return {
        **digest_of(s),
        "pack_version": PACK_VERSION,
        "manifest_sha256": m.sha256,
        "quality": s.quality if s.max_side else None,
        "encoder": PIL.__version__ if s.max_side else None,
        **({"unlabeled_rows": m.unlabeled} if m.unlabeled else {}),
    }


@dataclass
class _Run:
    """One pack run (the whole manifest or one part) in progress: its blocks, what it skipped and wrote."""

    output: Output
    m: Manifest
    name: str
    source: str
    digest: str
    layout: Layout
    shard_bytes: int | None
    limit: float  # failures allowed (--max-error-rate x rows)
    max_error_rate: float
    dedup: bool
    kept: dict[int, dict]  # blocks finished by an earlier run (their records), by number
    errors: list[tuple[int, str, str]]  # skipped rows so far (part 1 also lists the manifest's malformed rows)
    hashes: dict[str, int]  # content hash -> first row (--dedup)
    blocks: dict[int, dict] = field(default_factory=dict)  # every finished block's record: kept, then written
    failures: int = 0  # errors that count against --max-error-rate (kept up to date: errors can number millions)
    done: int = 0  # rows handled, those of kept blocks included
    published: int = 0  # blocks finished by this process (the KILL_ENV test hook counts them)
    span: dict = field(default_factory=lambda: {"errors": [], "hashes": [], "unlabeled": 0})  # of the block being
    # written: its skipped rows, content hashes (--dedup) and samples without a label
    block: int = -1  # the block being written
    writer: ShardWriter | None = None
    idx_sha256: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return max(9, len(str(self.m.total - 1)))

    def errors_file(self) -> str:
        return self.output.location(f"{errors_stem(self.name, self.layout.part)}-errors.csv")

    def fail(self, message: str) -> PackError:
        write_errors(self.output, errors_stem(self.name, self.layout.part), self.errors)
        return PackError(f"{message}; see {self.errors_file()}. No index.json was written")

    def skip(self, row, reason: str, counts: bool = True) -> None:
        """Leave `row` out for `reason`; past --max-error-rate the run stops."""
        self.errors.append((row.row, row.path, reason))
        self.span["errors"].append((row.row, row.path, reason))
        if counts:
            self.failures += 1
            if self.failures > self.limit:
                lo, hi = self.layout.span
                where = "" if self.layout.part.whole else f" of part {self.layout.part}"
                raise self.fail(f"more than {self.max_error_rate:.1%} of {plural(self.m.total, 'row')} failed "
                                f"(--max-error-rate): {plural(self.failures, 'failure')} after {self.done + 1} of "
                                f"{plural(hi - lo, 'row')}{where}, stopped")

    def begin_block(self, block: int) -> None:
        self.block, self.idx_sha256 = block, []
        self.writer = ShardWriter(self.output, self.name, self.layout.shard_size, self.shard_bytes,
                                  on_shard=lambda info, idx: self.idx_sha256.append(hashlib.sha256(idx.encode())
                                                                                    .hexdigest()),
                                  names=lambda i: piece_name(self.name, block, i))

    def finish_block(self) -> None:
        """Publish the block's last shard, then its record: from now on a resumed run keeps the block."""
        self.writer.flush()
        shards = [vars(s) for s in self.writer.shards]
        record = {"config": self.digest, "block": self.block, "shards": shards, "idx_sha256": self.idx_sha256,
                  "packed": sum(s["samples"] for s in shards), **self.span}
        write_record(self.output, block_record_path(self.name, self.block), record)
        self.blocks[self.block] = record
        self.span, self.writer = {"errors": [], "hashes": [], "unlabeled": 0}, None
        self.published += 1


def _start(output: Output, m: Manifest, layout: Layout, name: str, source: str, digest: str,
           shard_bytes: int | None, max_error_rate: float, dedup: bool) -> _Run:
    """Keep the intact blocks of an interrupted run with the same settings, clear the rest of the part's share."""
    output.remove("index.json")  # the folder stops being a shard set until the merge
    kept = kept_blocks(output, name, digest, layout, prefix_only=dedup)
    clean_part(output, name, digest, layout, kept)
    kept_errors = [(int(a), str(b), str(c)) for r in kept.values() for a, b, c in r["errors"]]
    run = _Run(output, m, name, source, digest, layout, shard_bytes, max_error_rate * m.total, max_error_rate, dedup,
               kept, (list(m.errors) if layout.part.index == 1 else []) + kept_errors,
               {h: int(row) for r in kept.values() for h, row in r["hashes"]}, dict(kept))
    run.failures = _failures(m.errors) + _failures(kept_errors)
    if run.failures > run.limit:
        raise run.fail(f"{run.failures} of {plural(m.total, 'row')} {'is' if run.failures == 1 else 'are'} "
                       f"malformed ({run.failures / m.total:.1%} > --max-error-rate {max_error_rate:.1%})")
    return run


def _sample(run: _Run, position: int, row, ext: str, data: bytes, size: tuple[int, int],
            original: tuple[int, int]) -> tuple:
    """(key, fields) of the sample made of `row`'s image; the key is its shuffled position."""
    m = run.m
    key = f"{position:0{run.width}d}" + (f"_{row.key}" if row.key else "")
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


def _take(run: _Run, position: int, row, outcome: Outcome) -> None:
    """Add the sample of `row` to its block's shard, or record why it is left out."""
    if outcome[0]:
        kind, detail = outcome
        run.skip(row, f"{kind} ({detail})" if detail else kind)
        return
    _, ext, data, w, h, ow, oh, content_hash = outcome
    if run.dedup:
        if content_hash in run.hashes:
            run.skip(row, f"duplicate (of row {run.hashes[content_hash]})", counts=False)
            return
        run.hashes[content_hash] = row.row
        run.span["hashes"].append((content_hash, row.row))
    run.writer.add(*_sample(run, position, row, ext, data, (w, h), (ow, oh)))
    if row.label is None and run.m.label_column is not None:
        run.span["unlabeled"] += 1


def _write_part(run: _Run, positions: np.ndarray, rows: list, opts: ImageOptions, workers: int,
                threads: int | None, progress: bool | None) -> None:
    """Pack the rows of every block not kept from an earlier run, in shuffled order, block after block."""
    size = run.layout.shard_size
    todo = np.flatnonzero(~np.isin(positions // size, np.fromiter(run.kept, np.int64, len(run.kept))))
    run.done = len(rows) - len(todo)
    threads = threads or (8 if rows and is_url(run.m.location(rows[0])) else 1)
    stream = outcomes((run.m.location(rows[i]) for i in todo), opts, workers, threads)
    kill_after, half = int(os.environ.get(KILL_ENV, "-1")), -(-size // 2)
    bar = tqdm(total=len(rows), initial=run.done, unit="img", file=sys.stderr, mininterval=0.5,
               disable=None if progress is None else not progress, desc=f"packing {run.name}")
    try:
        for i, outcome in zip(todo, stream):
            position = int(positions[i])
            if position // size != run.block:
                if run.writer is not None:
                    run.finish_block()
                run.begin_block(position // size)
            _take(run, position, rows[i], outcome)
            run.done += 1
            bar.update(1)
            if 0 <= kill_after <= run.published and run.writer.pending == half:
                os.kill(os.getpid(), signal.SIGKILL)
        if run.writer is not None:
            run.finish_block()
    finally:
        stream.close()  # stops worker processes and threads, also on errors
        bar.close()
        if run.writer is not None:
            run.writer.abort()


def _record_part(run: _Run, manifest, config: dict) -> dict:
    """The part's record (what the merge needs of it), written once its last block is finished."""
    m, layout = run.m, run.layout
    blocks = [run.blocks[b] for b in range(layout.first, layout.stop)]
    errors = (list(m.errors) if layout.part.index == 1 else []) + [e for b in blocks for e in b["errors"]]
    record = {
        "config": run.digest, "part": layout.part.index, "parts": layout.part.count,
        "blocks": [layout.first, layout.stop], "positions": list(layout.span), "settings": config,
        "max_error_rate": run.max_error_rate, "manifest": str(manifest),
        "summary": {"format": m.format, "sha256": m.sha256, "rows": m.total, "usable": m.usable,
                    "label_column": m.label_column, "label_names": m.label_names, "filtered": m.filtered,
                    "unlabeled_rows": m.unlabeled},
        "shards": [s for b in blocks for s in b["shards"]], "packed": sum(b["packed"] for b in blocks),
        "unlabeled": sum(b.get("unlabeled", 0) for b in blocks),  # records of pack version 3 have none
        "errors": sorted([int(a), str(b), str(c)] for a, b, c in errors),
    }
    write_record(run.output, part_record_path(run.name, layout.part), record)
    return record


def _part_result(record: dict, m: Manifest) -> PackResult:
    errors = [(a, b, c) for a, b, c in record["errors"]]
    skipped = count_by_kind(errors)
    return PackResult(record, record["packed"], skipped, errors, rows=m.total, duplicates=skipped.get("duplicate", 0),
                      filtered=m.filtered, part=f"{record['part']}/{record['parts']}", unlabeled=record["unlabeled"])


# ---------------------------------------------------------------------------------------------------
# The merge: index.json from the records of the parts.


def merge(out: str | Path, name: str | None = None, storage_options: dict | None = None,
          tmp_dir: str | Path | None = None) -> PackResult:
    """Write `index.json` (and NAME-errors.csv) of the shard set that the parts of a `pack(..., part=...)` run
    wrote into `out`, once every part is done; raises PackError naming the parts still missing otherwise.
    The error rate is checked against the highest --max-error-rate the parts ran with. Without `name`, the
    parts' own (see _merge_name)."""
    start, out = time.perf_counter(), str(out)
    if name is not None:
        name = shard_set_name(out, name, PackError)
    try:
        output = open_output(out, storage_options, tmp_dir, create=False)
    except FileNotFoundError:
        raise PackError(f"{out}: no such folder; pack the parts into it first (--part K/N)") from None
    try:
        name = name or _merge_name(output, out)
        output.lock(f"pack.py --merge --name {name}")
        result = _merge(output, name)
        result.seconds = time.perf_counter() - start
        return result
    finally:
        output.close()


def _merge_name(output: Output, out: str) -> str:
    """The --name of the parts in `output`, for a merge not given one: the one name whose parts left records, else
    (merged already) the name in index.json, else the folder's name. Records of several names: PackError."""
    names = part_record_names(output)
    if len(names) > 1:
        raise PackError(f"{output.url} holds parts of runs named {', '.join(names)}; say which to merge with --name")
    if names:
        return names[0]
    index = read_record(output, "index.json")
    if index is not None and "packing" in index and isinstance(index.get("name"), str):
        return index["name"]
    return shard_set_name(out, None, PackError)


def _merge(output: Output, name: str) -> PackResult:
    records = _part_records(output, name)
    if records is None:
        return _merged_before(output, name)
    first = records[0]
    shards = [ShardInfo(**s) for r in records for s in r["shards"]]
    _check_files(output, records)
    errors = sorted((int(a), str(b), str(c)) for r in records for a, b, c in r["errors"])
    failures, total = _failures(errors), first["summary"]["rows"]
    rate = max(r["max_error_rate"] for r in records)
    errors_file = output.location(f"{name}-errors.csv")
    write_errors(output, name, errors)
    if failures > rate * total:
        raise PackError(f"{failures} of {plural(total, 'row')} failed ({failures / total:.1%} > --max-error-rate "
                        f"{rate:.1%}); see {errors_file}. No index.json was written")
    packed = sum(r["packed"] for r in records)
    if packed == 0:
        raise PackError(f"no usable rows in {first['manifest']}; see {errors_file}")
    skipped = count_by_kind(errors)
    unlabeled = sum(r.get("unlabeled", 0) for r in records)
    index = _index(name, shards, first, skipped, unlabeled)
    write_index(output, index)
    output.remove(state_dir(name))
    leftovers = part_errors_file(name)
    for entry in output.list():
        if leftovers.match(entry):
            output.remove(entry)
    return PackResult(index, packed, skipped, errors, rows=total, duplicates=skipped.get("duplicate", 0),
                      filtered=first["summary"]["filtered"], merged=len(records), unlabeled=unlabeled)


def _part_records(output: Output, name: str) -> list[dict] | None:
    """The records of parts 1..N of one run, in order; None when there are none. Raises PackError naming the
    parts that have not finished, or when the records come from different runs."""
    state = state_dir(name)
    records = [read_record(output, f"{state}/{n}") for n in output.list(state) if PART_RECORD.match(n)]
    records = [r for r in records if r is not None]
    if not records:
        return None
    runs = sorted({(r["parts"], r["config"][:12]) for r in records})
    if len(runs) > 1:
        shown = ", ".join(f"{plural(n, 'part')} with settings {d}" for n, d in runs)
        raise PackError(f"{output.url} holds finished parts of {len(runs)} different runs (parts, settings: {shown}); "
                        "run every part with one command line, then --merge")
    count = records[0]["parts"]
    by_index = {r["part"]: r for r in records}
    missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in by_index]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        what = f"parts {shown} of {name} have" if len(missing) > 1 else f"part {shown} of {name} has"
        raise PackError(f"{what} not finished in {output.url}: run {'them' if len(missing) > 1 else 'it'} (pack.py "
                        f"MANIFEST --out {output.url} --part K/{count} ...), then --merge again. No index.json was "
                        "written")
    return [by_index[k] for k in range(1, count + 1)]


def _check_files(output: Output, records: list[dict]) -> None:
    """Every shard the parts recorded is in the folder with its .idx (a listing, not a checksum: each part
    checked its own shards as it wrote or resumed them)."""
    present = set(output.list())
    lost = {r["part"] for r in records for s in r["shards"]
            if s["path"] not in present or idx_name(s["path"]) not in present}
    if lost:
        parts = ", ".join(f"{k}/{records[0]['parts']}" for k in sorted(lost))
        which, again = (f"parts {parts}", "those parts") if len(lost) > 1 else (f"part {parts}", "that part")
        raise PackError(f"shards of {which} are missing from {output.url}; run {again} again, then --merge")


def _merged_before(output: Output, name: str) -> PackResult:
    """The result of a merge that already happened (index.json of a packed set named `name`), else PackError."""
    data = output.read_bytes("index.json")
    index = json.loads(data) if data else {}
    if not isinstance(index, dict) or "packing" not in index or index.get("name") != name:
        others = part_record_names(output)
        hint = (f"; the parts there are named {', '.join(others)}: merge with --name "
                f"{others[0] if len(others) == 1 else 'NAME'}" if others else "; run the parts (--part K/N) first")
        raise PackError(f"no part of {name} has finished in {output.url} (no records in "
                        f"{output.location(state_dir(name))}){hint}")
    errors = read_errors(output, name)
    return PackResult(index, index["num_samples"], count_by_kind(errors), errors, rows=index.get("rows", 0),
                      duplicates=index.get("duplicates", 0), filtered=index.get("filtered", {}), already_complete=True,
                      unlabeled=_unlabeled(index))


def _index(name: str, shards: list[ShardInfo], record: dict, skipped: dict[str, int], unlabeled: int) -> dict:
    """index.json of the set, from part 1's record (every part has the same settings and manifest summary).
    With a label column, `labels.unlabeled` counts the samples without a label (no .cls; the loader's label -1),
    and `fields` holds "cls" unless no row has a label."""
    settings, summary = record["settings"], record["summary"]
    column = summary["label_column"]
    labels = {"column": column, "names": summary["label_names"], **({"unlabeled": unlabeled} if column else {})}
    labelled = column is not None and summary.get("unlabeled_rows", 0) < summary["usable"]
    packing = {k: settings[k] for k in ("shard_size", "shard_bytes", "max_side", "quality", "max_pixels", "decode",
                                        "dedup", "path_column", "caption_column", "key_column")}
    return make_index(
        name, shards, source=settings["source"], seed=settings["seed"], manifest=record["manifest"],
        manifest_format=summary["format"], manifest_sha256=summary["sha256"],
        fields=["image", "json", *(["cls"] if labelled else [])], labels=labels, rows=summary["rows"],
        skipped=skipped, duplicates=skipped.get("duplicate", 0), filtered=summary["filtered"],
        packing={**packing, "config_sha256": record["config"]},
    )


# ---------------------------------------------------------------------------------------------------
# A dry run: which rows and shards a part gets, what reading the manifest costs.


@dataclass
class PartPlan:
    name: str
    part: Part
    rows: int  # manifest rows (malformed ones included)
    usable: int
    layout: Layout
    part_rows: int
    seconds: tuple[float, float]  # first read, then the assignment (a second read for a part)
    peak_bytes: int  # the process's peak resident memory so far

    def summary(self) -> str:
        lay, total = self.layout, sum(self.seconds)
        shards = (f"shards {lay.first}..{lay.stop - 1} of {lay.blocks} ({shard_name(self.name, lay.first)} .. "
                  f"{shard_name(self.name, lay.stop - 1)})" if lay.stop > lay.first else
                  f"none of the {plural(lay.blocks, 'shard')}")
        return (f"part {self.part}: {self.part_rows} of {plural(self.usable, 'usable row')} "
                f"({plural(self.rows, 'row')}, "
                f"{lay.shard_size} per shard) -> {shards}; read {self.seconds[0]:.1f}s + assign "
                f"{self.seconds[1]:.1f}s ({self.rows / max(total, 1e-9):.0f} manifest rows/s); peak memory "
                f"{format_bytes(self.peak_bytes)}")


def plan(manifest: str | Path, out: str | Path, settings: PackSettings | None = None, **options) -> PartPlan:
    """Read the manifest and assign the rows of the settings' `part` to its shards as pack() does, writing nothing
    (images are not opened: their paths need not exist). Times both steps and reports the peak memory."""
    import resource

    s = configure(PackSettings, settings, options)
    part = s.part or Part()
    name = _check_settings(str(out), s)
    read = _reader(manifest, s)
    t0 = time.perf_counter()
    m = read() if part.whole else read(rows=_CountOnly())
    t1 = time.perf_counter()
    if not m.usable:
        raise PackError(_none_usable(manifest, m.total))
    layout = Layout(m.usable, s.shard_size, part)
    positions, _ = _owned_rows(m, read, s.seed, layout)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return PartPlan(name, part, m.total, m.usable, layout, len(positions), (t1 - t0, t2 - t1), peak)


# ---------------------------------------------------------------------------------------------------
# Command line.


def default_out(manifest: str) -> str:
    """`shards/<manifest name>`: shards/pool for pool.csv, pool.csv.gz or the folder pool/."""
    name = str(manifest).rstrip("/").rsplit("/", 1)[-1]
    if is_url(str(manifest)) or not os.path.isdir(manifest):
        name = Path(strip_compression(name)).stem
    return os.path.join("shards", name)


def main(argv: list[str] | None = None) -> int:
    p = settings_parser(PackCommand, tool_prog("pack.py"), __doc__)
    c = parse_settings(p, PackCommand, argv)
    if c.merge and (c.manifest or not c.out or c.plan_only):
        p.error("--merge takes --out (and --name) only: it reads the records the parts left there")
    if not c.merge and not c.manifest:
        p.error("the manifest is required (except with --merge)")
    if not c.labels and (c.label_column or c.labels_from_subfolders):
        p.error("--no-labels reads no labels: leave out --label-column and --labels-from-subfolders")
    out = c.out or default_out(c.manifest)
    options = {**options_of(c, PackSettings), **({} if c.labels else {"label_column": ""})}

    def run() -> int:
        if c.plan_only:
            print(plan(c.manifest, out, **options).summary())
            return 0
        r = merge(out, c.name, c.storage_options, c.tmp_dir) if c.merge else pack(c.manifest, out, **options)
        print(r.summary(out))
        return 0

    return run_main("pack", run, log_folder=None if c.plan_only else out)


if __name__ == "__main__":
    sys.exit(main())
