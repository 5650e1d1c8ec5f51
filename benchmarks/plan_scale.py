"""Plan time and memory at scale: 1K, 100K and 1M shards holding 1B samples, planned for 512 ranks.

    python -m benchmarks.plan_scale [--shards 1000,100000,1000000] [--samples 1B] [--passes 10]
    python -m benchmarks.plan_scale --quick  # every measurement at toy sizes (seconds): does it still run?

For each shard count it builds the in-memory index (ShardSet with one ShardInfo per shard: what
`load_shard_set` produces from `index.json`; the baseline, measured in the same run) and then times:

  make_plan      pool apportionment + unit arrays (all samples unique: one unit per shard)
  summary        the JSON report
  resume         locate the last step's samples for the last rank on a fresh plan (cold: builds that pass's
                 unit order and the step's mixing window), then again (warm)
  memory         tracemalloc peak while planning, and the plan's own arrays, in bytes per shard

and prints the ratios: plan time / index-build time, per-shard time from one count to the next (1.0 =
linear), plan bytes per shard. Target: 1M shards planned in seconds, memory O(shards).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc

from benchmarks.quick import parse_quick
from shard_tools.quantities import format_bytes, parse_count
from shard_tools.shardset import ShardInfo, ShardSet
from stream_ssl.data.plan import make_plan


def build_index(shards: int, samples: int) -> ShardSet:
    per, extra = divmod(samples, shards)
    infos = tuple(ShardInfo(f"pool-{i:07d}.tar", per + (i < extra), (per + (i < extra)) * 110_000 + 1024, "")
                  for i in range(shards))
    return ShardSet(url="s3://bucket/pool", name="pool", source="real", num_samples=samples, shards=infos,
                    labels=(), meta={})


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(shards: int, samples: int, passes: int, world: int, batch: int) -> dict:
    gc.collect()
    t_index, index = timed(lambda: build_index(shards, samples))
    args = dict(unique_samples=samples, budget_samples=samples * passes, world_size=world, batch_size=batch,
                num_workers=8, seed=0)
    t_plan, plan = timed(lambda: make_plan([index], **args))
    t_summary, _ = timed(plan.summary)
    fresh = make_plan([index], **args)
    t_cold, slices = timed(lambda: fresh.rank_slices(fresh.steps - 1, world - 1))
    t_warm, _ = timed(lambda: fresh.rank_slices(fresh.steps - 2, world - 1))
    assert sum(len(s) for s in slices) == batch
    fresh = None  # noqa: F841  (drop the memoised layouts before measuring memory)
    gc.collect()
    tracemalloc.start()
    make_plan([index], **args).rank_slices(plan.steps - 1, world - 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    plan_bytes = sum(a.nbytes for a in (plan.unit_source, plan.unit_shard, plan.unit_stop, plan.unit_bytes))
    return {"shards": shards, "index_s": t_index, "plan_s": t_plan, "summary_s": t_summary, "resume_cold_s": t_cold,
            "resume_warm_s": t_warm, "peak_bytes": peak, "plan_bytes": plan_bytes, "steps": plan.steps}


QUICK = {"shards": "10,100", "samples": "10K", "passes": 2, "world_size": 4, "batch_size": 8}  # --quick


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="1000,100000,1000000", help="comma-separated shard counts (default: "
                   "1000,100000,1000000)")
    p.add_argument("--samples", default="1B", help="samples over all shards, a count (default: 1B)")
    p.add_argument("--passes", type=int, default=10, help="passes over the samples (default: 10)")
    p.add_argument("--world-size", type=int, default=512, help="ranks the plan is made for (default: 512)")
    p.add_argument("--batch-size", type=int, default=256, help="per-rank batch (default: 256)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    a = parse_quick(p, argv, QUICK)
    samples = parse_count(a.samples)
    rows = [run(int(k), samples, a.passes, a.world_size, a.batch_size) for k in a.shards.split(",")]
    print(f"{samples:,} samples, {a.passes} passes, {a.world_size} ranks x {a.batch_size}")
    print(f"{'shards':>9} {'index s':>8} {'plan s':>8} {'plan/index':>10} {'summary s':>9} {'resume cold':>11} "
          f"{'resume warm':>11} {'peak mem':>10} {'B/shard':>8} {'steps':>8}")
    for r in rows:
        print(f"{r['shards']:>9,} {r['index_s']:>8.3f} {r['plan_s']:>8.3f} {r['plan_s'] / r['index_s']:>10.2f} "
              f"{r['summary_s']:>9.3f} {r['resume_cold_s'] * 1e3:>9.2f}ms {r['resume_warm_s'] * 1e3:>9.2f}ms "
              f"{format_bytes(r['peak_bytes']):>10} {r['peak_bytes'] / r['shards']:>8.0f} {r['steps']:>8,}")
    large = rows[-1]
    print(f"ratio plan/index-build at {large['shards']:,} shards: {large['plan_s'] / large['index_s']:.2f}")
    for small, big in zip(rows, rows[1:]):
        scale = (big["plan_s"] / big["shards"]) / (small["plan_s"] / small["shards"])
        print(f"ratio per-shard plan time {big['shards']:,} vs {small['shards']:,} shards: {scale:.2f} "
              "(<= 1: linear or better)")
    print(f"plan memory: {large['peak_bytes'] / large['shards']:.0f} bytes/shard peak, "
          f"{large['plan_bytes'] / large['shards']:.0f} bytes/shard held")
    ok = large["plan_s"] < 10 and large["peak_bytes"] / large["shards"] < 1000
    print(f"target (1M shards in seconds, O(shards) memory): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
