"""Download the images of a URL manifest with img2dataset into a shard set (source=crawled).

    shard-tools crawl urls.parquet --out shards/crawled --url-column url --caption-column caption
    shard-tools crawl urls.csv --out shards/web --label-column label --image-size 256 --processes 8
    shard-tools crawl yfcc100m_dataset.bz2 --format yfcc --out s3://bucket/yfcc --threads 128

The manifest is read like pack.py reads it (CSV, TSV, Parquet with a URL column, or YFCC100M metadata, whose
download URLs are used), its rows are shuffled (seeded, so any prefix of shards is a uniform random subset)
and handed to img2dataset, which downloads, checks and resizes them in its own processes and writes
WebDataset tars (`00000.tar`, ...) with a per-shard `_stats.json` and `.parquet` (the status of every row).
Each sample holds `KEY.jpg` (or the --encode-format), `KEY.json` (img2dataset's metadata: url, caption, sizes,
sha256, exif; plus source, row and label), `KEY.txt` when there is a caption column and `KEY.cls` when there
is a label column. The finished shards are then indexed (`.idx` + `index.json`, successes only) without
repacking, so the folder streams like any packed set. Rows that did not become samples are listed in
`OUT/NAME-errors.csv` (row, url, reason), and the summary counts them by reason.

Resuming: img2dataset's incremental mode skips every shard whose `_stats.json` exists, so running the same
command again after a crash or an interrupted run downloads only the unfinished shards. The settings that
shape the output (manifest, seed, shard size, resize and encode options) are recorded in `OUT/.NAME-crawl/`;
a re-run with other settings stops with a message instead of mixing two crawls (--overwrite starts over).
Shards that img2dataset could not finish (after its retries) leave the run without `index.json` and exit 1:
run again to retry them, or pass --allow-incomplete to index the finished ones.

img2dataset is an optional dependency (`pip install img2dataset`; docs/sources.md explains the webdataset pin).
It runs in a child process; its own log goes to `OUT/.NAME-crawl/img2dataset.log` (--verbose: to stderr).

On a cluster: --distributor passes img2dataset's own distributors through. `multiprocessing` (the default) runs
--processes on this machine; `ray` runs one Ray task per shard, on a local Ray instance of --processes CPUs or
on the cluster at --ray-address (pip install 'stream-ssl[ray]'); `pyspark` runs them as Spark tasks, on
local[--processes] or the cluster at --spark-master (pip install 'stream-ssl[spark]', Java 17+). The workers
write the shards straight into --out, so on a cluster it must be storage they all reach (s3://..., or a
shared file system), and each node needs this environment (stream-ssl, img2dataset). Resuming and the
indexing of the finished shards are the same whichever distributor ran, and so are the samples.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from shard_tools.cli import run_main, tool_prog
from shard_tools.errors import (
    ShardSetTotals,
    ToolError,
    count_by_kind,
    positive_int,
    read_errors,
    shard_set_name,
    write_errors,
)
from shard_tools.index import index_shard, natural_key
from shard_tools.manifest import FORMATS, Manifest, read_manifest
from shard_tools.outputs import Output, open_output
from shard_tools.processes import KILL_ENV, die_with_parent, stop_marked
from shard_tools.quantities import COUNT_HELP, count_arg
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
from shard_tools.shardset import finished_index, format_idx
from shard_tools.shuffle import Shuffle
from shard_tools.storage import STORAGE_OPTIONS_HELP, filesystem, fs_path, is_url, storage_options_arg
from shard_tools.writer import TarStream, make_index, write_index

__all__ = ["CrawlCommand", "CrawlError", "CrawlResult", "CrawlSampleWriter", "CrawlSettings", "crawl", "failure_kind",
           "main"]

SOURCE = "crawled"
CRAWL_VERSION = 2  # bump when the bytes written for the same inputs and options change (2: shard_tools.shuffle)
URL_SCHEMES = ("http://", "https://", "ftp://")
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
INTERPOLATIONS = ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4")
EXTRA = "crawl_extra"  # input column carrying the manifest's extra json fields (yfcc title, tags, ...)
# Options of img2dataset.download() that the command line sets itself (--img2dataset-option may set others).
MANAGED = {"url_list", "output_folder", "output_format", "input_format", "url_col", "caption_col",
           "save_additional_columns", "number_sample_per_shard", "oom_shard_count", "incremental_mode",
           "enable_wandb", "processes_count", "thread_count", "distributor"}
DISTRIBUTORS = ("multiprocessing", "ray", "pyspark")


def _option(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


RESIZING = "resizing and encoding (passed to img2dataset)"
DOWNLOADING = "downloading"


@dataclass
class CrawlSettings:
    """What crawl() takes besides the manifest and the output: one field per option of the command line (the same
    name, with dashes), its help, choices and default. `digest` marks what shapes the output with the manifest;
    `img2dataset` the options passed to img2dataset.download() (also part of the digest, as `options`)."""

    name: str | None = setting(None, "shard set name (default: the output folder's name)", digest=True)
    format: str | None = setting(None, "manifest format (default: from the name)",
                                 tuple(f for f in FORMATS if f != "folder"), digest=True)
    url_column: str | None = setting(None, "column with the image URLs (default: url, image_url, path, ...; yfcc: "
                                           "download_url)", digest=True)
    caption_column: str | None = setting(None, "column with a caption: KEY.txt and the json's caption", digest=True)
    label_column: str | None = setting(None, "column with integer labels or class names: KEY.cls (default: 'label' "
                                             "if present)", digest=True)
    key_column: str | None = setting(None, "column with an id kept in each sample's json as 'id'", digest=True)
    seed: int = setting(0, "seed of the shuffle of the rows", digest=True)
    shard_size: int = setting(1000, f"rows per shard, {COUNT_HELP}", parse=count_arg, digest=True)
    image_size: int = setting(256, "target size in pixels", parse=positive_int, group=RESIZING, img2dataset=True)
    resize_mode: str = setting("keep_ratio", "keep_ratio: shorter side to --image-size; border: fit and pad to a "
                                             "square; center_crop; keep_ratio_largest: longer side; no: keep the size",
                               RESIZE_MODES, group=RESIZING, img2dataset=True)
    resize_only_if_bigger: bool = setting(True, "never upscale", group=RESIZING, img2dataset=True)
    upscale_interpolation: str = setting("lanczos", "resampling when an image is enlarged", INTERPOLATIONS,
                                         group=RESIZING, img2dataset=True)
    downscale_interpolation: str = setting("area", "resampling when an image is shrunk", INTERPOLATIONS,
                                           group=RESIZING, img2dataset=True)
    encode_format: str = setting("jpg", "image format stored in the shards", ("jpg", "png", "webp"), group=RESIZING,
                                 img2dataset=True)
    encode_quality: int = setting(95, "JPEG/WebP quality, PNG compression 0-9", group=RESIZING, img2dataset=True)
    skip_reencode: bool = setting(False, "keep the original bytes of images that need no resize and already have "
                                         "--encode-format", group=RESIZING, img2dataset=True)
    disable_all_reencoding: bool = setting(False, "store downloaded bytes as they are (no decode check: run "
                                                  "shard-tools verify --decode)", group=RESIZING, img2dataset=True)
    min_image_size: int = setting(0, "drop images whose shorter side is smaller (0: keep all)", group=RESIZING,
                                  img2dataset=True)
    max_image_area: float | None = setting(None, "drop images with more pixels (default: keep all)",
                                           group=RESIZING, img2dataset=True)
    max_aspect_ratio: float | None = setting(None, "drop images whose side ratio is larger (default: keep all)",
                                             group=RESIZING, img2dataset=True)
    extract_exif: bool = setting(True, "keep EXIF in the json", flag="--exif", group=RESIZING, img2dataset=True)
    processes: int = setting(1, "img2dataset processes", parse=positive_int, group=DOWNLOADING)
    threads: int = setting(64, "download threads per process", parse=positive_int, group=DOWNLOADING)
    distributor: str = setting("multiprocessing", "who runs the shard downloads: multiprocessing (--processes here), "
                                                  "ray (a local Ray instance of --processes CPUs, or --ray-address), "
                                                  "pyspark (local[--processes], or --spark-master); on a cluster --out "
                                                  "must be storage every worker reaches", DISTRIBUTORS,
                               group=DOWNLOADING)
    ray_address: str | None = setting(None, "with --distributor ray: the cluster to join ('auto': the one this "
                                            "machine is a node of; ray://HOST:10001 for a remote head); default: a "
                                            "local instance", metavar="ADDRESS", group=DOWNLOADING)
    spark_master: str | None = setting(None, "with --distributor pyspark: the master (spark://HOST:7077, yarn, "
                                             "k8s://...); other settings from SPARK_CONF_DIR/spark-defaults.conf; "
                                             "default: local[--processes]", metavar="URL", group=DOWNLOADING)
    timeout: float = setting(10, "seconds per request", group=DOWNLOADING)
    retries: int = setting(0, "retries per URL", group=DOWNLOADING)
    max_shard_retry: int = setting(1, "img2dataset retries of a failed shard", group=DOWNLOADING)
    user_agent_token: str | None = setting(None, "token added to the user agent (and matched in X-Robots-Tag)",
                                           group=DOWNLOADING, img2dataset=True)
    img2dataset_options: dict | None = setting(None, "any other img2dataset.download() option (value parsed as "
                                                     "YAML), e.g. compute_hash=md5; repeatable", parse=_option,
                                               append=True, flag="--img2dataset-option", metavar="KEY=VALUE",
                                               group=DOWNLOADING)
    allow_incomplete: bool = setting(False, "index the finished shards even when some did not finish")
    overwrite: bool = setting(False, "delete an earlier crawl in --out and start over")
    storage_options: dict | None = setting(None, STORAGE_OPTIONS_HELP, parse=storage_options_arg)
    verbose: bool = setting(False, "show img2dataset's own output instead of logging it")
    progress: bool | None = progress_setting(False)

    @property
    def cluster_address(self) -> str | None:
        """The Ray address or Spark master img2dataset's distributor joins (None: a local one)."""
        return self.ray_address or self.spark_master

    def img2dataset(self) -> dict:
        """The resize and encode options passed to img2dataset.download() (infinity: no limit), with the extra
        --img2dataset-option ones."""
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("img2dataset")}
        for key in ("max_image_area", "max_aspect_ratio"):
            options[key] = float("inf") if options[key] is None else options[key]
        return {**options, **(self.img2dataset_options or {})}


