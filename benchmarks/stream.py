"""Streaming throughput without decoding, side by side in one run: our reader, plain webdataset, LitData and
MosaicML Streaming (when installed), and the raw ceiling of parallel whole-object GETs; from local disk (one
process, and through a DataLoader with worker processes), from S3 on loopback (moto), and from S3, Google Cloud
Storage and Azure Blob (their emulators) behind a proxy that makes each behave like a real object store.

    python -m benchmarks.stream                       # 4096 samples of ~52 KB in 16 shards, every scenario, 5 rounds
    python -m benchmarks.stream --peers-python .venv-bench/bin/python   # LitData / Mosaic live there
    python -m benchmarks.stream --scenarios local,s3-100ms --rounds 3 --timeline timeline.json
    python -m benchmarks.stream --quick                 # every reader once, toy sizes, in seconds

Scenarios: `local` (page cache warm), `local-workers` (the same files through a torch DataLoader with --workers
worker processes), `s3` (moto on 127.0.0.1, no shaping), `s3-30ms` (30 ms added to the first byte of every
request, 40 MB/s per connection: what S3-class stores look like), `s3-100ms` (100 ms, 20 MB/s: another region),
and `gcs-30ms` and `azure-30ms`: the 30 ms shaping in front of gcp-storage-emulator and Azurite
(stream_ssl/testing/emulators.py; a row whose emulator cannot start is left out, saying why). Readers, each pass
in its own process (so none shares a client, a cache or the GIL with the proxy or another reader):

  webdataset       webdataset.WebDataset over the shards in order, one stream per shard (the baseline)
  ours             one pass of a plan with the default mixing (1 rank, --batch), stream_ssl's ReadAhead
  ours unmixed     the same plan with --shuffle-block 0 (stream order)
  litdata          litdata.StreamingDataset over the same samples converted with litdata.optimize (local, S3)
  mosaic           streaming.StreamingDataset over the same samples written with MDSWriter (local, S3)
  ceiling          whole-object GETs of every shard on 8 threads (the store's fsspec client): what the store
                   can give this process
In `local-workers`: ours is stream_ssl.StreamingDataset (decode=None) in its StreamingDataLoader, litdata its
StreamingDataset in its StreamingDataLoader, webdataset its WebDataset in a torch DataLoader; each with --workers
workers and batches of --batch.

Method. --rounds rounds: each round measures every reader of a scenario once, the readers' order rotating from
round to round so that they share the machine's load; figures are the median [min-max] over rounds, and a ratio
is taken within each round, then its median [min-max]. Every consumer reads one byte in every 4 KiB page of each
image, as a decoder would. A pass must hand exactly --samples samples with distinct keys (the ceiling: every
shard once); one that does not is reported as an error, never as a figure. For each pass:

  samples/s        --samples over the time from the start of the reader's construction to its last sample (the
                   headline): ours includes load_shard_set (index.json), make_plan, the ShardReader and every
                   .idx fetch; LitData and Mosaic the construction of their StreamingDataset (their index fetch);
                   webdataset its WebDataset (and DataLoader); the ceiling its store client
  read only        the same from the end of construction (what earlier versions reported)
  first batch      from the start of construction until the first --batch samples are in the consumer's hands
  requests         every HTTP request of the pass, recorded at the proxy: data GETs (.tar objects for ours,
                   webdataset and the ceiling, chunk .bin for LitData, .mds for Mosaic), metadata GETs (any
                   other object: index.json, .idx, ...), HEADs (a GCS object-info GET counts as one), LISTs
  per CPU second   samples over the CPU seconds of the reading process and its children (getrusage RUSAGE_SELF
                   plus RUSAGE_CHILDREN, read after the loader's workers have exited and been reaped)

For ours in each proxied scenario it prints where its pass of median time spent it (construction done, first
data GET, first data byte, first batch, last batch, requests in flight at most); --timeline FILE writes that
pass as JSON: every request (path, method, kind, start, first byte, last byte, bytes), the construction marks
(index.json read, plan made, reader built) and when each batch was handed over, in seconds from the start of
construction (the proxy and the reader share the machine's monotonic clock). LitData and Mosaic need packages
that conflict with this project's pins; install them in another environment (`make bench-venv`) and pass its
Python with --peers-python; without them their columns say why they are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from benchmarks.quick import parse_quick

REPO = Path(__file__).resolve().parent.parent

# scenario -> None (local disk) or (store, latency added to the first byte in s, bytes/s per connection or None)
SCENARIOS = {"local": None, "local-workers": None, "s3": ("s3", 0.0, None), "s3-30ms": ("s3", 0.030, 40e6),
             "s3-100ms": ("s3", 0.100, 20e6), "gcs-30ms": ("gs", 0.030, 40e6), "azure-30ms": ("az", 0.030, 40e6)}
READERS = ("webdataset", "ours", "ours unmixed", "litdata", "mosaic", "ceiling")
WORKER_READERS = ("webdataset", "ours", "litdata")  # local-workers: each in a DataLoader with --workers workers
PEERS = ("litdata", "mosaic")
KINDS = ("data", "meta", "head", "list")  # requests, as the tables print them (`other`: PUTs and the like)
BUCKET = "bench"


# ----------------------------------------------------------------------------------------------------------
# Measurements (each runs in a child process: `stream.py --measure READER ...`; the peers' in stream_peers.py).


def cpu_now() -> float:
    """CPU seconds of this process and of its children that have exited and been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Pass:
    """One timed pass, started at the start of the reader's construction: what the consumer was handed (every
    page touched, keys kept), when construction ended (`constructed`), named `marks`, when each batch was handed
    over and when the first `batch` samples were. `result()` is the JSON line the parent reads."""

    def __init__(self, batch: int):
        self.batch, self.t0, self.cpu0 = batch, time.perf_counter(), cpu_now()
        self.built = self.first = self.last = None
        self.marks: dict[str, float] = {}
        self.batches: list[float] = []
        self.keys: set[str] = set()
        self.count = self.nbytes = self.objects = 0

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def constructed(self) -> None:
        self.built = time.perf_counter()

    def take(self, key: str, buf) -> None:
        """One sample handed over."""
        self.count += 1
        if self.count == self.batch:
            self.first = time.perf_counter()
        self.keys.add(key)
        self.nbytes += touch(buf)
        self.last = time.perf_counter()

    def take_batch(self, keys: list[str], bufs: list) -> None:
        """A batch handed over."""
        now = time.perf_counter()
        self.batches.append(now)
        self.count += len(keys)
        if self.first is None and self.count >= self.batch:
            self.first = now
        self.keys.update(keys)
        self.nbytes += sum(touch(b) for b in bufs)
        self.last = time.perf_counter()

    def take_object(self, samples: int, nbytes: int) -> None:
        """A whole shard arrived (the ceiling: samples counted, not handed over one by one)."""
        self.count += samples
        self.objects += 1
        self.nbytes += nbytes
        self.last = time.perf_counter()
        if self.first is None and self.count >= self.batch:
            self.first = self.last

    def result(self, **extra) -> dict:
        import multiprocessing

        for child in multiprocessing.active_children():  # reaped, so that RUSAGE_CHILDREN holds their CPU
            child.join(30)
        last = self.last or time.perf_counter()
        rel = lambda t: t - self.t0  # noqa: E731
        return {"samples": self.count, "unique": len(self.keys), "objects": self.objects, "bytes": self.nbytes,
                "seconds": rel(last), "read_seconds": last - (self.built or self.t0),
                "first_batch": rel(self.first or last), "cpu_seconds": cpu_now() - self.cpu0, "t0": self.t0,
                "marks": {k: rel(v) for k, v in self.marks.items()}, "batches": [rel(t) for t in self.batches],
                **extra}


