"""Object-store bytes per pass and in all, on 1, 2 and 4 simulated nodes, without a cache, with the per-node cache
filled on demand (before: each process stores what it reads), and with the node filler (after); and the time of
a pass with a warm cache against a cold one, at a shaped latency.

    python -m benchmarks.node_cache                                  # 1200 samples of ~52 KB, 4 passes
    python -m benchmarks.node_cache --nodes 1,2 --passes 3 --scenario s3
    python -m benchmarks.node_cache --quick           # every mode on 1 and 2 nodes at toy sizes (seconds)

Every run reads one plan (the pool = the whole set, `--passes` passes, `--world-size` ranks of `--batch`) from
S3 on loopback (moto) behind benchmarks/stream.py's shaping proxy (`--scenario s3-30ms`: 30 ms to the first byte,
40 MB/s per connection). A simulated node is a process with its own cache folder; its world_size / nodes ranks
run as threads, each with its ReadAhead and, in `fill` mode, its NodeFiller. Bytes are the sample bytes the
readers and fillers report (`.idx` files not counted), attributed to the pass the rank was reading when they
arrived; the proxy's count of everything it sent (headers and .idx included) is printed next to them. Modes:

  none        no cache: every pass from the object store (the baseline)
  on-demand   the node cache without the filler (--no-cache-fill): a node stores what its ranks read
  fill        the node cache with the filler (the default): each rank fetches what it reads later, in pass 1

Prints one row per (nodes, mode) with bytes per pass, the total in pools, the plan's expected total and the
bound min(E, K) pools, the ratios fill / on-demand and fill / none per node count, and the cold and warm pass
times at the shaped latency (a warm pass: passes 2+ of the one-node fill run, all read from its cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.quick import parse_quick
from benchmarks.stream import BUCKET, SCENARIOS, run_child, serve, write_set  # noqa: E402
from shard_tools.quantities import SIZE_HELP, size_arg  # noqa: E402

MODES = ("none", "on-demand", "fill")


# ----------------------------------------------------------------------------------------------------------
# One simulated node (a child process: `node_cache.py --node N ...`).


def make_bench_plan(folder: str, options: dict, passes: int, world_size: int, batch: int):
    from shard_tools.shardset import load_shard_set
    from stream_ssl.data.plan import make_plan

    sets = [load_shard_set(folder, options.get("s3"))]
    n = sets[0].num_samples
    return make_plan(sets, n, n * passes, world_size=world_size, batch_size=batch)


def run_rank(plan, rank: int, mode: str, cache_dir: str, options: dict, read_ahead: int,
             step_seconds: float = 0.0) -> dict:
    """Read `rank`'s whole plan; sample bytes from storage and seconds per pass (by the pass the rank reads)."""
    from stream_ssl.data.cache import DiskCache
    from stream_ssl.data.nodecache import NodeFiller, ReaderWaits
    from stream_ssl.data.readahead import ReadAhead
    from stream_ssl.data.reader import ShardReader

    size = 4 * int(plan.summary()["pool_bytes"]) + (64 << 20)

    def reader() -> ShardReader:
        return ShardReader(plan.sets, options, cache=DiskCache(cache_dir, size) if mode != "none" else None,
                           plan=plan)

    main = reader()
    stream = ReadAhead(main, plan, rank, range(plan.steps), read_ahead_bytes=read_ahead)
    filler = NodeFiller(reader(), plan, rank, read_ahead_bytes=read_ahead, frontier=lambda: stream.frontier,
                        starving=ReaderWaits(main.stats)) if mode == "fill" else None
    readers = [main] + ([filler.reader] if filler else [])
    marks: list[tuple[int, float]] = []  # (bytes so far, time) when the rank starts a pass, and at the end

    def mark() -> None:
        marks.append((sum(r.stats.bytes_read for r in readers), time.perf_counter()))

    current = 0
    mark()
    if filler:
        filler.start()
    for step, _ in stream:
        time.sleep(step_seconds)  # the training step (0: read as fast as possible)
        p = step * plan.global_batch // plan.unique_samples
        if p != current:
            mark()
            current = p
    mark()
    if filler:
        filler.stop()
    main.close()
    return {"bytes": [b - a for (a, _), (b, _) in zip(marks, marks[1:])],
            "seconds": [t - s for (_, s), (_, t) in zip(marks, marks[1:])],
            "fill_error": filler.error if filler else ""}