@dataclass
class _Where:
    """What crawl.py reads and where it writes (first in its `--help`)."""

    manifest: str | None = setting(None, "CSV/TSV (header row) or Parquet with a URL column, or YFCC100M metadata; "
                                         "local or an fsspec URL, optionally compressed", positional=True,
                                   required=True)
    out: str | None = setting(None, "output folder of the shard set, or an fsspec URL (s3://bucket/prefix)",
                              required=True)


@dataclass
class CrawlCommand(CrawlSettings, _Where):
    """The command line of crawl.py: the manifest and the output, and CrawlSettings."""

    progress: bool | None = progress_setting(None)


class CrawlError(ToolError):
    """The crawl failed as a whole."""


@dataclass
class CrawlResult(ShardSetTotals):
    index: dict
    rows: int = 0  # manifest rows, malformed ones included
    downloaded: int = 0  # samples in the shard set
    failed: dict[str, int] = field(default_factory=dict)  # rows that did not become samples, by reason
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (row, url, reason)
    seconds: float = 0.0
    resumed_shards: int = 0  # shards finished by an earlier run
    incomplete: list[str] = field(default_factory=list)  # shards img2dataset did not finish
    already_complete: bool = False

    def summary(self, out: str = "") -> str:
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed.items(), key=lambda kv: (-kv[1], kv[0])))
        line = (f"downloaded {self.downloaded} of {self.rows} rows into {self.shards} shards "
                f"({self.bytes / 1e6:.1f} MB){' at ' + out if out else ''} in {self.seconds:.1f}s; "
                f"failed {sum(self.failed.values())}{': ' + failed if failed else ''}")
        if self.resumed_shards:
            line += f"; {self.resumed_shards} shards were already done"
        if self.incomplete:
            line += f"; {len(self.incomplete)} shards incomplete (left out)"
        if self.already_complete:
            line += " (already complete: nothing downloaded)"
        return line