def measure_ours(folder: str, options: dict, unmixed: bool, batch: int) -> dict:
    from shard_tools.shardset import load_shard_set
    from stream_ssl.data.plan import make_plan
    from stream_ssl.data.readahead import ReadAhead
    from stream_ssl.data.reader import ShardReader

    p = Pass(batch)
    sets = [load_shard_set(folder, options)]
    p.mark("index")
    n = sets[0].num_samples
    plan = make_plan(sets, n, n, batch_size=batch, shuffle_block=0 if unmixed else None)
    p.mark("plan")
    reader = ShardReader(plan.sets, options)
    p.mark("reader")
    p.constructed()
    for _, samples in ReadAhead(reader, plan, 0, range(plan.steps)):
        p.take_batch([s["__key__"] for s in samples], [s["jpg"] for s in samples])
    stats = reader.stats.snapshot()
    return p.result(gets=stats["requests"], concurrency=reader.fetcher.concurrency)


def measure_ours_workers(folder: str, samples: int, batch: int, workers: int) -> dict:
    from stream_ssl.data.streaming import StreamingDataLoader, StreamingDataset

    p = Pass(batch)
    dataset = StreamingDataset(folder, unique_samples="100%", budget_samples=samples, batch_size=batch, decode=None)
    loader = StreamingDataLoader(dataset, num_workers=workers)
    p.constructed()
    for b in loader:
        p.take_batch(b["__key__"], b["image"])
    return p.result()


