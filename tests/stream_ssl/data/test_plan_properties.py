"""Property tests of the plan over random shard sizes, N, C, world sizes, workers, batch sizes and mixing
settings, on in-memory shard sets (no files)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stream_ssl.data.plan import make_plan, split_counts
from tests.helpers.plans import all_reads, fake_set, pool_of, step_samples

EXAMPLES = int(os.environ.get("PLAN_EXAMPLES", "120"))  # raise for a longer search
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def plans(draw, max_shards: int = 12, max_shard: int = 40, min_shards: int = 1, min_shard: int = 0,
          max_sets: int = 3, min_unique: int = 1):
    nsets = draw(st.integers(1, max_sets))
    sets = []
    for k in range(nsets):
        sizes = draw(st.lists(st.integers(min_shard, max_shard), min_size=min_shards, max_size=max_shards))
        sets.append(fake_set(sizes, name=f"s{k}"))
    available = sum(s.num_samples for s in sets)
    assume(available >= 1)
    n = draw(st.integers(min(min_unique, available), available))
    world = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 12))
    g = world * batch
    c = draw(st.integers(g, max(g, 4 * n) + 3 * g))
    block = draw(st.sampled_from([0, 1, 3, 8, 64, None]))
    window = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 3))
    plan = make_plan(sets, n, c, world_size=world, batch_size=batch, num_workers=draw(st.integers(0, 3)),
                     seed=seed, shuffle_window=window, shuffle_block=block)
    return plan


@FAST
@given(plans())
def test_every_pool_sample_is_read_the_planned_number_of_times(plan):
    reads = all_reads(plan)
    pool = pool_of(plan)
    assert len(pool) == plan.unique_samples
    assert set(reads) <= pool, "read a sample outside the pool"
    per_source = Counter(src for src, _, _ in pool)
    assert tuple(per_source.get(i, 0) for i in range(len(plan.sets))) == plan.per_source
    assert sum(reads.values()) == plan.samples_seen == plan.steps * plan.global_batch
    assert plan.budget_samples - plan.samples_seen == plan.dropped < plan.global_batch
    e = plan.budget_samples // plan.unique_samples
    counts = [reads.get(x, 0) for x in pool]
    assert max(counts) <= e + 1
    # floor(C/N) or floor(C/N) + 1 times, except what the reported drops took away.
    assert sum(max(0, e - k) for k in counts) <= plan.dropped
    seen = plan.samples_seen
    assert set(counts) <= {seen // plan.unique_samples, seen // plan.unique_samples + 1}


@FAST
@given(plans())
def test_every_rank_gets_the_same_number_of_full_batches(plan):
    for rank in range(plan.world_size):
        sizes = {len(plan.rank_samples(step, rank)) for step in range(plan.steps)}
        assert sizes == {plan.batch_size}
        steps = sorted(s for w in range(max(1, plan.num_workers)) for s in plan.worker_steps(w, plan.num_workers))
        assert steps == list(range(plan.steps))


@FAST
@given(plans(), st.data())
def test_resume_from_any_step_reproduces_the_rest(plan, data):
    start = data.draw(st.integers(0, plan.steps - 1))
    full = {(step, r): plan.rank_samples(step, r) for step in range(plan.steps) for r in range(plan.world_size)}
    # A fresh plan (nothing memoised) asked only for the steps from `start` on: same samples, same order.
    again = make_plan(plan.sets, plan.unique_samples, plan.budget_samples, world_size=plan.world_size,
                      batch_size=plan.batch_size, num_workers=plan.num_workers, seed=plan.seed,
                      shuffle_window=plan.shuffle_window, shuffle_block=plan.shuffle_block)
    workers = max(1, plan.num_workers)
    for r in range(plan.world_size):
        # In the order a DataLoader collects worker outputs: round robin over workers.
        produced = [list(again.worker_steps(w, workers, start)) for w in range(workers)]
        order = [s for i in range(max(map(len, produced))) for p in produced if i < len(p) for s in [p[i]]]
        assert order == list(range(start, plan.steps))
        for step in reversed(order):  # any order of questions gives the same answers
            assert again.rank_samples(step, r) == full[(step, r)]


@FAST
@given(plans(), st.data())
def test_global_batches_do_not_depend_on_world_size(plan, data):
    g = plan.global_batch
    world = data.draw(st.sampled_from([w for w in range(1, g + 1) if g % w == 0]))
    other = make_plan(plan.sets, plan.unique_samples, plan.budget_samples, world_size=world, batch_size=g // world,
                      num_workers=data.draw(st.integers(0, 4)), seed=plan.seed,
                      shuffle_window=plan.shuffle_window, shuffle_block=plan.shuffle_block)
    assert other.steps == plan.steps
    step = data.draw(st.integers(0, plan.steps - 1))
    assert Counter(step_samples(other, step)) == Counter(step_samples(plan, step))


@FAST
@given(plans(max_shards=30, max_shard=30, min_shards=24, min_shard=10, max_sets=1, min_unique=240))
def test_no_sample_twice_in_a_step_when_the_pool_allows(plan):
    # Repeats inside one global batch could only come from the step that straddles a pass boundary; the
    # pass order keeps units out of it when there are enough of them. The plans drawn here have them by
    # construction (>= 240 unique samples in shards of 10-30, global batch <= 48), so hardly any are filtered.
    assume(plan.unique_samples >= 2 * plan.global_batch)
    assume(len(plan.unit_stop) >= 8 and int(plan.unit_stop.max()) <= plan.unique_samples // 4)
    for step in range(plan.steps):
        samples = step_samples(plan, step)
        assert len(set(samples)) == len(samples), f"step {step} repeats a sample"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=8), min_size=1, max_size=4),
       st.lists(st.floats(0.05, 5.0), min_size=4, max_size=4), st.integers(0, 2), st.data())
def test_pools_are_nested_across_n_also_with_a_mix(sizes, weights, seed, data):
    sets = [fake_set(s, name=f"s{i}") for i, s in enumerate(sizes)]
    available = sum(s.num_samples for s in sets)
    assume(available >= 2)
    mix = {s.name: w for s, w in zip(sets, weights)} if data.draw(st.booleans()) else None
    n1 = data.draw(st.integers(1, available - 1))
    n2 = data.draw(st.integers(n1 + 1, available))
    try:
        small = make_plan(sets, n1, n1, mix=mix, batch_size=1, seed=seed)
        large = make_plan(sets, n2, n2, mix=mix, batch_size=1, seed=seed)
    except ValueError as e:  # a mix can ask a source for more than it has
        assert "has only" in str(e)
        return
    assert pool_of(small) <= pool_of(large)
    assert all(a <= b for a, b in zip(small.per_source, large.per_source))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6), st.integers(0, 500))
def test_split_counts_is_exact_proportional_and_house_monotone(weights, total):
    assume(sum(weights) > 0)
    a, b = split_counts(total, weights), split_counts(total + 1, weights)
    assert sum(a) == total and sum(b) == total + 1
    assert all(x <= y for x, y in zip(a, b))
    quota = [total * w / sum(weights) for w in weights]
    assert all(abs(x - q) < len(weights) for x, q in zip(a, quota))
    assert all(x == 0 for x, w in zip(a, weights) if w == 0)


def test_split_counts_known_values():
    assert split_counts(10, [1, 1]) == [5, 5]
    assert split_counts(7, [0.7, 0.3]) == [5, 2]
    assert split_counts(3, [1, 1, 1, 1]) == [1, 1, 1, 0]  # ties go to the lower index
    assert split_counts(0, [1, 2]) == [0, 0]
    with pytest.raises(ValueError):
        split_counts(3, [0, 0])