# ---------------------------------------------------------------------------------------------------
# Failure reasons: img2dataset reports free text (urllib and OpenCV messages); the summary groups them.

_HTTP = re.compile(r"HTTP Error (\d{3})")


def failure_kind(status: str, message: str | None) -> str:
    """A short, stable reason name for an img2dataset row status and error message."""
    msg = (message or "").strip()
    low = msg.lower()
    if status == "failed_to_download":
        m = _HTTP.search(msg)
        if m:
            return f"http {m.group(1)}"
        if "timed out" in low or "timeout" in low:
            return "timeout"
        if "refused" in low:
            return "connection refused"
        if "x-robots-tag" in low:
            return "disallowed by X-Robots-Tag"
        if "hash mismatch" in low:
            return "hash mismatch"
        if "name or service not known" in low or "nodename nor servname" in low or "getaddrinfo" in low:
            return "unknown host"
        if "urlopen error" in low or "connection" in low or "remote end closed" in low:
            return "connection error"
        return "download failed"
    if status == "failed_to_resize":
        if "decoding error" in low:
            return "corrupt image"
        if low in ("image too small", "image area too large", "aspect ratio too large"):
            return low
        return "decode or resize failed"
    return status or "failed"


# ---------------------------------------------------------------------------------------------------
PARENT_ENV = "SHARD_TOOLS_CRAWL_PID"  # crawl.py's pid, for its img2dataset job (which dies with it)
FOLDER_ENV = "SHARD_TOOLS_CRAWL_OUT"  # the output folder, in the environment of every img2dataset process

