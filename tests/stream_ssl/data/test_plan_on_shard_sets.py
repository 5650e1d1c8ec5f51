"""Plan arithmetic on real packed shard sets: passes, nesting, equal batches per rank."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from shard_tools.shardset import load_shard_set
from stream_ssl.data.plan import make_plan
from tests.helpers import PYTHON


@pytest.fixture(scope="module")
def pool(make_shard_set):
    return load_shard_set(str(make_shard_set(500, shard_size=60)))


def _reads(plan, rank=None):
    ranks = range(plan.world_size) if rank is None else [rank]
    out = Counter()
    for step in range(plan.steps):
        for r in ranks:
            for s in plan.rank_slices(step, r):
                out.update((s.source, s.shard, i) for i in range(s.start, s.stop))
    return out


def test_passes_with_a_partial_last_pass(pool):
    plan = make_plan([pool], 100, 350, batch_size=10, world_size=1)
    assert plan.full_passes == 3 and plan.passes == 3.5
    reads = _reads(plan)
    assert len(reads) == 100  # exactly the pool
    assert Counter(reads.values()) == {3: 50, 4: 50}  # the partial pass is half the pool
    assert plan.steps == 35 and plan.dropped == 0


def test_pools_are_nested_across_n(pool):
    small = set(_reads(make_plan([pool], 0.1, 500, batch_size=10)))
    large = set(_reads(make_plan([pool], 0.5, 500, batch_size=10)))
    assert len(small) == 50 and len(large) == 250
    assert small < large


def test_every_rank_gets_the_same_number_of_full_batches(pool):
    plan = make_plan([pool], 333, 1000, world_size=3, batch_size=16, num_workers=2)
    assert plan.steps == 1000 // 48 and plan.dropped == 1000 - plan.steps * 48
    assert plan.dropped < plan.global_batch
    per_rank = [sum(len(s) for step in range(plan.steps) for s in plan.rank_slices(step, r)) for r in range(3)]
    assert per_rank == [plan.steps * 16] * 3
    # Ranks read disjoint samples within a step.
    for step in range(plan.steps):
        sets = [set(_expand(plan.rank_slices(step, r))) for r in range(3)]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def _expand(slices):
    return [(s.source, s.shard, i) for s in slices for i in range(s.start, s.stop)]


def test_errors_name_the_problem(pool):
    with pytest.raises(ValueError, match="500 samples available"):
        make_plan([pool], 501, 1000)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        make_plan([pool], 100, 50, batch_size=64)


def test_plan_cli_prints_json(make_shard_set):
    folder = make_shard_set(500, shard_size=60)
    proc = subprocess.run([PYTHON, "-m", "stream_ssl.plan", "--data", str(folder), "--unique-samples", "10%",
                           "--budget-samples", "2K", "--batch-size", "32", "--world-size", "2", "--json"],
                          capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    assert summary["unique_samples"] == 50 and summary["passes"] == 40.0
    assert summary["steps"] == 2000 // 64 and summary["samples_per_rank"] == summary["steps"] * 32
    assert summary["sources"][0]["unique"] == 50