def measure_webdataset(urls: list[str], options: dict, batch: int, workers: int = 0) -> dict:
    import webdataset as wds

    from shard_tools.storage import filesystem, protocol_of

    if "://" in urls[0]:  # webdataset opens only local files and http(s) itself: the store's client opens the rest,
        fs = filesystem(urls[0], options)  # with s3fs's defaults for every store (50 MiB blocks read ahead)
        wds.gopen_schemes[protocol_of(urls[0])] = lambda url, mode="rb", bufsize=8192, **kw: fs.open(
            url, "rb", block_size=50 << 20, cache_type="readahead")
    p = Pass(batch)
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if workers:
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch, num_workers=workers)  # shards split by worker
        p.constructed()
        for b in loader:
            p.take_batch(b["__key__"], b["jpg"])
    else:
        p.constructed()
        for sample in dataset:
            p.take(sample["__key__"], sample["jpg"])
    return p.result()


def measure_ceiling(urls: list[str], options: dict, samples: int, batch: int, threads: int = 8) -> dict:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    p = Pass(batch)
    if "://" in urls[0]:
        from shard_tools.storage import filesystem

        get = filesystem(urls[0], options).cat_file
    else:
        get = lambda path: Path(path).read_bytes()  # noqa: E731
    p.constructed()
    with ThreadPoolExecutor(threads) as pool:
        for i, future in enumerate(as_completed([pool.submit(get, u) for u in urls])):
            share = samples * (i + 1) // len(urls) - samples * i // len(urls)
            p.take_object(share, len(future.result()))
    return p.result()


def touch(buf) -> int:
    """Read one byte in every 4 KiB of a sample, as a decoder reads them all, and return its size: a reader that
    hands out views of a memory map pays here for mapping the pages in, one that copies paid when it copied."""
    np.frombuffer(buf, np.uint8)[::4096].sum()
    return len(buf)


def child_main(a) -> int:
    options = json.loads(a.options) if a.options else {}
    urls = a.urls.split(",") if a.urls else []
    if a.measure == "ours" and a.workers:
        out = measure_ours_workers(a.folder, a.samples, a.batch, a.workers)
    elif a.measure in ("ours", "ours unmixed"):
        out = measure_ours(a.folder, options, a.measure == "ours unmixed", a.batch)
    elif a.measure == "webdataset":
        out = measure_webdataset(urls, options, a.batch, a.workers)
    elif a.measure == "ceiling":
        out = measure_ceiling(urls, options, a.samples, a.batch)
    else:
        raise SystemExit(f"unknown reader {a.measure}")
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Requests, as the proxy recorded them.


def kind_of(record: dict, reader: str) -> str:
    """`data`, `meta`, `head`, `list` or `other`, from the request's method and object name: data is what holds
    the samples (.tar shards; LitData's chunk .bin; Mosaic's .mds shards), meta any other object."""
    base, _, query = record["path"].partition("?")
    base = unquote(base)
    if record["method"] == "HEAD":
        return "head"
    if record["method"] != "GET":
        return "other"
    if "list-type=" in query or "comp=list" in query or base.endswith("/o") or base.strip("/").count("/") == 0:
        return "list"  # S3 (a GET of the bucket), Azure (comp=list), GCS (the bucket's /o)
    if "restype=container" in query or ("/storage/v1/b/" in base and "alt=media" not in query):
        return "head"  # a container's or an object's properties (Azure, GCS's JSON API)
    name = base.rsplit("/", 1)[-1]
    data = {"litdata": name.endswith(".bin"), "mosaic": ".mds" in name}.get(reader, name.endswith(".tar"))
    return "data" if data else "meta"