# The sample writer img2dataset runs in its worker processes (in place of its WebDatasetSampleWriter).


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class CrawlSampleWriter:
    """Writes one img2dataset shard as our tar layout: deterministic USTAR headers, `KEY.<image>`, `KEY.cls`
    (when rows carry a label), `KEY.json` (img2dataset's metadata plus `source`, `row` and the manifest's extra
    fields) and `KEY.txt` (with a caption column). The per-shard `.parquet` with every row's status is kept,
    as img2dataset writes it. The tar is written under a temporary name and renamed when the shard is done;
    img2dataset writes the shard's `_stats.json` after that, which is what marks the shard finished."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        from img2dataset.writer import BufferedParquetWriter

        die_with_parent(os.getppid())  # (in img2dataset's worker process: its parent is the _run_job process)
        stem = f"{shard_id:0{oom_shard_count}d}"
        # img2dataset passes no storage options: its own writes and ours use the environment's credentials
        self.fs, path = filesystem(output_folder), fs_path(output_folder)
        self.tar_path = f"{path}/{stem}.tar"
        self.tmp_path = self.tar_path + ".tmp"
        self.idx_path = f"{path}/{stem}.idx"
        self.file = self.fs.open(self.tmp_path, "wb")
        self.tar = TarStream(self.file)
        self.parquet = BufferedParquetWriter(f"{output_folder}/{stem}.parquet", schema, 100)
        self.save_caption = save_caption
        self.ext = encode_format

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            info = {k: v for k, v in meta.items() if k != EXTRA and v is not None}
            extra = meta.get(EXTRA)
            if extra:
                for k, v in json.loads(extra).items():
                    info.setdefault(k, v)
            info["source"] = SOURCE
            fields = {self.ext: img_str}
            if meta.get("label") is not None:
                fields["cls"] = str(int(meta["label"])).encode()
            fields["json"] = json.dumps(info, sort_keys=True, default=_jsonable).encode()
            if self.save_caption:
                fields["txt"] = ("" if caption is None else str(caption)).encode()
            self.tar.add(key, fields)
        self.parquet.write(meta)

    def close(self):
        self.parquet.close()
        self.tar.close()
        self.file.close()
        with self.fs.open(self.idx_path, "w") as f:  # index.py reuses it: its count matches the stats' successes
            f.write(format_idx(self.tar.index))
        self.fs.mv(self.tmp_path, self.tar_path)
        _test_kill(self.tar_path)


_closed = 0  # shards this worker process wrote


def _test_kill(tar_path: str) -> None:
    """Tests (KILL_ENV=N): once this worker wrote N shards, SIGKILL crawl.py itself, then carry on as a job with
    work left would. The worker and the img2dataset process above it must die with crawl.py at once."""
    global _closed
    _closed += 1
    if os.environ.get(KILL_ENV) == str(_closed):
        print(f"test hook: {tar_path} written; SIGKILL to crawl.py (pid {os.environ[PARENT_ENV]})", flush=True)
        os.kill(int(os.environ[PARENT_ENV]), signal.SIGKILL)
        time.sleep(60)


def _run_job(job_path: str) -> None:
    """Entry point of the child process: run img2dataset.download() with our sample writer, on the cluster the
    job names (a Ray instance or a Spark session made here, so that img2dataset's distributor uses it). It dies
    with crawl.py, and img2dataset's worker processes die with it (CrawlSampleWriter), even after a SIGKILL:
    nothing keeps writing into the output folder after crawl.py is gone."""
    die_with_parent(int(os.environ[PARENT_ENV]))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import otherwise
    job = json.loads(Path(job_path).read_text())
    cluster = job.pop("cluster", {})
    import importlib

    i2d = importlib.import_module("img2dataset.main")  # the package re-exports a function named `main`
    if not hasattr(i2d, "WebDatasetSampleWriter") or not hasattr(i2d, "download"):
        raise SystemExit("error: this img2dataset version has no main.WebDatasetSampleWriter/download; "
                         "crawl.py is tested with img2dataset 1.47")
    i2d.WebDatasetSampleWriter = CrawlSampleWriter  # output_format='webdataset' now writes our layout
    with _cluster(job["distributor"], cluster.get("address"), job["processes_count"]):
        i2d.download(**job)


@contextmanager
def _cluster(distributor: str, address: str | None, processes: int):
    """Ray or Spark for img2dataset's distributor, started here and stopped after the download. Local ones
    (no `address`) take `processes` CPUs and stay on the loopback interface."""
    if distributor == "ray":
        import ray

        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=processes, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            yield
        finally:
            ray.shutdown()
    elif distributor == "pyspark":
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.appName("stream-ssl crawl").master(address or f"local[{processes}]")
        if not address:
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers run this Python
            for key, value in (("spark.driver.bindAddress", "127.0.0.1"), ("spark.driver.host", "127.0.0.1"),
                               ("spark.ui.enabled", "false")):
                builder = builder.config(key, value)
        spark = builder.getOrCreate()
        try:
            yield
        finally:
            spark.stop()
    else:
        yield


# ---------------------------------------------------------------------------------------------------
# Files in the output folder.


def _state_dir(name: str) -> str:
    return f".{name}-crawl"


_SHARD_FILE = re.compile(r"^(\d+)(\.tar|\.tar\.tmp|\.idx|\.parquet|_stats\.json)$")


def _stats(output: Output, stem: str) -> dict | None:
    data = output.read_bytes(f"{stem}_stats.json")
    if data is None:
        return None
    try:
        stats = json.loads(data)
        int(stats["successes"])
        return stats
    except (ValueError, TypeError, KeyError):
        return None


def _remove_crawl(output: Output, name: str) -> None:
    for entry in output.list():
        if _SHARD_FILE.match(entry) or entry in ("index.json", f"{name}-errors.csv"):
            output.remove(entry)
    output.remove(_state_dir(name))
    output.remove("_tmp")


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Names of the settings that differ (nested ones as options.image_size)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def _status_rows(output: Output, stem: str) -> list[tuple[int, str, str]]:
    """(row, url, reason) of the rows of one finished shard that did not become samples."""
    import pyarrow.parquet as pq

    data = output.read_bytes(f"{stem}.parquet")
    if data is None:
        return []
    table = pq.read_table(io.BytesIO(data), columns=["row", "url", "status", "error_message"])
    out = []
    for row, url, status, message in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        if status != "success":
            kind = failure_kind(status, message)
            detail = (message or "").strip().replace("\n", " ")
            out.append((int(row), url or "", f"{kind} ({detail})" if detail and detail.lower() != kind else kind))
    return out


def _foreign_index(output: Output) -> bool:
    """Whether the folder holds the index.json of a shard set that crawl.py did not make."""
    data = output.read_bytes("index.json")
    if data is None:
        return False
    try:
        return "crawl" not in json.loads(data)
    except ValueError:
        return True


def _img2dataset_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("img2dataset")
    except PackageNotFoundError:
        raise CrawlError("crawling needs img2dataset: pip install -e '.[crawl]' && pip install --no-deps "
                         "img2dataset==1.47.0 (docs/sources.md)") from None


# ---------------------------------------------------------------------------------------------------


def crawl(manifest: str | Path, out: str | Path, settings: CrawlSettings | None = None, *,
          cluster_address: str | None = None, **options) -> CrawlResult:
    """Crawl the URLs of `manifest` into the shard set `out` (a folder or an fsspec URL), with `settings` and keyword
    `options` named like its fields (crawl(m, out, shard_size=500, image_size=224)); see the module doc.

    `distributor` is img2dataset's (multiprocessing, ray or pyspark), `ray_address` or `spark_master` the cluster
    it joins (None: a local one of `processes` CPUs; `cluster_address` sets the one of the distributor). `progress`
    None shows the bar on a terminal. Raises ManifestError / CrawlError (ToolError: ordinary exceptions with a
    one-line message) when the crawl fails as a whole. The phases: check the settings, plan the job (usable rows,
    shuffled, cut into shards), claim the folder, download, index the finished shards."""
    start, s = time.perf_counter(), _with_address(configure(CrawlSettings, settings, options), cluster_address)
    _check_settings(s)
    out = str(out).rstrip("/")
    name = shard_set_name(out, s.name, CrawlError)
    version = _img2dataset_version()
    m = read_manifest(manifest, s.format, s.url_column, s.label_column, s.caption_column, s.key_column, None, None,
                      False, s.storage_options)
    job = _plan_job(m, manifest, _resolved(s, m, name), version)
    output = open_output(out, s.storage_options)
    try:
        output.lock(f"crawl.py --name {name}")
        stopped = stop_marked(FOLDER_ENV, output.url)  # the lock is ours: what is left of a killed crawl is not
        if stopped:
            print(f"note: stopped {stopped} img2dataset processes a killed crawl of {out} left running")
        done = _claim(output, job, out, s.overwrite)
        if done is not None:
            errors = read_errors(output, name)
            return CrawlResult(done, m.total, done["num_samples"], count_by_kind(errors), errors,
                               time.perf_counter() - start, len(done["shards"]), already_complete=True)
        resumed = _fetch(output, job, s)
        finished = {stem for stem in job.stems if _stats(output, stem) is not None}
        incomplete = [f"{stem}.tar" for stem in job.stems if stem not in finished]
        if incomplete and not s.allow_incomplete:
            raise _incomplete(output, job, finished, incomplete, out)
        index = _index_crawl(output, job, finished, incomplete, manifest)
        return CrawlResult(index, m.total, index["num_samples"], count_by_kind(job.errors), sorted(job.errors),
                           time.perf_counter() - start, resumed, incomplete)
    finally:
        output.close()


def _with_address(s: CrawlSettings, address: str | None) -> CrawlSettings:
    """The settings with crawl(cluster_address=...): the Ray address or the Spark master, by the distributor."""
    if not address:
        return s
    if s.distributor not in ("ray", "pyspark"):
        raise CrawlError("a cluster address (--ray-address, --spark-master) needs --distributor ray or pyspark")
    return replace(s, **{"ray_address" if s.distributor == "ray" else "spark_master": address})


def _check_settings(s: CrawlSettings) -> None:
    """Raise CrawlError for a setting out of range, or a distributor that cannot run here."""
    check_choices(s, CrawlError)
    if s.shard_size < 1:
        raise CrawlError("--shard-size must be >= 1")
    if s.processes < 1 or s.threads < 1:
        raise CrawlError("--processes and --threads must be >= 1")
    managed = sorted(set(s.img2dataset_options or {}) & MANAGED)
    if managed:
        raise CrawlError(f"--img2dataset-option cannot set {managed}: crawl.py manages them")
    _check_cluster(s)
    _check_distributor(s.distributor, s.cluster_address)


def _check_cluster(s: CrawlSettings) -> None:
    """Raise CrawlError when a cluster address does not go with the distributor."""
    for option, value, needs in (("--ray-address", s.ray_address, "ray"), ("--spark-master", s.spark_master,
                                                                          "pyspark")):
        if value and s.distributor != needs:
            raise CrawlError(f"{option} goes with --distributor {needs}")


def _check_distributor(distributor: str, address: str | None) -> None:
    """Raise CrawlError unless the distributor can run here (img2dataset's ray distributor silently downloads
    nothing when Ray is missing, hence the check)."""
    import importlib.util
    import shutil

    module, extra = {"ray": ("ray", "ray"), "pyspark": ("pyspark", "spark")}.get(distributor, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise CrawlError(f"--distributor {distributor} needs {module}: pip install 'stream-ssl[{extra}]'")
    if distributor == "pyspark" and not address and shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise CrawlError("--distributor pyspark runs Spark, which needs Java 17 or later (java on PATH or JAVA_HOME)")


def _resolved(s: CrawlSettings, m: Manifest, name: str) -> CrawlSettings:
    """The settings as the crawl uses them: the shard set name, and the manifest's format and columns as its
    reader chose them."""
    return replace(s, name=name, format=m.format, url_column=m.path_column, caption_column=m.caption_column,
                   label_column=m.label_column, key_column=m.key_column)


@dataclass
class _Job:
    """What a crawl downloads: the usable rows in their shuffled order, cut into img2dataset's shards."""

    m: Manifest
    name: str
    usable: list  # (manifest row, url)
    order: np.ndarray  # shuffled positions in `usable`
    stems: list[str]  # img2dataset's shard names: 00000, 00001, ...
    shard_size: int
    options: dict  # resize and encode options passed to img2dataset
    config: dict  # what shapes the output (recorded; its digest tells this crawl from another)
    digest: str
    version: str  # img2dataset's
    seed: int
    errors: list  # (row, url, reason) of the rows that did not become samples

    @property
    def state(self) -> str:
        return _state_dir(self.name)


def _plan_job(m: Manifest, manifest, s: CrawlSettings, version: str) -> _Job:
    """The usable rows of `m` (URLs) shuffled and cut into shards, and the digest of what shapes the output: the
    settings declared with `digest` (`s` resolved), the img2dataset options, the manifest's checksum."""
    if m.format == "folder":
        raise CrawlError(f"{manifest} is a folder of images: pack it with shard_tools/pack.py")
    errors: list[tuple[int, str, str]] = list(m.errors)
    usable = []
    for r in m.rows:
        url = m.location(r)
        if url.lower().startswith(URL_SCHEMES):
            usable.append((r, url))
        else:
            errors.append((r.row, r.path, "not a URL (local files are packed with shard_tools/pack.py)"))
    if not usable:
        raise CrawlError(f"no URLs in {manifest} (column {m.path_column}); see the rows in its errors")
    shards_total = math.ceil(len(usable) / s.shard_size)
    oom_shard_count = max(5, len(str(shards_total - 1)))
    options = s.img2dataset()
    config = {
        "crawl_version": CRAWL_VERSION, "img2dataset": version.split(".")[0], "manifest_sha256": m.sha256,
        **digest_of(s),
        "options": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in options.items()},
    }
    return _Job(m, s.name, usable, Shuffle(len(usable), s.seed).order(),
                [f"{i:0{oom_shard_count}d}" for i in range(shards_total)], s.shard_size, options, config,
                config_sha256(config), version, s.seed, errors)


