"""The DALI path, CPU-only (device_id=None): the same augmentation as the torch path for the same draws,
the loader over a shard set (steps, labels, exact resume, any number of workers), corrupt images skipped
and counted without aborting the run, and a clear error when DALI is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from shard_tools.shardset import load_shard_set
from stream_ssl.data.augment import ViewSpec, decode_views, photometric_with, sample_params
from stream_ssl.data.plan import make_plan
from stream_ssl.data.rng import batch_generator, batch_rng
from stream_ssl.data.streaming import TooManySkipped
from tests.helpers.images import corrupt_copy, photo_like

pytest.importorskip("nvidia.dali")

from stream_ssl.data.dali import DaliAugment, DaliLoader, make_dali_loader, require_dali
from stream_ssl.data.encoded import EncodedBatch, check_encoded, draw_views

pytestmark = pytest.mark.dali

SPECS = [ViewSpec(32, jitter_p=1.0, gray_p=0.4, blur_p=0.5, solarize_p=0.5, blur_kernel=5),
         ViewSpec(24, scale=(0.3, 1.0), flip_p=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)]


@pytest.fixture(scope="module")
def augment():
    return DaliAugment(SPECS, batch_size=8, device_id=None, num_threads=1)


@pytest.fixture(scope="module")
def folder(make_shard_set):
    return make_shard_set(96, shard_size=32, domain="b", seed=4, size=40)


def test_dali_computes_what_the_torch_path_computes(augment):
    datas = [photo_like(96, 72, seed=i) for i in range(7)] + [photo_like(50, 64, seed=9, fmt="PNG")]
    sizes = [check_encoded(d) for d in datas]
    assert sizes[0] == (96, 72) and sizes[-1] == (50, 64)
    draws = draw_views(sizes, SPECS, batch_rng(1, 2, 0), batch_generator(1, 2, 0))
    views = augment.run([np.frombuffer(d, np.uint8) for d in datas], draws)
    rng, g = batch_rng(1, 2, 0), batch_generator(1, 2, 0)  # the same draws through the torch path
    crops = [decode_views(d, SPECS, rng) for d in datas]
    for v, spec in enumerate(SPECS):
        x = torch.from_numpy(np.stack([c[v] for c in crops])).permute(0, 3, 1, 2).contiguous()
        ref = photometric_with(x, sample_params(spec, len(datas), g, "cpu"), spec)
        assert views[v].shape == ref.shape == (8, 3, spec.size, spec.size) and views[v].dtype == torch.float32
        diff = (views[v] - ref).abs()  # normalized units (~4.4 per unit of [0, 1])
        assert diff.mean() < 0.03, (v, float(diff.mean()))
        per_sample = diff.mean((1, 2, 3))
        assert per_sample.max() < 0.08, per_sample  # flips, gray, blur, solarize all agree sample by sample
    assert draws[1].flip.all() and draws[0].gray.any() and draws[0].solarize.any() and draws[0].blur.any()


def test_loader_yields_the_plan_and_resumes_exactly(folder):
    sset = load_shard_set(str(folder))
    plan = make_plan([sset], 96, 160, batch_size=8, seed=3)
    loader = make_dali_loader(plan, 0, SPECS, seed=5, num_threads=1)
    batches = list(loader)
    assert len(loader) == plan.steps == len(batches) == 20
    assert [b.step for b in batches] == list(range(plan.steps))
    for b in batches:
        assert [v.shape for v in b.views] == [(8, 3, 32, 32), (8, 3, 24, 24)]
        assert all(v.dtype == torch.float32 and v.isfinite().all() for v in b.views)
        assert b.labels.shape == (8,) and (b.labels >= 0).all() and len(b.keys) == 8 and b.skipped == 0
    assert sum(b.bytes_read for b in batches) > 0
    assert abs(float(batches[0].views[0].mean())) < 2  # normalized
    resumed = list(DaliLoader(plan, 0, SPECS, start_step=13, num_workers=2, seed=5, num_threads=1))
    assert [b.step for b in resumed] == list(range(13, plan.steps))
    for a, b in zip(batches[13:], resumed):
        assert a.keys == b.keys and torch.equal(a.labels, b.labels)
        for va, vb in zip(a.views, b.views):
            assert torch.equal(va, vb)
    other = next(iter(DaliLoader(plan, 0, SPECS, seed=6, num_threads=1, background=False)))
    assert other.keys == batches[0].keys and not torch.equal(other.views[0], batches[0].views[0])
    micro = list(make_dali_loader(plan, 0, SPECS, start_step=19, seed=5, num_threads=1, micro_batches=2))
    assert [(b.step, b.micro, b.views[0].shape[0]) for b in micro] == [(19, 0, 4), (19, 1, 4)]
    assert sorted(micro[0].keys + micro[1].keys) == sorted(batches[19].keys)


def test_corrupt_images_are_skipped_counted_and_batches_stay_full(folder, tmp_path):
    """A truncated/zeroed JPEG fails the cheap check in the worker; one with an undefined quantization table
    passes it and makes DALI fail: that batch is retried with it replaced. Both counted; nothing aborts."""
    sset = corrupt_copy(folder, tmp_path, {(0, 3): "zeros", (1, 5): "qtable"})
    plan = make_plan([sset], 96, 96, batch_size=8, seed=0, shuffle_block=0)
    loader = DaliLoader(plan, 0, SPECS, num_threads=1, skip_grace=2)
    batches = list(loader)
    assert len(batches) == plan.steps == 12
    assert sum(b.skipped for b in batches) == 2
    assert all(len(b.keys) == 8 and b.views[0].shape[0] == 8 and b.views[1].isfinite().all() for b in batches)
    assert loader.stats.retried_batches == 1 and loader.stats.replaced == 1 and loader.stats.pil_batches == 0
    with pytest.raises(TooManySkipped):
        list(DaliLoader(plan, 0, SPECS, num_threads=1, skip_grace=0, skip_fraction=0.0))


def test_batches_dali_refuses_fall_back_to_the_pil_path(augment, monkeypatch):
    datas = [np.frombuffer(photo_like(64, 48, seed=i), np.uint8) for i in range(4)]
    sizes = [(64, 48)] * 4
    batch = EncodedBatch(7, [], torch.zeros(4, dtype=torch.int64), list("abcd"), 0, data=datas, sizes=sizes,
                         draws=draw_views(sizes, SPECS, batch_rng(0, 7, 0), batch_generator(0, 7, 0)))
    before = augment.stats.pil_batches

    def refuse(*args, **kwargs):
        raise RuntimeError("simulated decoder failure")

    monkeypatch.setattr(augment, "run", refuse)
    with pytest.warns(UserWarning, match="simulated decoder failure"):
        views, replaced = augment(batch)
    assert replaced == 0 and augment.stats.pil_batches == before + 1
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32), (4, 3, 24, 24)]
    assert all(v.dtype == torch.float32 for v in views)
    assert augment.stats.rebuilds >= 1  # a refused batch can leave the pipeline broken: it was built anew
    pipe = augment.pipe
    with pytest.warns(UserWarning):
        augment(batch)
    assert augment.pipe is not pipe
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="refused 8 batches in a row"):
        for _ in range(10):  # a pipeline that keeps failing stops the run instead of crawling on the CPU path
            augment(batch)
    monkeypatch.undo()
    augment.stats.fallbacks_in_a_row = 0
    assert augment(batch)[1] == 0 and augment.stats.fallbacks_in_a_row == 0  # and a good batch resets the count


def test_missing_dali_names_the_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError) as e:
        require_dali()
    for name in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        assert name in str(e.value)
