"""Streaming throughput without decoding, side by side in one run: our reader, plain webdataset, LitData and
MosaicML Streaming (when installed), and the raw ceiling of parallel whole-object GETs; from local disk, from
S3 on loopback (moto), and from S3, Google Cloud Storage and Azure Blob (their emulators) behind a proxy that
makes each behave like a real object store.

    python -m benchmarks.stream                       # 4000 samples of ~52 KB in 16 shards, every scenario
    python -m benchmarks.stream --peers-python .venv-bench/bin/python   # LitData / Mosaic live there
    python -m benchmarks.stream --scenarios local,s3-30ms --samples 2000
    python -m benchmarks.stream --quick                 # every reader once, local and the 30 ms stores, toy sizes

Scenarios: `local` (page cache warm), `s3` (moto on 127.0.0.1, no shaping), `s3-30ms` (30 ms added to the first
byte of every request, 40 MB/s per connection: what S3-class stores look like), `s3-100ms` (100 ms, 20 MB/s:
another region), and `gcs-30ms` and `azure-30ms`: the 30 ms shaping in front of gcp-storage-emulator and Azurite
(stream_ssl/testing/emulators.py; a row whose emulator cannot start is left out, saying why). Readers, each timed
over one pass in its own process (so none shares a client, a cache or the GIL with the proxy):

  webdataset       webdataset.WebDataset over the shards in order, one stream per shard (the baseline)
  ours             one pass of a plan with the default mixing (1 rank, batch 64), stream_ssl's ReadAhead
  ours unmixed     the same plan with --shuffle-block 0 (stream order)
  litdata          litdata.StreamingDataset over the same samples converted with litdata.optimize (S3 rows)
  mosaic           streaming.StreamingDataset over the same samples written with MDSWriter (S3 rows)
  ceiling          whole-object GETs of every shard on 8 threads (the store's fsspec client): what the store
                   can give this process

and prints samples/s, MB/s, GET requests (counted at the proxy) and the ratios that matter: ours against the
ceiling, against LitData and against webdataset, in each scenario. LitData and Mosaic need packages that
conflict with this project's pins; install them in another environment (`make bench-venv`) and pass its
Python with --peers-python; without them their rows say why they are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.quick import parse_quick

REPO = Path(__file__).resolve().parent.parent

# scenario -> None (local disk) or (store, latency added to the first byte in s, bytes/s per connection or None)
SCENARIOS = {"local": None, "s3": ("s3", 0.0, None), "s3-30ms": ("s3", 0.030, 40e6), "s3-100ms": ("s3", 0.100, 20e6),
             "gcs-30ms": ("gs", 0.030, 40e6), "azure-30ms": ("az", 0.030, 40e6)}
READERS = ("webdataset", "ours", "ours unmixed", "litdata", "mosaic", "ceiling")
BUCKET = "bench"


# ----------------------------------------------------------------------------------------------------------
# Measurements (each runs in a child process: `stream.py --measure READER ...`).


def measure_ours(folder: str, options: dict, unmixed: bool, batch: int) -> dict:
    from shard_tools.shardset import load_shard_set
    from stream_ssl.data.plan import make_plan
    from stream_ssl.data.readahead import ReadAhead
    from stream_ssl.data.reader import ShardReader

    sets = [load_shard_set(folder, options)]
    n = sets[0].num_samples
    plan = make_plan(sets, n, n, batch_size=batch, shuffle_block=0 if unmixed else None)
    reader = ShardReader(plan.sets, options)
    t0, c0 = time.perf_counter(), time.process_time()
    count = nbytes = 0
    for _, samples in ReadAhead(reader, plan, 0, range(plan.steps)):
        count += len(samples)
        nbytes += sum(touch(s["jpg"]) for s in samples)
    stats = reader.stats.snapshot()
    return {"samples": count, "bytes": nbytes, **_times(t0, c0), "gets": stats["requests"],
            "concurrency": reader.fetcher.concurrency}


def measure_webdataset(urls: list[str], options: dict) -> dict:
    import webdataset as wds

    from shard_tools.storage import filesystem, protocol_of

    if "://" in urls[0]:  # webdataset opens only local files and http(s) itself: the store's client opens the rest,
        fs = filesystem(urls[0], options)  # with s3fs's defaults for every store (50 MiB blocks read ahead)
        wds.gopen_schemes[protocol_of(urls[0])] = lambda url, mode="rb", bufsize=8192, **kw: fs.open(
            url, "rb", block_size=50 << 20, cache_type="readahead")
    t0, c0 = time.perf_counter(), time.process_time()
    count = nbytes = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        count += 1
        nbytes += touch(sample["jpg"])
    return {"samples": count, "bytes": nbytes, **_times(t0, c0)}


def measure_ceiling(urls: list[str], options: dict, samples: int, threads: int = 8) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    if "://" in urls[0]:
        from shard_tools.storage import filesystem

        get = filesystem(urls[0], options).cat_file
    else:
        get = lambda path: Path(path).read_bytes()  # noqa: E731
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(len(b) for b in pool.map(get, urls))
    return {"samples": samples, "bytes": nbytes, **_times(t0, c0)}


def touch(buf) -> int:
    """Read one byte in every 4 KiB of a sample, as a decoder reads them all, and return its size: a reader that
    hands out views of a memory map pays here for mapping the pages in, one that copies paid when it copied."""
    np.frombuffer(buf, np.uint8)[::4096].sum()
    return len(buf)


def _times(t0: float, c0: float) -> dict:
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def child_main(a) -> int:
    options = json.loads(a.options) if a.options else {}
    urls = a.urls.split(",") if a.urls else []
    if a.measure in ("ours", "ours unmixed"):
        out = measure_ours(a.folder, options, a.measure == "ours unmixed", a.batch)
    elif a.measure == "webdataset":
        out = measure_webdataset(urls, options)
    elif a.measure == "ceiling":
        out = measure_ceiling(urls, options, a.samples)
    else:
        raise SystemExit(f"unknown reader {a.measure}")
    print(json.dumps(out))
    return 0


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


class Bench:
    def __init__(self, a, tmp: Path):
        self.a, self.tmp = a, tmp
        self.folder = tmp / "set"
        self.peers = tmp / "peers"
        self.results: dict[tuple[str, str], dict] = {}
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
        for sub in ("litdata", "mosaic") if store == "s3" and not self.peer_error else ():
            if (self.peers / sub).exists():
                fs.put(str(self.peers / sub), f"s3://{BUCKET}/{sub}", recursive=True)
        return server

    def measure(self, scenario: str, reader: str, store: str | None, endpoint: str | None) -> dict:
        a = self.a
        self.runs += 1  # every pass starts with an empty cache: each is a first epoch
        options = self.servers[store].options(endpoint) if store else {}
        folder = f"{store}://{BUCKET}/set" if store else str(self.folder)
        urls = [f"{folder}/{Path(u).name}" for u in self.urls_local] if store else self.urls_local
        if reader in ("litdata", "mosaic"):
            if self.peer_error or store not in (None, "s3"):
                return {"error": self.peer_error or "the peers read S3 only here"}
            where = f"s3://{BUCKET}/{reader}" if store else str(self.peers / reader)
            return run_child(a.peers_python, ["-m", "benchmarks.stream_peers", "measure", reader,
                                              "--where", where, "--endpoint", endpoint or "",
                                              "--cache", str(self.tmp / f"cache-{scenario}-{reader}-{self.runs}")])
        return run_child(sys.executable, ["-m", "benchmarks.stream", "--measure", reader, "--folder", folder,
                                          "--urls", ",".join(urls), "--options", json.dumps(options),
                                          "--batch", str(a.batch), "--samples", str(a.samples)])

    def scenario(self, name: str) -> None:
        from stream_ssl.testing.servers import FaultProxy

        store, latency, rate = SCENARIOS[name] or (None, 0.0, None)
        proxy = None
        if store is not None:
            server = self.start(store)
            if server is None:
                print(f"  {name:<10} left out: {self.missing[store]}", flush=True)
                return
            proxy = FaultProxy(server.port, latency=latency, rate=rate)
        try:
            for _ in range(self.a.repeats):  # readers alternate, so each sees the same load; best kept
                for reader in READERS:
                    before = proxy.requests if proxy else 0
                    r = self.measure(name, reader, store, proxy.endpoint if proxy else None)
                    if proxy and "error" not in r:
                        r["requests"] = proxy.requests - before
                    best = self.results.get((name, reader))
                    if best is None or "error" in best or ("seconds" in r and r["seconds"] < best["seconds"]):
                        self.results[(name, reader)] = r
                    print(f"  {name:<10} {reader:<13} {describe(r)}", flush=True)
        finally:
            if proxy:
                proxy.close()

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


def describe(r: dict) -> str:
    if "error" in r:
        return f"n/a ({r['error']})"
    rate = r["samples"] / r["seconds"]
    extra = f", {r['requests']} requests" if "requests" in r else ""
    cpu = f", {r['samples'] / r['cpu_seconds']:,.0f} per CPU second" if r.get("cpu_seconds") else ""
    return f"{rate:>9,.0f} samples/s {r['bytes'] / r['seconds'] / 1e6:>7.1f} MB/s{extra}{cpu}"


def ratio(results: dict, scenario: str, a: str, b: str) -> str:
    ra, rb = results.get((scenario, a), {}), results.get((scenario, b), {})
    if "seconds" not in ra or "seconds" not in rb:
        return "n/a"
    return f"{(ra['samples'] / ra['seconds']) / (rb['samples'] / rb['seconds']):.2f}"


def report(bench: Bench) -> None:
    a, res = bench.a, bench.results
    print(f"\n{a.samples} samples of ~{a.sample_kb} KB in {a.shards} shards; one process; {os.cpu_count()} CPUs; "
          f"samples/s, best of {a.repeats}")
    print("| scenario | " + " | ".join(READERS) + " | ours/ceiling | ours/litdata | ours/webdataset | "
          "ours GETs per pass (shards) |")
    print("|---" * (len(READERS) + 5) + "|")
    for name in a.scenarios:
        cells = []
        for reader in READERS:
            r = res.get((name, reader), {})
            cells.append("n/a" if "seconds" not in r else f"{r['samples'] / r['seconds']:,.0f}")
        gets = res.get((name, "ours"), {}).get("requests", "-")
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio(res, name, 'ours', 'ceiling')} | "
              f"{ratio(res, name, 'ours', 'litdata')} | {ratio(res, name, 'ours', 'webdataset')} | "
              f"{gets} ({a.shards}) |")
    if "local" in a.scenarios:  # local reads are CPU work: per CPU second holds up on a loaded machine
        cpu = {r: res.get(("local", r), {}) for r in ("ours", "ours unmixed", "litdata", "webdataset")}
        per = {r: v["samples"] / v["cpu_seconds"] for r, v in cpu.items() if v.get("cpu_seconds")}
        if "ours" in per and "litdata" in per:
            print(f"local, samples per CPU second: ours {per['ours']:,.0f}, LitData {per['litdata']:,.0f} "
                  f"(ratio {per['ours'] / per['litdata']:.2f})")
    for name in a.scenarios:
        store = (SCENARIOS[name] or (None,))[0]
        if store in bench.missing:
            print(f"row {name} left out: {bench.missing[store]}")
    if bench.peer_error:
        print(f"columns litdata and mosaic left out: {bench.peer_error} (install them with `make bench-venv` and pass "
              "--peers-python .venv-bench/bin/python)")


# --quick: toy sizes; local and the stores at 30 ms (moto and the emulators behind the proxy)
QUICK = {"samples": 48, "sample_kb": 8, "shards": 4, "batch": 8, "repeats": 1,
         "scenarios": "local,s3-30ms,gcs-30ms,azure-30ms"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4000, help="samples in the shard set (default 4000)")
    p.add_argument("--sample-kb", type=int, default=52, help="mean sample size in KB (default 52)")
    p.add_argument("--shards", type=int, default=16, help="shards (default 16)")
    p.add_argument("--batch", type=int, default=64, help="batch of our plan (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="passes per reader, alternating; the best is kept (2)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--peers-python", default=sys.executable,
                   help="a Python with litdata and mosaicml-streaming installed (default: this one)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    for hidden in ("--folder", "--urls", "--options"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = parse_quick(p, argv, QUICK)
    if a.measure:
        return child_main(a)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    unknown = set(a.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"--scenarios: unknown {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
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