def _claim(output: Output, job: _Job, out: str, overwrite: bool) -> dict | None:
    """The index of a finished crawl with the same settings (nothing to do), else None once the folder is
    ours: an unfinished crawl with the same settings, or a fresh folder (--overwrite: made fresh)."""
    if overwrite:
        _remove_crawl(output, job.name)
    done = finished_index(output, "crawl", job.digest)
    if done is not None:
        return done
    old = output.read_bytes(f"{job.state}/config.json")
    if old is not None:
        previous = json.loads(old)
        if previous.get("config_sha256") != job.digest:
            changed = _changed(previous.get("config", {}), job.config)
            raise CrawlError(f"{out} holds a crawl made with other settings (changed: {', '.join(changed)}); "
                             "use another --out, or --overwrite to start over")
    elif any(_SHARD_FILE.match(e) for e in output.list()) or _foreign_index(output):
        raise CrawlError(f"{out} already holds shards that crawl.py did not start; use an empty folder, or "
                         "--overwrite to delete them")
    output.remove("index.json")  # the folder stops being a shard set until the crawl is indexed again
    output.write_bytes(f"{job.state}/config.json", json.dumps({"config_sha256": job.digest, "config": job.config},
                                                               indent=1).encode())
    return None


def _fetch(output: Output, job: _Job, s: CrawlSettings) -> int:
    """Download the shards no earlier run finished; returns how many were finished before."""
    finished = {stem for stem in job.stems if _stats(output, stem) is not None}
    for stem in job.stems:
        if stem not in finished:  # img2dataset makes these again: no stale file may outlive it
            for suffix in (".tar", ".tar.tmp", ".idx", ".parquet"):
                output.remove(stem + suffix)
    if len(finished) < len(job.stems):
        _download(output, job, [stem for stem in job.stems if stem not in finished], s)
    return len(finished)


