"""shard_tools/crawl.py: URL manifests downloaded with img2dataset become a shard set holding exactly the good images.

One crawl against a local server (module fixture) is shared by the tests; the resume tests work on copies.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from shard_tools.crawl import PARENT_ENV, CrawlError, crawl, failure_kind
from shard_tools.generate import ingest
from shard_tools.processes import KILL_ENV, marked
from shard_tools.shardset import ShardInfo, ShardSet, load_shard_set
from shard_tools.synth import render
from shard_tools.verify import verify
from stream_ssl.data.plan import Slice, make_plan
from stream_ssl.data.reader import ShardReader
from tests.helpers import REPO
from tests.helpers.crawl_server import NAMES, image_server
from tests.helpers.faults import lost_and_duplicated
from tests.helpers.packing import moto_server, read_csv, run_tool, write_csv

pytestmark = pytest.mark.multiprocess

GOOD = list(range(12))
SLOW = {2, 7}
SETTINGS = dict(name="crawled", shard_size=5, image_size=16, threads=4, timeout=5)


def _path(i: int) -> str:
    return f"/slow/{i}.jpg" if i in SLOW else f"/img/{i}.jpg"


@pytest.fixture(scope="module", autouse=True)
def _loopback_without_proxy():
    """img2dataset fetches with urllib, which honours http_proxy: never send the test server's URLs to a proxy."""
    extra = ",".join(v for v in (os.environ.get("no_proxy"), "127.0.0.1,localhost") if v)
    with mock.patch.dict(os.environ, {"no_proxy": extra, "NO_PROXY": extra}):
        yield


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    root = tmp_path_factory.mktemp("crawl")
    with image_server() as server:
        rows = [[server.url + _path(i), f"picture {i}", NAMES[i % len(NAMES)]] for i in GOOD]
        bad = {"/missing/100.jpg": "http 404", "/missing/101.jpg": "http 404", "/corrupt/102.jpg": "corrupt image",
               "/corrupt/103.jpg": "corrupt image", "/noai/104.jpg": "disallowed by X-Robots-Tag"}
        rows += [[server.url + p, "bad", NAMES[0]] for p in bad]
        rows.append(["not-a-url.jpg", "local", NAMES[1]])
        manifest = write_csv(root / "urls.csv", ["url", "caption", "label"], rows)
        out = root / "crawled"
        result = crawl(manifest, out, caption_column="caption", **SETTINGS)
        yield {"server": server, "manifest": manifest, "out": out, "result": result, "bad": bad}


def _samples(out) -> list[dict]:
    shard_set = load_shard_set(str(out))
    # pread: a test below truncates a shard in place while holding samples read before; views of a memory map
    # of it would die with SIGBUS when compared (docs/storage.md), copies stay valid.
    reader = ShardReader((shard_set,), local_reads="pread")
    return [s for i, sh in enumerate(shard_set.shards) for s in reader.read(Slice(0, i, 0, sh.samples))]


def test_the_shard_set_holds_exactly_the_good_images(crawled):
    out, result, url = crawled["out"], crawled["result"], crawled["server"].url
    assert result.downloaded == len(GOOD) and result.rows == 18
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "crawled" and index["num_samples"] == len(GOOD)
    assert index["labels"]["names"] == sorted(NAMES) and index["fields"] == ["image", "json", "cls", "txt"]
    assert verify(str(out), decode=True, out=io.StringIO())

    samples = _samples(out)  # streamed through stream_ssl's reader, byte ranges from the .idx files
    by_url = {json.loads(s["json"])["url"]: s for s in samples}
    assert sorted(by_url) == sorted(url + _path(i) for i in GOOD)
    for i in GOOD:
        s = by_url[url + _path(i)]
        meta = json.loads(s["json"])
        assert meta["source"] == "crawled" and meta["status"] == "success" and meta["row"] == i + 2
        assert meta["label_name"] == NAMES[i % len(NAMES)] and meta["caption"] == f"picture {i}"
        assert int(s["cls"]) == sorted(NAMES).index(NAMES[i % len(NAMES)]) == meta["label"]
        assert s["txt"] == f"picture {i}".encode()
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.size == (16, 16) and (meta["width"], meta["original_width"]) == (16, 24)

    # Plain webdataset reads the same samples from the tars.
    tars = [str(out / sh["path"]) for sh in index["shards"]]
    plain = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert [(p["__key__"], p["jpg"]) for p in plain] == [(s["__key__"], s["jpg"]) for s in samples]