def node_main(a) -> int:
    options = json.loads(a.options)
    plan = make_bench_plan(a.folder, options, a.passes, a.world_size, a.batch)
    per = a.world_size // a.nodes
    results: dict[int, dict] = {}

    def job(rank: int) -> None:
        results[rank] = run_rank(plan, rank, a.mode, a.cache, options, a.read_ahead, a.step_ms / 1000)

    threads = [threading.Thread(target=job, args=(r,)) for r in range(a.node * per, (a.node + 1) * per)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    passes = max(len(r["bytes"]) for r in results.values())
    print(json.dumps({
        "bytes": [sum(r["bytes"][p] for r in results.values() if p < len(r["bytes"])) for p in range(passes)],
        "seconds": [max(r["seconds"][p] for r in results.values() if p < len(r["seconds"])) for p in range(passes)],
        "errors": [r["fill_error"] for r in results.values() if r["fill_error"]]}))
    return 0


# ----------------------------------------------------------------------------------------------------------
# The run.


def run_nodes(a, folder: str, options: dict, nodes: int, mode: str, tmp: Path) -> dict:
    """All `nodes` simulated nodes at once; their per-pass bytes summed, per-pass seconds of the slowest."""
    from concurrent.futures import ThreadPoolExecutor

    cmds = [["-m", "benchmarks.node_cache", "--node", str(n), "--nodes", str(nodes), "--mode", mode, "--folder", folder,
             "--options", json.dumps(options), "--cache", str(tmp / f"cache-{nodes}-{mode}-{n}"),
             "--passes", str(a.passes), "--world-size", str(a.world_size), "--batch", str(a.batch),
             "--read-ahead", str(a.read_ahead), "--step-ms", str(a.step_ms)] for n in range(nodes)]
    with ThreadPoolExecutor(nodes) as pool:
        results = list(pool.map(lambda cmd: run_child(sys.executable, cmd, timeout=1800), cmds))
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"node run failed ({nodes} nodes, {mode}): {failed[0]}")
    passes = max(len(r["bytes"]) for r in results)
    return {"bytes": [sum(r["bytes"][p] for r in results if p < len(r["bytes"])) for p in range(passes)],
            "seconds": [max(r["seconds"][p] for r in results if p < len(r["seconds"])) for p in range(passes)],
            "errors": [e for r in results for e in r["errors"]]}


def report(a, rows: dict, pool: float, expected: dict) -> None:
    from shard_tools.quantities import format_bytes

    mb = lambda x: f"{x / 1e6:.1f}"  # noqa: E731
    print(f"\n{a.samples} samples of ~{a.sample_kb} KB in {a.shards} shards (pool {format_bytes(pool)}), "
          f"{a.passes} passes, {a.world_size} ranks of {a.batch}, {a.step_ms:g} ms per step; scenario {a.scenario}")
    print("| nodes | mode | " + " | ".join(f"pass {p + 1} MB" for p in range(a.passes)) +
          " | total MB | pools | expected (plan) | bound min(E,K) | proxy MB | pass seconds |")
    print("|---" * (a.passes + 8) + "|")
    for (nodes, mode), r in rows.items():
        total = sum(r["bytes"])
        bound = min(a.passes, nodes) if mode != "none" else a.passes
        exp = expected[(nodes, mode)]
        print(f"| {nodes} | {mode} | " + " | ".join(mb(b) for b in r["bytes"]) +
              f" | {mb(total)} | {total / pool:.2f} | {exp / pool:.2f} | {bound} | {mb(r['proxy'])} | " +
              " / ".join(f"{s:.1f}" for s in r["seconds"]) + " |")
    for nodes in a.nodes:
        fill, demand, none = (sum(rows.get((nodes, m), {}).get("bytes", [0])) for m in ("fill", "on-demand", "none"))
        if fill and demand and none:
            print(f"{nodes} node(s): object-store bytes fill / on-demand = {fill / demand:.2f}, "
                  f"fill / none = {fill / none:.2f}")
    cold, warm = rows.get((1, "none")), rows.get((1, "fill"))
    if cold and warm and len(warm["seconds"]) > 1:
        c, w = cold["seconds"][0], sum(warm["seconds"][1:]) / (len(warm["seconds"]) - 1)
        print(f"one pass at {a.scenario}: cold (no cache) {c:.2f} s, warm cache {w:.2f} s: warm is {c / w:.1f}x "
              "faster")