def _incomplete(output: Output, job: _Job, finished: set[str], incomplete: list[str], out: str) -> CrawlError:
    for s in finished:
        job.errors.extend(_status_rows(output, s))
    write_errors(output, job.name, job.errors, column="url")
    log = output.location(f"{job.state}/img2dataset.log") if not is_url(out) else "the img2dataset log"
    return CrawlError(f"{len(incomplete)} of {len(job.stems)} shards did not finish ({', '.join(incomplete[:3])}"
                      f"{', ...' if len(incomplete) > 3 else ''}); see {log}. Run the same command again "
                      "to retry them, or pass --allow-incomplete to index the finished shards")


def _index_crawl(output: Output, job: _Job, finished: set[str], incomplete: list[str], manifest) -> dict:
    """Index the finished shards (successes only) and write index.json; list every row left out."""
    shards, left_out = [], []
    for s in sorted(finished, key=natural_key):
        job.errors.extend(_status_rows(output, s))
        if int(_stats(output, s)["successes"]) == 0:
            left_out.append(f"{s}.tar")
            continue
        r = index_shard(output, f"{s}.tar")
        if r.problem:
            raise CrawlError(f"shard {r.problem}; delete {s}_stats.json and run again to download it anew")
        shards.append(r.info)
    for k, s in enumerate(job.stems):
        if s not in finished:
            for i in job.order[k * job.shard_size:(k + 1) * job.shard_size]:
                row, url = job.usable[i]
                job.errors.append((row.row, url, "incomplete shard (img2dataset did not finish it)"))
    write_errors(output, job.name, job.errors, column="url")
    if not shards:
        raise CrawlError(f"no URL of {manifest} could be downloaded; see {output.location(f'{job.name}-errors.csv')}")
    m = job.m
    index = make_index(
        job.name, shards, source=SOURCE, seed=job.seed, manifest=str(manifest), manifest_format=m.format,
        manifest_sha256=m.sha256,
        fields=["image", "json", *(["cls"] if m.label_column else []), *(["txt"] if m.caption_column else [])],
        labels={"column": m.label_column, "names": m.label_names}, rows=m.total, skipped=count_by_kind(job.errors),
        filtered=m.filtered,
        crawl={"img2dataset": job.version, "shard_size": job.shard_size, "url_column": m.path_column,
               "caption_column": m.caption_column, "options": job.config["options"],
               "left_out": left_out + incomplete, "config_sha256": job.digest},
    )
    write_index(output, index)
    output.remove(f"{job.state}/input.parquet")  # written again by a later run that has shards to fetch
    return index


