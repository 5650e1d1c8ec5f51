"""In-memory shard sets for pure plan tests: no files, just the index a plan reads."""

from __future__ import annotations

from collections import Counter

from shard_tools.shardset import ShardInfo, ShardSet


def fake_set(sizes: list[int], name: str = "set", source: str = "real", bytes_per_sample: int = 1000) -> ShardSet:
    shards = tuple(ShardInfo(f"{name}-{i:06d}.tar", n, n * bytes_per_sample + 1024) for i, n in enumerate(sizes))
    return ShardSet(url=f"/fake/{name}", name=name, source=source, num_samples=sum(sizes), shards=shards,
                    labels=(), meta={})


def pool_of(plan) -> set[tuple[int, int, int]]:
    return {(int(s), int(h), i) for s, h, stop in zip(plan.unit_source, plan.unit_shard, plan.unit_stop)
            for i in range(int(stop))}


def step_samples(plan, step: int) -> list[tuple[int, int, int]]:
    return [x for r in range(plan.world_size) for x in plan.rank_samples(step, r)]


def all_reads(plan) -> Counter:
    out: Counter = Counter()
    for step in range(plan.steps):
        out.update(step_samples(plan, step))
    return out