# --quick: a few seconds, every mode on 1 and 2 nodes
QUICK = {"samples": 48, "sample_kb": 4, "shards": 4, "passes": 2, "world_size": 2, "batch": 4, "nodes": "1,2",
         "read_ahead": 64 << 10}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1200, help="samples in the set, all in the pool (default 1200)")
    p.add_argument("--sample-kb", type=int, default=52, help="mean sample size in KB (default 52)")
    p.add_argument("--shards", type=int, default=48, help="shards (default 48)")
    p.add_argument("--passes", type=int, default=4, help="passes over the pool (default 4)")
    p.add_argument("--world-size", type=int, default=4, help="ranks in all, split over the nodes (default 4)")
    p.add_argument("--batch", type=int, default=16, help="per-rank batch (default 16)")
    p.add_argument("--nodes", default="1,2,4", help="simulated node counts, comma-separated (default 1,2,4)")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)} (default all)")
    p.add_argument("--scenario", default="s3-30ms", choices=[s for s, v in SCENARIOS.items() if v and v[0] == "s3"],
                   help="storage shaping, as in benchmarks/stream.py (default s3-30ms: 30 ms, 40 MB/s)")
    p.add_argument("--read-ahead", type=size_arg, default=2 << 20,
                   help=f"read-ahead per rank and per filler, {SIZE_HELP} (default 2MiB: a small part of a pass, as "
                        "256 MiB is of a real pool; one as large as a pass serves several passes from one read)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="simulated training time per step and rank, in ms (default 0: read as fast as possible; "
                        "with compute to hide behind, the filler brings later passes during pass 1)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    for hidden in ("--node", "--mode", "--folder", "--options", "--cache"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = parse_quick(p, argv, QUICK)
    if a.node is not None:
        a.node, a.nodes = int(a.node), int(a.nodes)
        return node_main(a)
    a.nodes = [int(x) for x in a.nodes.split(",") if x]
    a.modes = [m for m in a.modes.split(",") if m]
    if set(a.modes) - set(MODES) or any(a.world_size % k for k in a.nodes):
        p.error(f"--modes must be of {MODES}; --world-size must be a multiple of every --nodes value")
    return run(a)


def run(a) -> int:
    from shard_tools.quantities import parse_bytes
    from shard_tools.storage import filesystem
    from stream_ssl.data.nodecache import storage_summary
    from stream_ssl.testing.servers import FaultProxy, upload_folder

    tmp = Path(tempfile.mkdtemp(prefix="node-cache-bench-"))
    moto = proxy = None
    try:
        write_set(tmp / "set", a.samples, a.sample_kb, a.shards)
        moto = serve("s3")
        folder = f"s3://{BUCKET}/set"
        upload_folder(filesystem(folder, moto.options()), tmp / "set", folder)
        _, latency, rate = SCENARIOS[a.scenario]
        proxy = FaultProxy(moto.port, latency=latency, rate=rate)
        options = moto.options(proxy.endpoint)
        plan = make_bench_plan(str(tmp / "set"), {}, a.passes, a.world_size, a.batch)
        pool = plan.summary()["pool_bytes"]
        rows, expected = {}, {}
        for nodes in a.nodes:
            for mode in a.modes:
                before = proxy.bytes_down
                r = run_nodes(a, folder, options, nodes, mode, tmp)
                r["proxy"] = proxy.bytes_down - before
                rows[(nodes, mode)] = r
                cache = None if mode == "none" else parse_bytes("1T")
                expected[(nodes, mode)] = storage_summary(plan, nodes, cache)["object_store_bytes"]
                print(f"  {nodes} node(s) {mode:<9} bytes per pass {r['bytes']} seconds "
                      f"{[round(s, 2) for s in r['seconds']]} {' '.join(r['errors'])}", flush=True)
        report(a, rows, pool, expected)
    finally:
        if proxy:
            proxy.close()
        if moto:
            moto.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