def _input_table(job: _Job) -> tuple[bytes, list[str]]:
    """img2dataset's input: the usable rows in the shuffled order, as parquet; and the extra columns it keeps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = job.m
    rows = [job.usable[i] for i in job.order]
    columns = {"url": pa.array([url for _, url in rows], pa.string()),
               "row": pa.array([r.row for r, _ in rows], pa.int64())}
    extra_cols = ["row"]
    if m.caption_column:
        columns["caption"] = pa.array([m.extra(r).get("caption", "") for r, _ in rows], pa.string())
    if m.label_column:
        columns["label"] = pa.array([r.label for r, _ in rows], pa.int64())
        extra_cols.append("label")
        if m.label_names:
            columns["label_name"] = pa.array([m.label_names[r.label] if r.label is not None else None
                                              for r, _ in rows], pa.string())
            extra_cols.append("label_name")
    extras = []
    for r, _ in rows:
        meta = {k: v for k, v in m.extra(r).items() if k != "caption"}
        if r.key and "id" not in meta:
            meta["id"] = r.key
        extras.append(json.dumps(meta, sort_keys=True) if meta else None)
    if any(extras):
        columns[EXTRA] = pa.array(extras, pa.string())
        extra_cols.append(EXTRA)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue(), extra_cols


def _download(output: Output, job: _Job, todo: list[str], s: CrawlSettings) -> None:
    """Write img2dataset's input (the shuffled rows) and run it in a child process, showing a bar over shards."""
    table, extra_cols = _input_table(job)
    output.write_bytes(f"{job.state}/input.parquet", table)
    m = job.m
    spec = {
        "url_list": output.location(f"{job.state}/input.parquet"),
        "output_folder": output.url,
        "input_format": "parquet",
        "output_format": "webdataset",
        "url_col": "url",
        "caption_col": "caption" if m.caption_column else None,
        "save_additional_columns": extra_cols,
        "number_sample_per_shard": job.shard_size,
        "oom_shard_count": len(job.stems[0]),
        "incremental_mode": "incremental",
        "enable_wandb": False,
        "processes_count": s.processes,
        "thread_count": s.threads,
        "timeout": s.timeout,
        "retries": s.retries,
        "max_shard_retry": s.max_shard_retry,
        "distributor": s.distributor,
        "cluster": {"distributor": s.distributor, "address": s.cluster_address},
        **job.options,
    }
    for key in ("max_image_area", "max_aspect_ratio"):
        if isinstance(spec[key], float) and math.isinf(spec[key]):
            del spec[key]  # img2dataset's default is infinity; JSON cannot carry it
    with tempfile.TemporaryDirectory(prefix="crawl-job-") as tmp:
        spec_path = Path(tmp) / "job.json"
        spec_path.write_text(json.dumps(spec))
        if is_url(output.url):
            log_path = Path(tmp) / "img2dataset.log"
        else:
            log_path = Path(output.url) / job.state / "img2dataset.log"
        _run_img2dataset(output, spec_path, log_path, todo, s.progress, s.verbose)


