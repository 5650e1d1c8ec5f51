"""Start-up at scale: from `train` starting to the first batch, for a 1M-shard set behind 30 ms of latency.

    python -m benchmarks.startup [--shards 1M] [--unique-samples 1M,100M] [--latency 0.03] [--bandwidth 100M]
    python -m benchmarks.startup --quick    # 2,000 shards, in seconds

The store is generated (stream_ssl/testing/fakestore.py), an s3fs stand-in registered for `s3://` in the process:
index.json as the writer writes it (1M shards: about 150 MB, read in 30 ms plus its bytes at --bandwidth, 100
MB/s by default, one connection), the listing of FakeBucket (pages of 1000 entries, 30 ms a request), `.idx`
objects and shard bytes made from their names (100 samples a shard of one 110 KB member each, valid tar headers;
each GET 30 ms plus its bytes at --bandwidth, on its own connection). Everything on our side is the real code,
in the order the trainer runs it (stream_ssl/run.py: build_run, then a loader worker's reader):

  index.json   load_sets: the read (the store's time: latency + bytes / bandwidth) and the parse into ShardInfo
  plan         make_plan, as the trainer calls it (1 process, --num-workers 2, --batch-size 256; -unique and
               --budget as given: N = 1M of the 100M-sample pool, C = 10 N)
  check        require_shards(plan.shards_used()): shard_tools/listing.py against the fake listing
  .idx         a loader worker's ShardReader and ReadAhead (worker 0 of 2, its read-ahead budget), up to the
               first shard GET: the `.idx` GETs of the first round and the read planning
  first batch  from there to ReadAhead yielding step 0's samples (raw bytes: decoding and augmentation are the
               loader's next step, and building the model is not here either)

Each --unique-samples value runs in its own process (a fresh interpreter, so ru_maxrss is its own): once timed,
then again under tracemalloc for the peak of Python allocations per phase (slower; the figures of the timed
run are the ones reported as seconds). Memory: ru_maxrss of the process (its store included: the index.json bytes
it serves, made before the start, is the "before" column) and the tracemalloc peak (our allocations only).
It prints the phases, the total to the first batch against the target (<= 15 s), and the ratio of the total to
the floor every start pays: reading index.json (latency + its bytes at --bandwidth).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import resource
import sys
import time
import tracemalloc

from benchmarks.quick import parse_quick
from shard_tools.quantities import format_bytes, parse_bytes, parse_count

TARGET = 15.0  # seconds to the first batch, 1M shards, 30 ms
PHASES = ("index.json read", "index.json parse", "plan", "shard check", ".idx fetches", "first batch")


class Phases:
    """Seconds and memory of consecutive phases: `mark(name)` ends phase `name`; `split(name, first, seconds)`
    calls its first `seconds` phase `first` (its memory stays with `name`)."""

    def __init__(self, traced: bool):
        self.traced, self.rows, self.t = traced, {}, time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        peak = tracemalloc.get_traced_memory()[1] if self.traced else None
        if self.traced:
            tracemalloc.reset_peak()
        self.rows[name] = {"s": now - self.t, "rss": rss(), "peak": peak}
        self.t = now

    def split(self, name: str, first: str, seconds: float) -> None:
        self.rows[first] = {"s": seconds, "rss": None, "peak": None}
        self.rows[name]["s"] -= seconds


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_up(store, a, unique: str, traced: bool) -> tuple[Phases, dict]:
    """The trainer's start-up against `store`, phase by phase, up to the first batch of worker 0."""
    from shard_tools.listing import require_shards
    from stream_ssl.data.plan import DEFAULT_SHUFFLE_WINDOW, make_plan
    from stream_ssl.data.readahead import DEFAULT_READ_AHEAD, ReadAhead
    from stream_ssl.data.reader import ShardReader
    from stream_ssl.plan import load_sets

    store.log.clear()
    phases = Phases(traced)
    sets = load_sets(store.url, {})
    phases.mark("index.json parse")
    phases.split("index.json parse", "index.json read",
                 next(end - start for kind, start, end in store.log if kind == "index.json"))
    plan = make_plan(sets, unique, a.budget, None, 1, a.workers, a.batch_size, 0,
                     shuffle_window=DEFAULT_SHUFFLE_WINDOW, shuffle_block=None)
    phases.mark("plan")
    checks = require_shards(plan.shards_used(), {})
    phases.mark("shard check")
    begun = time.perf_counter()
    reader = ShardReader(plan.sets, {}, plan=plan)
    stream = ReadAhead(reader, plan, 0, plan.worker_items(0, a.workers, 0, 1),
                       read_ahead_bytes=DEFAULT_READ_AHEAD // a.workers)
    try:
        step, samples = next(iter(stream))
    finally:
        stream.close()
        reader.close()
    phases.mark("first batch")
    first_get = min(start for kind, start, _ in store.log if kind == "shard")
    phases.split("first batch", ".idx fetches", first_get - begun)
    assert step == (0, 0) and len(samples) == a.batch_size, (step, len(samples))
    info = {"pool_shards": len(checks[0].shards), "listings": checks[0].listings, "steps": plan.steps,
            "units": len(plan.unit_shard), "samples": len(samples),
            "idx_gets": store.requests("idx"), "shard_gets": store.requests("shard"),
            "shard_bytes": sum(len(s.get("jpg", b"")) for s in samples), "list_requests": store.listing.pages}
    return phases, info


def measure(a, unique: str) -> dict:
    """One --unique-samples value, in this (fresh) process: the store, a timed start-up, a traced one."""
    from stream_ssl.testing.fakestore import FakeStore, Layout, serving

    store = FakeStore(Layout(a.shards, a.samples_per_shard, a.sample_bytes), a.latency, a.bandwidth)
    index_bytes = len(store.index)  # (made now, before the start)
    gc.collect()
    before = rss()
    with serving(store):
        pages_before = store.listing.pages
        timed, info = start_up(store, a, unique, traced=False)
        info["list_requests"] -= pages_before
        after = max_rss()
        traced = None
        if a.traced:
            gc.collect()
            tracemalloc.start()
            traced, _ = start_up(store, a, unique, traced=True)
            tracemalloc.stop()
    return {"unique": unique, "phases": timed.rows, "traced": traced.rows if traced else None, "info": info,
            "index_bytes": index_bytes, "rss_before": before, "rss_peak": after}


def report(a, r: dict) -> None:
    info, rows = r["info"], r["phases"]
    total = sum(p["s"] for p in rows.values())
    floor = a.latency + r["index_bytes"] / a.bandwidth
    print(f"\nN = {r['unique']} unique samples of {a.shards * a.samples_per_shard:,} ({a.shards:,} shards), "
          f"C = {a.budget}, batch {a.batch_size}, {a.workers} workers: {info['steps']:,} steps, "
          f"{info['units']:,} plan units")
    print(f"{'phase':<18} {'seconds':>8} {'RSS after':>10} {'traced peak':>12}  what")
    what = {"index.json read": f"{format_bytes(r['index_bytes'])}: {a.latency * 1e3:g} ms + bytes at "
                               f"{format_bytes(a.bandwidth)}/s",
            "index.json parse": f"{a.shards:,} ShardInfo", "plan": "make_plan",
            "shard check": f"{info['pool_shards']:,} shards: {info['listings']:,} listings, "
                           f"{info['list_requests']:,} list requests",
            ".idx fetches": f"reader set-up to its first shard GET ({info['idx_gets']:,} .idx GETs in all up to the "
                            "first batch)",
            "first batch": f"{info['samples']} samples, {format_bytes(info['shard_bytes'])} ({info['shard_gets']:,} "
                           "shard GETs issued by then)"}
    for name in PHASES:
        peak = r["traced"][name]["peak"] if r["traced"] else None
        shown = [format_bytes(x) if x is not None else "-" for x in (rows[name]["rss"], peak)]
        print(f"{name:<18} {rows[name]['s']:>8.2f} {shown[0]:>10} {shown[1]:>12}  {what[name]}")
    verdict = "met" if total <= TARGET else "missed"
    print(f"total to the first batch: {total:.2f} s (target <= {TARGET:g} s at 1M shards and 30 ms: {verdict}); "
          f"ratio total / index.json read alone (the floor, {floor:.2f} s): {total / floor:.2f}")
    traced = max(p["peak"] or 0 for p in r["traced"].values()) if r["traced"] else None
    print(f"peak memory: ru_maxrss {format_bytes(r['rss_peak'])} (RSS before the start, the store's index.json "
          f"included: {format_bytes(r['rss_before'])}); tracemalloc peak "
          f"{format_bytes(traced) if traced is not None else 'n/a (--no-traced)'}")


QUICK = {"shards": "2000", "samples_per_shard": 20, "sample_bytes": "50000", "unique_samples": "4K,40K",
         "budget": "80K", "batch_size": 32}  # --quick: seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="1M", help="shards in the generated set, a count (default: 1M)")
    p.add_argument("--samples-per-shard", type=int, default=100, help="samples in each shard (default: 100)")
    p.add_argument("--sample-bytes", default="110000", help="bytes of a sample's one member (default: 110000)")
    p.add_argument("--unique-samples", default="1M,100M", help="N, comma-separated: one start-up each, in its own "
                   "process (default: 1M,100M: a 1%% pool, and every shard)")
    p.add_argument("--budget", default="10M", help="C, the budget (default: 10M)")
    p.add_argument("--batch-size", type=int, default=256, help="per-rank batch of the plan (default: 256)")
    p.add_argument("--workers", type=int, default=2, help="loader workers per process (default: 2)")
    p.add_argument("--latency", type=float, default=0.03, help="seconds per request (default: 0.03)")
    p.add_argument("--bandwidth", default="100M", help="bytes/s of one request (default: 100M)")
    p.add_argument("--traced", action=argparse.BooleanOptionalAction, default=True,
                   help="also run each start-up under tracemalloc, for its peak (default: on)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    a = parse_quick(p, argv, QUICK)
    a.shards, a.sample_bytes = parse_count(a.shards), parse_bytes(a.sample_bytes)
    a.bandwidth = parse_bytes(a.bandwidth)
    ctx = multiprocessing.get_context("spawn")
    for unique in a.unique_samples.split(","):
        with ctx.Pool(1) as pool:
            report(a, pool.apply(measure, (a, unique)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
