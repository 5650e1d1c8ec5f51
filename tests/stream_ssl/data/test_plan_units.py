"""Plan details: errors that name the problem, mixes, reports, pickling, mixing actually mixes."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from stream_ssl.data.plan import PlanError, make_plan, parse_mix
from tests.helpers.plans import fake_set, pool_of, step_samples


def test_errors_say_how_many_samples_exist():
    a, b = fake_set([50, 50], "real"), fake_set([30], "gen", source="generated")
    with pytest.raises(ValueError, match="more than the 130 samples available .*real: 100, gen: 30"):
        make_plan([a, b], 131, 1000, batch_size=10)
    with pytest.raises(ValueError, match="asks 65 of the 130 unique samples from gen .* has only 30"):
        make_plan([a, b], 130, 1000, mix="real=1,gen=1", batch_size=10)
    with pytest.raises(ValueError, match="match no shard set"):
        make_plan([a, b], 10, 100, mix="nope=1", batch_size=10)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        make_plan([a], 10, 15, world_size=2, batch_size=8)
    with pytest.raises(ValueError, match="expected name=weight"):
        parse_mix("real")
    with pytest.raises(ValueError, match="must be >= 0"):
        parse_mix("real=-1")


def test_errors_name_the_setting_and_commands_name_the_flag():
    """The plan names its settings as the Python API and YAML files do; the commands turn them into flags."""
    with pytest.raises(PlanError) as info:
        make_plan([fake_set([50, 50], "real")], "5%", 15, world_size=2, batch_size=8)
    assert str(info.value) == "budget_samples 15 is smaller than one global batch of 16 (2 ranks x 8 per rank)"
    assert info.value.as_flag() == "--budget-samples 15 is smaller than one global batch of 16 (2 ranks x 8 per rank)"
    with pytest.raises(PlanError) as info:
        make_plan([fake_set([50], "real")], "0", 100)
    assert info.value.setting == "unique_samples" and info.value.as_flag().startswith("--unique-samples: ")


def test_mix_by_name_or_source_and_fractions():
    a, b = fake_set([100] * 4, "real"), fake_set([100] * 4, "gen", source="generated")
    plan = make_plan([a, b], "0.5", "1K", mix="real=0.75,generated=0.25", batch_size=10)
    assert plan.unique_samples == 400 and plan.per_source == (300, 100)
    assert make_plan([a, b], "10%", 800, batch_size=10).per_source == (40, 40)  # default: by size
    assert make_plan([a, b], 100, 800, mix={"real": 1.0}, batch_size=10).per_source == (100, 0)


def test_summary_and_describe_report_the_run():
    s = make_plan([fake_set([100] * 10, "real")], 250, 1010, world_size=4, batch_size=8, seed=3)
    out = s.summary()
    assert out["sources"][0]["unique"] == 250 and out["sources"][0]["shards_used"] == 3
    assert out["steps"] == 1010 // 32 and out["samples_per_rank"] == 31 * 8 and out["dropped"] == 1010 - 31 * 32
    assert out["passes"] == pytest.approx(4.04) and out["full_passes"] == 4
    assert out["bytes_to_read"] > out["cache_needed_bytes"] > 0
    text = s.describe()
    for words in ("250 unique samples", "4 ranks x 8", "dropped: 18 samples", "mixing: blocks of 2 mixed"):
        assert words in text
    one_pass = make_plan([fake_set([100] * 10)], 1000, 1000, batch_size=10)
    assert one_pass.summary()["cache_needed_bytes"] == 0 and one_pass.last_pass == 0


def test_plans_pickle_for_dataloader_workers():
    plan = make_plan([fake_set([40] * 5)], 150, 600, world_size=2, batch_size=7)
    want = plan.rank_samples(20, 1)
    copy = pickle.loads(pickle.dumps(plan))
    assert copy.rank_samples(20, 1) == want and copy.steps == plan.steps


def test_mixing_spreads_a_step_over_the_window_and_off_keeps_stream_order():
    sets = [fake_set([1000] * 20)]
    mixed = make_plan(sets, 20000, 40000, batch_size=256, shuffle_window=8, shuffle_block=16)
    plain = make_plan(sets, 20000, 40000, batch_size=256, shuffle_block=0)
    assert plain.step_ranges(3) == [(768, 1024)]
    ranges = mixed.step_ranges(3)
    assert sum(b - a for a, b in ranges) == 256 and len(ranges) > 8
    assert max(b for _, b in ranges) - min(a for a, _ in ranges) > 2 * 256  # draws from several steps' span
    assert len(mixed.rank_slices(3, 0)) > len(plain.rank_slices(3, 0))
    # Batch mates change between passes: in its second pass a sample meets few of its first-pass batch mates
    # again (only its own block's), while stream-order steps bring back most of its shard neighbours.
    assert _repeated_mates(mixed) < 0.15 < 0.4 < _repeated_mates(plain)


def _repeated_mates(plan) -> float:
    n, g = plan.unique_samples, plan.global_batch
    mates: dict = {}
    for step in range(plan.steps):
        if step * g // n == ((step + 1) * g - 1) // n:  # steps inside one pass
            batch = set(step_samples(plan, step))
            for x in list(batch)[::17]:
                mates.setdefault(x, []).append(batch - {x})
    overlaps = [len(m[0] & m[1]) / (g - 1) for m in mates.values() if len(m) == 2]
    return sum(overlaps) / len(overlaps)


def test_resume_lookup_at_the_last_step_of_a_large_plan():
    # How long the lookup takes is measured by benchmarks/plan_scale.py, not asserted here.
    sets = [fake_set([1000] * 20000)]  # 20M samples
    plan = make_plan(sets, "1.0", 60_000_000, world_size=64, batch_size=256)
    slices = plan.rank_slices(plan.steps - 1, 63)
    assert sum(len(s) for s in slices) == 256
    assert set(x[:2] for x in plan.rank_samples(plan.steps - 1, 63)) <= {(0, int(u)) for u in plan.unit_shard}


def test_pool_is_a_seeded_prefix_of_shards_with_one_partial_shard():
    plan = make_plan([fake_set([10] * 30)], 95, 95, batch_size=5, seed=2)
    stops = sorted(plan.unit_stop.tolist())
    assert stops == [5] + [10] * 9
    other = make_plan([fake_set([10] * 30)], 95, 95, batch_size=5, seed=3)
    assert pool_of(plan) != pool_of(other)
    assert len(np.unique(plan.unit_shard)) == 10


def test_micro_batches_split_a_rank_batch_for_gradient_accumulation():
    sets = [fake_set([60] * 8)]
    plan = make_plan(sets, 400, 1200, world_size=2, batch_size=12, seed=1)  # 2 ranks x (3 micro-batches of 4)
    flat = make_plan(sets, 400, 1200, world_size=6, batch_size=4, seed=1)  # 6 ranks x 4: the same global batch
    for step in (0, 7, plan.steps - 1):
        for rank in range(2):
            parts = [plan.rank_samples(step, rank, part, 3) for part in range(3)]
            assert all(len(p) == 4 for p in parts)
            assert sorted(x for p in parts for x in p) == sorted(plan.rank_samples(step, rank))
        assert sorted(step_samples(plan, step)) == sorted(step_samples(flat, step))
    items = [list(plan.worker_items(w, 2, start_step=5, parts=3)) for w in range(2)]
    merged = [x for pair in zip(*items) for x in pair]
    assert merged[:6] == [(5, 0), (5, 1), (5, 2), (6, 0), (6, 1), (6, 2)]
    with pytest.raises(ValueError, match="equal parts"):
        plan.rank_slices(0, 0, 0, 5)


def test_the_default_shuffle_block_is_worth_a_request():
    from stream_ssl.data.plan import BLOCK_BYTES, auto_shuffle_block

    assert auto_shuffle_block(256) == 16 and auto_shuffle_block(4096) == 64  # G/16, at most 64 when sizes unknown
    assert auto_shuffle_block(4096, 52_000) == math.ceil(BLOCK_BYTES / 52_000)  # photos: ~4 MB of them
    assert auto_shuffle_block(4096, 5_000) == 256  # thumbnails: G/16 (the mixing bound) before 4 MB
    assert auto_shuffle_block(4096, 2_000_000) == 2 and auto_shuffle_block(8) == 1
    plan = make_plan([fake_set([100] * 10, bytes_per_sample=100_000)], 1000, 2048, batch_size=1024 // 4,
                     world_size=4)
    assert plan.shuffle_block == 40  # 4 MB of 100 KB samples, under G/16 = 64