def _run_img2dataset(output: Output, spec_path: Path, log_path: Path, todo: list[str], progress: bool | None,
                     verbose: bool) -> None:
    """img2dataset in a child process (its log in `log_path`), a bar over the shards in `todo` meanwhile."""
    env = dict(os.environ)
    env[PARENT_ENV], env[FOLDER_ENV] = str(os.getpid()), output.url
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", "import sys; from shard_tools.crawl import _run_job; _run_job(sys.argv[1])",
           str(spec_path)]
    bar = tqdm(total=len(todo), unit="shard", file=sys.stderr, disable=None if progress is None else not progress,
               desc=f"crawling {output.url.rsplit('/', 1)[-1]}")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=None if verbose else log,
                                stderr=None if verbose else subprocess.STDOUT)
        seen: set[str] = set()
        counts = {"ok": 0, "failed": 0}
        try:
            while True:
                try:
                    proc.wait(timeout=2.0 if is_url(output.url) else 0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if not bar.disable:
                    _update_bar(output, todo, seen, counts, bar)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            if not bar.disable:
                _update_bar(output, todo, seen, counts, bar)
            bar.close()
    if proc.returncode != 0:
        tail = ""
        if not verbose:
            tail = "; last lines:\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise CrawlError(f"img2dataset exited with status {proc.returncode}{tail}")


def _update_bar(output: Output, todo: list[str], seen: set[str], counts: dict, bar) -> None:
    present = set(output.list())
    for s in todo:
        if s not in seen and f"{s}_stats.json" in present:
            stats = _stats(output, s)
            if stats is None:
                continue
            seen.add(s)
            counts["ok"] += int(stats["successes"])
            counts["failed"] += int(stats.get("count", 0)) - int(stats["successes"])
            bar.update(1)
            bar.set_postfix(downloaded=counts["ok"], failed=counts["failed"], refresh=False)


# ---------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    p = settings_parser(CrawlCommand, tool_prog("crawl.py"), __doc__)
    c = parse_settings(p, CrawlCommand, argv)
    try:
        _check_cluster(c)
    except CrawlError as e:
        p.error(str(e))
    return run_main("crawl", lambda: _run(c), log_folder=c.out)


def _run(c: CrawlCommand) -> int:
    r = crawl(c.manifest, c.out, **options_of(c, CrawlSettings))
    print(r.summary(c.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