def test_failures_are_listed_with_their_reasons(crawled):
    out, result, bad, url = crawled["out"], crawled["result"], crawled["bad"], crawled["server"].url
    errors = read_csv(out / "crawled-errors.csv")
    got = {e["url"]: e["reason"].split(" (")[0] for e in errors}
    assert got == {**{url + p: kind for p, kind in bad.items()}, "not-a-url.jpg": "not a URL"}
    assert "404" in next(e["reason"] for e in errors if "/missing/" in e["url"])
    assert result.failed == {"corrupt image": 2, "disallowed by X-Robots-Tag": 1, "http 404": 2, "not a URL": 1}
    summary = result.summary()
    assert summary.startswith("downloaded 12 of 18 rows into 4 shards") and "failed 6: " in summary
    assert json.loads((out / "index.json").read_text())["skipped"] == result.failed


def test_rerun_downloads_only_unfinished_shards(crawled, tmp_path):
    server, manifest = crawled["server"], crawled["manifest"]
    out = tmp_path / "crawled"
    shutil.copytree(crawled["out"], out)
    before = {s["__key__"]: s["jpg"] for s in _samples(out)}

    server.reset()
    again = crawl(manifest, out, caption_column="caption", **SETTINGS)
    assert again.already_complete and again.downloaded == len(GOOD) and not server.requests

    # A crash in the middle of shard 1: its tar is there but img2dataset never wrote its stats.
    shard1 = pq.read_table(out / "00001.parquet").column("url").to_pylist()
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").write_bytes((out / "00001.tar").read_bytes()[:1000])
    server.reset()
    resumed = crawl(manifest, out, caption_column="caption", **SETTINGS)
    assert sorted(server.requests) == sorted(u[len(server.url):] for u in shard1)
    assert set(server.requests.values()) == {1}
    assert resumed.resumed_shards == 3 and resumed.downloaded == len(GOOD) and not resumed.already_complete
    assert {s["__key__"]: s["jpg"] for s in _samples(out)} == before
    assert verify(str(out), out=io.StringIO())

    with pytest.raises(CrawlError, match="other settings .*image_size"):
        crawl(manifest, out, caption_column="caption", **{**SETTINGS, "image_size": 20})


def test_rows_without_a_label_are_crawled_without_one(tmp_path):
    """Unlabelled rows are normal in a crawl manifest (pack does the same: docs/packing.md)."""
    with image_server() as server:
        rows = [[server.url + f"/img/{i}.jpg", NAMES[i % 2] if i % 3 else ""] for i in range(6)]
        manifest = write_csv(tmp_path / "urls.csv", ["url", "label"], rows)
        crawl(manifest, tmp_path / "out", **{**SETTINGS, "shard_size": 3})
    samples = _samples(tmp_path / "out")
    assert len(samples) == 6
    labeled = {s["__key__"] for s in samples if "cls" in s}
    assert len(labeled) == 4 and all(json.loads(s["json"]).get("label") is None for s in samples
                                     if s["__key__"] not in labeled)


