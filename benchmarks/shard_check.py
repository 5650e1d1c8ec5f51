"""The shard check before training at scale: 1M shards (2M listed entries: every .tar and its .idx).

    python -m benchmarks.shard_check [--shards 1000,100000,1000000] [--latency 0.03]
    python -m benchmarks.shard_check --quick    # 10 and 1500 shards (several list pages), in a second or two

The store is a fake S3 bucket (stream_ssl/testing/listing.py) whose ListObjectsV2 pages of 1000 entries are
generated. The check is the trainer's: check_shards of every shard, given (shard_tools/listing.py on its s3
path: the folder listed by 1000-shard name prefixes, up to 64 at once, every entry looked up, the comparison
with index.json). Measured in the same run, per shard count:

  index       building the in-memory index (ShardSet of N ShardInfo): what load_shard_set gives, the baseline
  listing     consuming the fake listing of the whole folder alone (the floor any listing-based check pays)
  check       the check, every page answered at once (3 missing, 1 resized, 1 without its .idx: the report is
              exercised); what our side costs
  memory      tracemalloc peak during the check (the index itself excluded; the fake store's pages in flight,
              up to 128 of 1000 entries, included)
  at latency  the check again with every list request taking --latency seconds (an asyncio.sleep in the fake
              store, so that requests in flight together overlap), against the same requests one after another
              (requests x latency, what one paginated listing of the folder costs): the target at 1M shards and
              30 ms is <= 5 s

and prints the ratios check / index, check / listing, and one-after-another / measured at latency.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc

import numpy as np

from benchmarks.quick import parse_quick
from shard_tools.listing import check_shards  # noqa: E402
from shard_tools.quantities import format_bytes  # noqa: E402
from stream_ssl.testing.listing import PAGE, FakeBucket, fake_set  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def listing_only(bucket: FakeBucket) -> int:
    """Consume the whole listing without looking at it."""
    from fsspec.asyn import sync

    async def drain() -> int:
        n = 0
        async for _ in bucket._iterdir("bucket", prefix="pool/"):
            n += 1
        return n

    return sync(bucket.loop, drain)


def run(shards: int, latency: float) -> dict:
    gc.collect()
    t_index, index = timed(lambda: fake_set(shards))
    faults = dict(missing=[1, shards // 2, shards - 1], resized=[7 % shards], no_idx=[(shards // 3) or 0])
    t_list, entries = timed(lambda: listing_only(FakeBucket(index, **faults)))
    every = np.arange(shards)
    bucket = FakeBucket(index, **faults)
    t_check, check = timed(lambda: check_shards(index, every, storage_options={}, fs=bucket))
    assert len(check.missing) == 3 and len(check.changed) == 1 and len(check.no_idx) == 1, check.summary()
    store = FakeBucket(index, **faults)  # (the fake store's own lists: not ours)
    gc.collect()
    tracemalloc.start()
    check_shards(index, every, storage_options={}, fs=store)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    slow = FakeBucket(index, **faults, latency=latency)
    t_slow, slow_check = timed(lambda: check_shards(index, every, storage_options={}, fs=slow))
    assert slow_check.summary() == check.summary()
    return {"shards": shards, "entries": entries, "pages": bucket.pages, "listings": bucket.listings,
            "index_s": t_index, "list_s": t_list, "check_s": t_check, "peak": peak, "summary": check.summary(),
            "slow_s": t_slow, "slow_pages": slow.pages, "in_flight": slow.most_in_flight}


QUICK = {"shards": "10,1500"}  # --quick: a few seconds; 3000 entries span several list pages
TARGET = 5.0  # seconds, for 1M shards at 30 ms a request


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="1000,100000,1000000",
                   help="comma-separated shard counts (default: 1000,100000,1000000)")
    p.add_argument("--latency", type=float, default=0.03, help="seconds per list request in the last column "
                   "(default: 0.03)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    a = parse_quick(p, argv, QUICK)
    rows = [run(int(k), a.latency) for k in a.shards.split(",")]
    ms = f"{a.latency * 1000:g} ms"
    print(f"{'shards':>9} {'entries':>9} {'pages':>6} {'prefixes':>8} {'index s':>8} {'listing s':>9} "
          f"{'check s':>8} {'check/index':>11} {'check/listing':>13} {'peak mem':>9} {'B/shard':>8} "
          f"{'at ' + ms + ' s':>11} {'in turn s':>9}")
    for r in rows:
        print(f"{r['shards']:>9,} {r['entries']:>9,} {r['pages']:>6,} {r['listings']:>8,} {r['index_s']:>8.3f} "
              f"{r['list_s']:>9.3f} {r['check_s']:>8.3f} {r['check_s'] / r['index_s']:>11.2f} "
              f"{r['check_s'] / r['list_s']:>13.2f} {format_bytes(r['peak']):>9} {r['peak'] / r['shards']:>8.0f} "
              f"{r['slow_s']:>11.2f} {r['slow_pages'] * a.latency:>9.1f}")
    big = rows[-1]
    print(f"ratio check/index-build at {big['shards']:,} shards: {big['check_s'] / big['index_s']:.2f}; "
          f"check/listing alone: {big['check_s'] / big['list_s']:.2f}")
    one_by_one = big["slow_pages"] * a.latency
    verdict = ("met" if big["slow_s"] <= TARGET else "missed") if big["shards"] >= 1_000_000 and a.latency >= 0.03 \
        else "not measured here: needs 1,000,000 shards at 30 ms"
    print(f"requests: {big['slow_pages']:,} list requests (pages of {PAGE}) in {big['listings']:,} prefix listings "
          f"for {big['entries']:,} entries, up to {big['in_flight']} in flight; at {ms} a request the check took "
          f"{big['slow_s']:.2f} s against {one_by_one:.1f} s one after another: ratio in turn / measured "
          f"{one_by_one / big['slow_s']:.2f} (target at 1M shards: <= {TARGET:g} s, {verdict})")
    print(f"report: {big['summary'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