def count_requests(records: list[dict], reader: str) -> dict:
    counts = dict.fromkeys((*KINDS, "other"), 0)
    for r in records:
        counts[kind_of(r, reader)] += 1
    return counts


def in_flight(records: list[dict]) -> int:
    """The most requests open at once (from the proxy receiving one to its last response byte)."""
    events = sorted([(r["start"], 1) for r in records] +
                    [(r["end"] or r["first"] or r["start"], -1) for r in records])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def timeline(r: dict, records: list[dict], reader: str) -> dict:
    """One pass of `r` (a reader's result, with its `t0`) with the proxy's records of it, in seconds from the start
    of construction."""
    rel = lambda t: None if t is None else round(t - r["t0"], 6)  # noqa: E731
    requests = [{"path": x["path"], "method": x["method"], "kind": kind_of(x, reader), "start": rel(x["start"]),
                 "first": rel(x["first"]), "end": rel(x["end"]), "bytes": x["bytes"]} for x in records]
    return {"seconds": r["seconds"], "constructed": r["seconds"] - r["read_seconds"], "marks": r["marks"],
            "first_batch": r["first_batch"], "batches": r["batches"], "in_flight": in_flight(records),
            "requests": requests}


def summarize(name: str, t: dict) -> str:
    data = [x for x in t["requests"] if x["kind"] == "data"]
    firsts = [x["first"] for x in data if x["first"] is not None]
    ms = lambda v: "-" if v is None else f"{v * 1000:,.0f} ms"  # noqa: E731
    marks = ", ".join(f"{k} {ms(v)}" for k, v in t["marks"].items())
    return (f"timeline {name}, ours (round {t['round']}, the median): constructed {ms(t['constructed'])} ({marks}); "
            f"first data GET {ms(min((x['start'] for x in data), default=None))}, first data byte "
            f"{ms(min(firsts, default=None))}; first batch {ms(t['first_batch'])}, last batch "
            f"{ms(t['batches'][-1] if t['batches'] else None)}; at most {t['in_flight']} requests in flight; "
            f"{len(t['requests'])} requests")


# ----------------------------------------------------------------------------------------------------------
# The run.