@pytest.mark.faults
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_killed_crawl_leaves_nothing_running_and_a_rerun_finishes_it(crawled, tmp_path, fault_row):
    """crawl.py SIGKILLed once img2dataset wrote its second shard: the img2dataset process and the worker that
    writes die with it at once (before, they went on writing into the folder), the re-run stops what is left
    (img2dataset's read-only logger) and downloads the rest into the same samples as an uninterrupted crawl."""
    out = tmp_path / "crawled"
    killed = run_tool("crawl.py", crawled["manifest"], "--out", out, "--caption-column", "caption", "--shard-size",
                      "5", "--image-size", "16", "--threads", "4", "--timeout", "5", env={KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    log = (out / ".crawled-crawl" / "img2dataset.log").read_text()
    pid = re.search(r"SIGKILL to crawl.py \(pid (\d+)\)", log).group(1)
    deadline = time.monotonic() + 20
    while len(marked(PARENT_ENV, pid)) > 2 and time.monotonic() < deadline:  # the logger and its resource tracker
        time.sleep(0.1)
    writers = [p for p in marked(PARENT_ENV, pid) if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    done_before = len(list(out.glob("*_stats.json")))
    resumed = crawl(crawled["manifest"], out, caption_column="caption", **SETTINGS)
    left = marked(PARENT_ENV, pid)
    want = {s["__key__"]: s["jpg"] for s in _samples(crawled["out"])}
    got = [(s["__key__"], s["jpg"]) for s in _samples(out)]
    lost, dup = lost_and_duplicated([k for k, _ in got], list(want))
    fault_row("crawl killed -9 after its second shard, then re-run", lost, dup, helpers_alive_after_kill=len(writers),
              helpers_alive_after_rerun=len(left), shards_done_before=done_before,
              resumed_shards=resumed.resumed_shards, samples=len(got), same_bytes_per_sample=dict(got) == want)
    assert len(writers) <= 1 and not left  # (at most img2dataset's logger, which only reads)
    assert resumed.downloaded == len(GOOD) and dict(got) == want and done_before >= 1
    assert verify(str(out), out=io.StringIO())


def test_crawl_to_s3_streams_verifies_and_reruns_without_downloading(crawled):
    """--out s3://: img2dataset writes to the bucket through fsspec, our index and .idx files go next to it."""
    pytest.importorskip("s3fs")
    server, manifest = crawled["server"], crawled["manifest"]
    local = {s["__key__"]: s["jpg"] for s in _samples(crawled["out"])}
    with moto_server() as endpoint:
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("bucket")
        server.reset()
        result = crawl(manifest, "s3://bucket/crawled", caption_column="caption", **SETTINGS)
        assert result.downloaded == len(GOOD) and result.failed == crawled["result"].failed
        assert verify("s3://bucket/crawled", decode=True, out=io.StringIO())
        assert {s["__key__"]: s["jpg"] for s in _samples("s3://bucket/crawled")} == local  # same bytes, streamed
        server.reset()
        again = crawl(manifest, "s3://bucket/crawled", caption_column="caption", **SETTINGS)
        assert again.already_complete and not server.requests


def test_cli_summary_and_refusals(crawled, tmp_path):
    out = tmp_path / "crawled"
    shutil.copytree(crawled["out"], out)
    proc = run_tool("crawl.py", crawled["manifest"], "--out", out, "--caption-column", "caption", "--shard-size", "5",
                    "--image-size", "16", "--threads", "4")
    assert proc.returncode == 0, proc.stderr
    assert "downloaded 12 of 18 rows into 4 shards" in proc.stdout and "already complete" in proc.stdout
    proc = run_tool("crawl.py", crawled["manifest"], "--out", tmp_path / "x", "--img2dataset-option",
                    "output_format=parquet")
    assert proc.returncode == 1 and "cannot set ['output_format']" in proc.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00000.tar").write_bytes(b"")
    proc = run_tool("crawl.py", crawled["manifest"], "--out", foreign)
    assert proc.returncode == 1 and "did not start" in proc.stderr
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "index.json").write_text(json.dumps({"format": "stream-ssl-shards", "shards": []}))
    with pytest.raises(CrawlError, match="did not start"):
        crawl(crawled["manifest"], packed)
    assert (packed / "index.json").exists()


def _by_key(out) -> dict[str, dict[str, bytes]]:
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in _samples(out)}


def _cluster_ready(distributor: str) -> None:
    """Skip (with the reason) where the distributor cannot run: its package or, for Spark, Java is missing."""
    module, extra = {"ray": ("ray", "ray"), "pyspark": ("pyspark", "spark")}[distributor]
    pytest.importorskip(module, reason=f"--distributor {distributor} needs {module}: pip install "
                                       f"'stream-ssl[{extra}]'")
    if distributor == "pyspark" and shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("--distributor pyspark needs Java 17+ (no java on PATH, no JAVA_HOME)")


@pytest.mark.parametrize("distributor", ["ray", "pyspark"])
def test_a_cluster_crawl_gives_the_samples_of_a_local_one(crawled, tmp_path, distributor):
    """img2dataset's ray and pyspark distributors on a local instance (2 CPUs): the same samples, byte for byte,
    the same failures and the same index as the multiprocessing crawl of the fixture."""
    _cluster_ready(distributor)
    out = tmp_path / "crawled"
    result = crawl(crawled["manifest"], out, caption_column="caption", **SETTINGS, distributor=distributor,
                   processes=2)
    assert result.downloaded == len(GOOD) and result.failed == crawled["result"].failed
    assert _by_key(out) == _by_key(crawled["out"])
    assert (out / "crawled-errors.csv").read_bytes() == (crawled["out"] / "crawled-errors.csv").read_bytes()
    index, local = (json.loads((o / "index.json").read_text()) for o in (out, crawled["out"]))
    assert [s["samples"] for s in index["shards"]] == [s["samples"] for s in local["shards"]]
    shard_lists = ("shards", "idx_packs")  # (the .idx of a shard names its samples: the packs follow the shards)
    assert {k: v for k, v in index.items() if k not in shard_lists} == {k: v for k, v in local.items()
                                                                         if k not in shard_lists}


def test_distributor_settings_are_checked_before_anything_runs(tmp_path, monkeypatch):
    manifest = write_csv(tmp_path / "urls.csv", ["url"], [["http://127.0.0.1:9/img/0.jpg"]])
    proc = run_tool("crawl.py", manifest, "--out", tmp_path / "x", "--ray-address", "auto")
    assert proc.returncode == 2 and "--ray-address goes with --distributor ray" in proc.stderr
    proc = run_tool("crawl.py", manifest, "--out", tmp_path / "x", "--distributor", "dask")
    assert proc.returncode == 2 and "invalid choice: 'dask'" in proc.stderr
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(CrawlError, match=r"--distributor ray needs ray: pip install 'stream-ssl\[ray\]'"):
        crawl(manifest, tmp_path / "y", distributor="ray")
    with pytest.raises(CrawlError, match=r"a cluster address \(--ray-address, --spark-master\) needs"):
        crawl(manifest, tmp_path / "y", cluster_address="spark://head:7077")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_failure_kinds():
    assert failure_kind("failed_to_download", "HTTP Error 503: Service Unavailable") == "http 503"
    assert failure_kind("failed_to_download", "<urlopen error timed out>") == "timeout"
    assert failure_kind("failed_to_download", "The read operation timed out") == "timeout"
    assert failure_kind("failed_to_download", "<urlopen error [Errno 111] Connection refused>") == "connection refused"
    assert failure_kind("failed_to_download", "<urlopen error [Errno -2] Name or service not known>") == "unknown host"
    assert failure_kind("failed_to_resize", "Image decoding error") == "corrupt image"
    assert failure_kind("failed_to_resize", "image too small") == "image too small"


@pytest.fixture(scope="module")
def three_sources(crawled, make_shard_set, tmp_path_factory):
    """A real (packed), the crawled and a generated (ingested) shard set."""
    root = tmp_path_factory.mktemp("gen")
    folder = root / "gen_images"
    folder.mkdir()
    rows = []
    for i in range(16):
        render(i, i % 4, 16, "b", 1).save(folder / f"{i}.png")
        rows.append([f"{i}.png", f"a photo of a {NAMES[i % 4]}", NAMES[i % 4], i])
    prompts = write_csv(root / "prompts.csv", ["file", "prompt", "class", "seed"], rows)
    generated = root / "generated"
    ingest(folder, prompts, generated, shard_size=4)
    return [make_shard_set(40, shard_size=10), crawled["out"], generated]


def test_plan_mixes_real_crawled_and_generated_at_the_requested_counts(three_sources):
    data = ",".join(str(p) for p in three_sources)
    for mix, want in (("real=0.5,crawled=0.25,generated=0.25", [12, 6, 6]),
                      ("real=0.2,crawled=0.4,generated=0.4", [5, 10, 9]),
                      ("real=1,crawled=0,generated=1", [12, 0, 12])):
        proc = subprocess.run([sys.executable, "-m", "stream_ssl.plan", "--data", data, "--unique-samples", "24",
                               "--budget-samples", "96", "--batch-size", "8", "--mix", mix, "--json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert [s["source"] for s in summary["sources"]] == ["real", "crawled", "generated"]
        assert [s["unique"] for s in summary["sources"]] == want, mix
        assert summary["unique_samples"] == 24 and summary["budget_samples"] == 96


def test_a_short_run_trains_on_the_three_sources(three_sources, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "stream_ssl" / "train.py"),
                           "--data", ",".join(str(p) for p in three_sources), "--mix",
                           "real=0.5,crawled=0.25,generated=0.25", "--unique-samples", "24", "--budget-samples", "48",
                           "--batch-size", "8", "--backbone", "test_resnet", "--image-size", "32", "--method-options",
                           '{"proj_hidden": 64, "proj_dim": 32}', "--optimizer", "sgd", "--lr", "0.1",
                           "--num-workers", "0", "--no-progress", "--log-with", "none", "--out", str(run)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and [s["unique"] for s in summary["plan"]["sources"]] == [12, 6, 6]


def test_mix_sweep_config_keeps_n_and_c_and_varies_the_generated_share():
    from launch.sweep import load_sweep  # here: the sweep runner is not needed by the other tests

    def pool(source: str) -> ShardSet:
        shards = tuple(ShardInfo(f"{source}-{i:06d}.tar", 10_000, 10_000 * 110_000) for i in range(120))
        return ShardSet(f"shards/{source}", source, source, 1_200_000, shards, (), {})

    sweep = load_sweep("configs/sweeps/mix_sources.yaml")
    sets = [pool("real"), pool("crawled"), pool("generated")]
    shares = []
    for cell in sweep.cells:
        assert cell.settings["data"] == "shards/real,shards/crawled,shards/generated"
        assert (cell.settings["unique_samples"], cell.settings["budget_samples"]) == ("1M", "32M")
        plan = make_plan(sets, cell.settings["unique_samples"], cell.settings["budget_samples"], cell.settings["mix"],
                         batch_size=256)
        real, crawled, generated = plan.per_source
        assert real + crawled + generated == 1_000_000 and abs(real - crawled) <= 1
        shares.append(generated / 1_000_000)
    assert shares == [0.0, 0.1, 0.25, 0.5, 1.0]
