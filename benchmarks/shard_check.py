"""The shard check before training at scale: 1M shards (2M listed entries: every .tar and its .idx).

    python -m benchmarks.shard_check [--shards 1000,100000,1000000]
    python -m benchmarks.shard_check --quick    # 10 and 1500 shards (two list pages), in a second or two

The store is a fake S3 bucket (stream_ssl/testing/listing.py) whose ListObjectsV2 pages of 1000 entries are
generated, so what is measured is our side of the check (shard_tools/listing.py on its s3 path: the pages
consumed, every entry looked up, the comparison with index.json), not a store's latency. Measured in the same
run, per shard count:

  index       building the in-memory index (ShardSet of N ShardInfo): what load_shard_set gives, the baseline
  listing     consuming the fake listing alone (the floor any listing-based check pays)
  check       check_shards on every shard (3 missing, 1 resized, 1 without its .idx: the report is exercised)
  memory      tracemalloc peak during the check (the index itself excluded)

and prints the ratios check / index and check / listing. A real store adds one request per page: the line
"requests" gives the page count and what it costs at 30 ms and 100 ms a page.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc

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


def run(shards: int) -> dict:
    gc.collect()
    t_index, index = timed(lambda: fake_set(shards))
    faults = dict(missing=[1, shards // 2, shards - 1], resized=[7 % shards], no_idx=[(shards // 3) or 0])
    t_list, entries = timed(lambda: listing_only(FakeBucket(index, **faults)))
    bucket = FakeBucket(index, **faults)
    t_check, check = timed(lambda: check_shards(index, storage_options={}, fs=bucket))
    assert len(check.missing) == 3 and len(check.changed) == 1 and len(check.no_idx) == 1, check.summary()
    gc.collect()
    tracemalloc.start()
    check_shards(index, storage_options={}, fs=FakeBucket(index, **faults))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"shards": shards, "entries": entries, "pages": bucket.pages, "index_s": t_index, "list_s": t_list,
            "check_s": t_check, "peak": peak, "summary": check.summary()}


QUICK = {"shards": "10,1500"}  # --quick: a few seconds; 3000 entries span several list pages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="1000,100000,1000000",
                   help="comma-separated shard counts (default: 1000,100000,1000000)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    a = parse_quick(p, argv, QUICK)
    rows = [run(int(k)) for k in a.shards.split(",")]
    print(f"{'shards':>9} {'entries':>9} {'pages':>6} {'index s':>8} {'listing s':>9} {'check s':>8} "
          f"{'check/index':>11} {'check/listing':>13} {'peak mem':>9} {'B/shard':>8}")
    for r in rows:
        print(f"{r['shards']:>9,} {r['entries']:>9,} {r['pages']:>6,} {r['index_s']:>8.3f} {r['list_s']:>9.3f} "
              f"{r['check_s']:>8.3f} {r['check_s'] / r['index_s']:>11.2f} {r['check_s'] / r['list_s']:>13.2f} "
              f"{format_bytes(r['peak']):>9} {r['peak'] / r['shards']:>8.0f}")
    big = rows[-1]
    print(f"ratio check/index-build at {big['shards']:,} shards: {big['check_s'] / big['index_s']:.2f}; "
          f"check/listing alone: {big['check_s'] / big['list_s']:.2f}")
    print(f"requests: {big['pages']:,} list pages of {PAGE} for {big['entries']:,} entries; on a store answering "
          f"a page in 30 ms / 100 ms that adds {big['pages'] * 0.03:.0f} s / {big['pages'] * 0.1:.0f} s")
    print(f"report: {big['summary'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