def write_set(out: Path, samples: int, kb: int, shards: int) -> None:
    import numpy as np

    from shard_tools.writer import ShardWriter

    rng = np.random.default_rng(0)
    w = ShardWriter(out, "bench", -(-samples // shards))
    for i in range(samples):
        size = int(kb * 1024 * rng.uniform(0.8, 1.2))
        w.add(f"{i:09d}", {"jpg": b"\xff\xd8\xff" + rng.bytes(size - 3), "cls": str(i % 10).encode()})
    w.finish(source="bench")


def run_child(python: str, args: list[str], timeout: float = 900) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def serve(store: str):
    """A server of `store` (moto for s3, else its emulator) holding the bucket BUCKET; EmulatorMissing when an
    emulator cannot start."""
    from stream_ssl.testing.emulators import EMULATORS

    if store != "s3":
        server = EMULATORS[store]()
        server.create_bucket(BUCKET)
        return server
    from shard_tools.storage import filesystem
    from stream_ssl.testing.servers import MotoServer

    server = MotoServer()
    filesystem("s3://x", server.options()).call_s3("create_bucket", Bucket=BUCKET)
    return server


def checked(r: dict, expect_samples: int, shards: int, reader: str) -> dict:
    """`r`, or an error when the pass did not hand exactly every sample once (the ceiling: every shard once)."""
    if "error" in r:
        return r
    if reader == "ceiling":
        if r["objects"] != shards or r["samples"] != expect_samples:
            return {"error": f"fetched {r['objects']} objects of {shards}"}
    elif not r["samples"] == r["unique"] == expect_samples:
        return {"error": f"handed {r['samples']} samples with {r['unique']} distinct keys, not {expect_samples}"}
    return r


class Bench:
    def __init__(self, a, tmp: Path):
        self.a, self.tmp = a, tmp
        self.folder = tmp / "set"
        self.peers = tmp / "peers"
        self.results: dict[tuple[str, str], list[dict]] = {}  # (scenario, reader) -> one result per round
        self.timelines: dict[str, dict] = {}  # scenario -> ours's pass of median time
        self.servers: dict[str, object] = {}  # store -> its running server, the set uploaded
        self.missing: dict[str, str] = {}  # store -> why its emulator did not start
        self.runs = 0

    def setup(self) -> None:
        write_set(self.folder, self.a.samples, self.a.sample_kb, self.a.shards)
        self.urls_local = sorted(str(p) for p in self.folder.glob("*.tar"))
        peer = run_child(self.a.peers_python, ["-m", "benchmarks.stream_peers", "convert",
                                               "--tars", ",".join(self.urls_local), "--out", str(self.peers)])
        self.peer_error = peer.get("error")

    def start(self, store: str):
        """The server of `store`, started and filled on first use; None when it cannot start (`missing` says why)."""
        from shard_tools.storage import filesystem
        from stream_ssl.testing.emulators import EmulatorMissing
        from stream_ssl.testing.servers import upload_folder

        if store in self.servers or store in self.missing:
            return self.servers.get(store)
        try:
            server = self.servers[store] = serve(store)
        except EmulatorMissing as e:
            self.missing[store] = str(e)
            return None
        fs = filesystem(f"{store}://{BUCKET}", server.options())
        upload_folder(fs, self.folder, f"{store}://{BUCKET}/set")
        for sub in PEERS if store == "s3" and not self.peer_error else ():
            if (self.peers / sub).exists():
                fs.put(str(self.peers / sub), f"s3://{BUCKET}/{sub}", recursive=True)
        return server

    def readers(self, name: str) -> tuple[str, ...]:
        """The readers of scenario `name`: the peers only where they run (installed; local disk or S3)."""
        store = (SCENARIOS[name] or (None,))[0]
        every = WORKER_READERS if name == "local-workers" else READERS
        return tuple(r for r in every if r not in PEERS or (not self.peer_error and store in (None, "s3")))

    def measure(self, scenario: str, reader: str, store: str | None, endpoint: str | None) -> dict:
        a = self.a
        self.runs += 1  # every pass starts with an empty cache: each is a first epoch
        options = self.servers[store].options(endpoint) if store else {}
        folder = f"{store}://{BUCKET}/set" if store else str(self.folder)
        urls = [f"{folder}/{Path(u).name}" for u in self.urls_local] if store else self.urls_local
        workers = a.workers if scenario == "local-workers" else 0
        common = ["--batch", str(a.batch), "--samples", str(a.samples), "--workers", str(workers)]
        if reader in PEERS:
            where = f"s3://{BUCKET}/{reader}" if store else str(self.peers / reader)
            cache = self.tmp / f"cache-{scenario}-{reader}-{self.runs}"
            try:
                return run_child(a.peers_python, ["-m", "benchmarks.stream_peers", "measure", reader, "--where", where,
                                                  "--endpoint", endpoint or "", "--cache", str(cache), *common])
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        return run_child(sys.executable, ["-m", "benchmarks.stream", "--measure", reader, "--folder", folder,
                                          "--urls", ",".join(urls), "--options", json.dumps(options), *common])

    def one_pass(self, name: str, reader: str, store: str | None, proxy) -> dict:
        """One checked pass of `reader`, with the requests the proxy saw (and, for ours, its timeline)."""
        before = len(proxy.records) if proxy else 0
        r = self.measure(name, reader, store, proxy.endpoint if proxy else None)
        r = checked(r, self.a.samples, len(self.urls_local), reader)
        if proxy and "error" not in r:
            records = proxy.records[before:]
            r["requests"] = count_requests(records, reader)
            if reader == "ours":
                r["timeline"] = timeline(r, records, reader)
        return r

    def scenario(self, name: str) -> None:
        from stream_ssl.testing.servers import FaultProxy

        store, latency, rate = SCENARIOS[name] or (None, 0.0, None)
        proxy = None
        if store is not None:
            server = self.start(store)
            if server is None:
                print(f"  {name:<13} left out: {self.missing[store]}", flush=True)
                return
            proxy = FaultProxy(server.port, latency=latency, rate=rate)
        readers = self.readers(name)
        try:
            for round_ in range(self.a.rounds):  # the order rotates: each reader goes first once in a while
                shift = round_ % len(readers)
                for reader in readers[shift:] + readers[:shift]:
                    r = self.one_pass(name, reader, store, proxy)
                    self.results.setdefault((name, reader), []).append(r)
                    print(f"  {name:<13} round {round_ + 1} {reader:<13} {describe(r)}", flush=True)
        finally:
            if proxy:
                proxy.close()
        self.keep_timeline(name)

    def keep_timeline(self, name: str) -> None:
        """Ours's pass of median time in `name` (its timeline; the others' are dropped)."""
        runs = [(r["seconds"], i, r.pop("timeline")) for i, r in enumerate(self.results.get((name, "ours"), []))
                if "timeline" in r]
        if runs:
            _, i, t = sorted(runs)[(len(runs) - 1) // 2]
            self.timelines[name] = {"reader": "ours", "round": i + 1, **t}

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


def describe(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    n = r["samples"]
    requests = r.get("requests")
    extra = "" if not requests else ", requests " + "/".join(str(requests[k]) for k in KINDS) + " (data/meta/HEAD/LIST)"
    return (f"{n / r['seconds']:>9,.0f} samples/s (read only {n / r['read_seconds']:,.0f}), "
            f"{r['bytes'] / r['seconds'] / 1e6:.1f} MB/s, first batch {r['first_batch'] * 1000:,.0f} ms, "
            f"{n / r['cpu_seconds']:,.0f} per CPU second{extra}")


# ----------------------------------------------------------------------------------------------------------
# The report.

FIGURES = {  # name -> (value of one pass, format)
    "rate": (lambda r: r["samples"] / r["seconds"], "{:,.0f}"),
    "read": (lambda r: r["samples"] / r["read_seconds"], "{:,.0f}"),
    "first": (lambda r: r["first_batch"] * 1000, "{:,.0f}"),
    "cpu": (lambda r: r["samples"] / r["cpu_seconds"], "{:,.0f}"),
}


def spread(values: list[float], fmt: str, failed: int = 0) -> str:
    """median [min-max] of `values` (n/a when there are none), naming the passes that failed."""
    note = f" ({failed} failed)" if failed else ""
    if not values:
        return "n/a" + note
    if len(values) == 1:
        return fmt.format(values[0]) + note
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]" + note


def figure(bench: Bench, name: str, reader: str, key: str) -> str:
    runs = bench.results.get((name, reader), [])
    value, fmt = FIGURES[key]
    return spread([value(r) for r in runs if "error" not in r], fmt, sum("error" in r for r in runs))


def ratio(bench: Bench, name: str, a: str, b: str, key: str = "rate") -> str:
    """a / b of figure `key`, taken within each round where both passes stand, then median [min-max]."""
    value = FIGURES[key][0]
    pairs = zip(bench.results.get((name, a), []), bench.results.get((name, b), []))
    return spread([value(x) / value(y) for x, y in pairs if "error" not in x and "error" not in y], "{:.2f}")


def requests(bench: Bench, name: str, reader: str) -> str:
    """Requests per pass, data/meta/HEAD/LIST (medians over the rounds; other methods named when there are any)."""
    runs = [r["requests"] for r in bench.results.get((name, reader), []) if "requests" in r]
    if not runs:
        return "-"
    other = statistics.median(r["other"] for r in runs)
    split = "/".join(f"{statistics.median(r[k] for r in runs):g}" for k in KINDS)
    return split + (f" +{other:g} other" if other else "")


def table(title: str, names: list[str], columns: list[str], cell) -> None:
    print(f"\n{title}")
    print("| scenario | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(cell(name, c) for c in columns) + " |")


def report(bench: Bench) -> None:
    a = bench.a
    names = [n for n in a.scenarios if any((n, r) in bench.results for r in READERS)]
    proxied = [n for n in names if SCENARIOS[n]]
    print(f"\n{a.samples} samples of ~{a.sample_kb} KB in {a.shards} shards, batch {a.batch}; {os.cpu_count()} CPUs; "
          f"{a.rounds} rounds, the readers' order rotating; median [min-max] over rounds; each pass in its own "
          f"process (local-workers: {a.workers} DataLoader workers)")
    at = lambda key: lambda name, reader: figure(bench, name, reader, key)  # noqa: E731
    table("samples/s, from the start of construction to the last sample", names, list(READERS), at("rate"))
    ratios = {"ours/ceiling": ("ours", "ceiling"), "ours/litdata": ("ours", "litdata"),
              "ours/webdataset": ("ours", "webdataset")}
    table("ratios of samples/s, per round", names, list(ratios), lambda name, c: ratio(bench, name, *ratios[c]))
    table("read only: samples/s from the end of construction", names, list(READERS), at("read"))
    table(f"time to the first batch of {a.batch}, construction included, ms", names, list(READERS), at("first"))
    if proxied:
        table("requests per pass at the proxy: data GETs/metadata GETs/HEADs/LISTs (median)", proxied,
              list(READERS), lambda name, reader: requests(bench, name, reader))
    cpu = [*READERS, "ours/litdata"]
    table("samples per CPU second (the reading process and its children)", names, cpu,
          lambda name, c: ratio(bench, name, "ours", "litdata", "cpu") if c == "ours/litdata" else at("cpu")(name, c))
    report_notes(bench)


def report_notes(bench: Bench) -> None:
    a = bench.a
    print()
    for name in a.scenarios:
        if name in bench.timelines:
            print(summarize(name, bench.timelines[name]))
    for (name, reader), runs in bench.results.items():
        for i, r in enumerate(runs):
            if "error" in r:
                print(f"error: {name}, {reader}, round {i + 1}: {r['error']}")
    for name in a.scenarios:
        store = (SCENARIOS[name] or (None,))[0]
        if store in bench.missing:
            print(f"row {name} left out: {bench.missing[store]}")
    if bench.peer_error:
        print(f"columns litdata and mosaic left out: {bench.peer_error} (install them with `make bench-venv` and pass "
              "--peers-python .venv-bench/bin/python)")
    if a.timeline and bench.timelines:
        Path(a.timeline).write_text(json.dumps(bench.timelines, indent=1))
        print(f"timelines of ours written to {a.timeline}")


# --quick: toy sizes; local, local with workers and the stores at 30 ms (moto and the emulators behind the proxy)
QUICK = {"samples": 48, "sample_kb": 8, "shards": 4, "batch": 8, "rounds": 1,
         "scenarios": "local,local-workers,s3-30ms,gcs-30ms,azure-30ms"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="samples in the shard set, a multiple of --batch "
                                                             "(default 4096)")
    p.add_argument("--sample-kb", type=int, default=52, help="mean sample size in KB (default 52)")
    p.add_argument("--shards", type=int, default=16, help="shards (default 16)")
    p.add_argument("--batch", type=int, default=64, help="batch of our plan and of the loaders (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each measures every reader once (default 5)")
    p.add_argument("--repeats", type=int, dest="rounds", help="deprecated: --rounds")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers in local-workers (default 2)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--peers-python", default=sys.executable,
                   help="a Python with litdata and mosaicml-streaming installed (default: this one)")
    p.add_argument("--timeline", help="write ours's pass of median time in each proxied scenario to this JSON file")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    for hidden in ("--folder", "--urls", "--options"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = parse_quick(p, argv, QUICK)
    if a.measure:
        return a
    if "--repeats" in (argv if argv is not None else sys.argv):
        print("--repeats is deprecated: it now sets --rounds (median [min-max] over rounds, not the best)",
              file=sys.stderr)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    unknown = set(a.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"--scenarios: unknown {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if a.samples % a.batch or a.rounds < 1:
        p.error("--samples must be a multiple of --batch (ours hands out full batches, and every reader must hand "
                "every sample) and --rounds at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.measure:
        return child_main(a)
    tmp = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    bench = Bench(a, tmp)
    try:
        bench.setup()
        for name in a.scenarios:
            bench.scenario(name)
        report(bench)
    finally:
        bench.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
