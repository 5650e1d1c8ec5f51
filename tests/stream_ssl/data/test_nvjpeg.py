"""`--decoder nvjpeg`: workers send JPEG bytes and crop boxes, the training process decodes (torchvision's nvJPEG
on a GPU, its CPU decoder here) and crops on the device. The crops are the PIL path's, the views close to its
pixels, non-JPEG and undecodable samples fall back and are counted, and a resumed loader gives the same batches.
The CUDA decode itself runs where a GPU is (benchmarks/gpu_check.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shard_tools.shardset import load_shard_set
from shard_tools.writer import ShardWriter
from stream_ssl.data import augment, encoded
from stream_ssl.data.augment import simclr_views
from stream_ssl.data.encoded import EncodedBatch
from stream_ssl.data.loader import make_loader
from stream_ssl.data.nvjpeg import NvjpegLoader, make_nvjpeg_loader
from stream_ssl.data.plan import make_plan
from tests.helpers.images import photo_like, undefined_qtable

VIEWS = simclr_views(32)


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    """48 photo-like JPEGs of a few sizes, and one PNG (the CPU fallback)."""
    out = tmp_path_factory.mktemp("nvjpeg") / "set"
    w = ShardWriter(out, "set", 16)
    for i in range(48):
        if i == 5:
            buf = io.BytesIO()
            Image.open(io.BytesIO(photo_like(80, 60, seed=i))).save(buf, "PNG")
            w.add(f"{i:06d}", {"png": buf.getvalue(), "cls": b"1"})
        else:
            w.add(f"{i:06d}", {"jpg": photo_like((96, 80, 120)[i % 3], (72, 64, 90)[i % 3], seed=i),
                               "cls": str(i % 4).encode()})
    w.finish(source="test")
    return load_shard_set(str(out))


def _plan(s):
    return make_plan([s], 48, 96, batch_size=12, seed=3)


def _boxes(monkeypatch, module) -> list:
    """Record the crop draws a module makes (its draw_geometry)."""
    seen = []
    real = module.draw_geometry

    def record(w, h, specs, rng):
        out = real(w, h, specs, rng)
        seen.append([(g.box, g.flip) for g in out])
        return out

    monkeypatch.setattr(module, "draw_geometry", record)
    return seen


def test_the_crops_are_the_pil_paths(jpeg_set, monkeypatch):
    plan = _plan(jpeg_set)
    pil = _boxes(monkeypatch, augment)
    list(make_loader(plan, 0, VIEWS, seed=5))
    gpu = _boxes(monkeypatch, encoded)
    list(make_nvjpeg_loader(plan, 0, VIEWS, seed=5))
    assert len(pil) == len(gpu) == plan.steps * plan.batch_size and pil == gpu


def test_views_are_close_to_the_pil_paths_and_decoded_on_the_device(jpeg_set):
    plan = _plan(jpeg_set)
    pil = list(make_loader(plan, 0, VIEWS, seed=5))
    loader = make_nvjpeg_loader(plan, 0, VIEWS, seed=5, device="cpu")
    nv = list(loader)
    assert [b.keys for b in nv] == [b.keys for b in pil] and all(torch.equal(a.labels, b.labels)
                                                                  for a, b in zip(nv, pil))
    for a, b in zip(nv, pil):
        for va, vb in zip(a.views, b.views):
            assert va.dtype == torch.uint8 and va.shape == vb.shape
            diff = (va.float() - vb.float()).abs()
            assert diff.mean() < 6, diff.mean()  # resampling filters differ (PIL also decodes at DCT scale)
    assert loader.stats.cpu_decoded == 2 and loader.stats.replaced == 0  # the PNG, once per pass
    assert loader.stats.images == plan.steps * plan.batch_size


def test_a_resumed_loader_gives_the_same_batches(jpeg_set):
    plan = _plan(jpeg_set)
    straight = list(make_nvjpeg_loader(plan, 0, VIEWS, seed=5, num_workers=2))
    resumed = list(make_nvjpeg_loader(plan, 0, VIEWS, start_step=5, seed=5))
    assert [b.step for b in resumed] == list(range(5, plan.steps))
    for a, b in zip(straight[5:], resumed):
        assert a.keys == b.keys and all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_an_image_no_decoder_reads_is_replaced_and_counted():
    good = [np.frombuffer(photo_like(64, 48, seed=i), np.uint8) for i in range(4)]
    bad = np.frombuffer(undefined_qtable(photo_like(64, 48, seed=9)), np.uint8)
    data = good[:2] + [bad] + good[2:]
    from stream_ssl.data.encoded import draw_views
    from stream_ssl.data.rng import batch_rng

    draws = draw_views([(64, 48)] * 5, VIEWS, batch_rng(0, 0, 0), None)
    enc = EncodedBatch(0, [], torch.arange(5), [f"k{i}" for i in range(5)], 0, data=data, sizes=[(64, 48)] * 5,
                       draws=draws)
    loader = NvjpegLoader.__new__(NvjpegLoader)
    loader.views, loader.rank, loader.device = VIEWS, 0, torch.device("cpu")
    loader.skip_fraction, loader.skip_grace = 0.5, 0
    from stream_ssl.data.nvjpeg import NvjpegStats

    loader.stats = NvjpegStats()
    batch = loader.decode(enc)
    assert batch.skipped == 1 and loader.stats.replaced == 1 and loader.stats.cpu_decoded == 0
    assert batch.keys == ["k0", "k1", "k3", "k4", "k0"] and batch.labels.tolist() == [0, 1, 3, 4, 0]
    assert all(v.shape == (5, 3, 32, 32) for v in batch.views) and torch.equal(batch.views[0][4], batch.views[0][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.py runs it on a GPU)")
def test_cuda_decode_matches_the_cpu_decode(jpeg_set):
    plan = _plan(jpeg_set)
    cpu = list(make_nvjpeg_loader(plan, 0, VIEWS, seed=5, device="cpu"))
    gpu = list(make_nvjpeg_loader(plan, 0, VIEWS, seed=5, device="cuda"))
    for a, b in zip(cpu, gpu):
        assert b.views[0].is_cuda and (a.views[0].float() - b.views[0].cpu().float()).abs().mean() < 2


def test_a_run_trains_through_the_nvjpeg_decoder(jpeg_set, tmp_path):
    from stream_ssl.config import TrainConfig
    from stream_ssl.train import train
    from tests.helpers.trainer import TINY

    options, optimizer, lr = TINY["simclr"]
    cfg = TrainConfig(data=jpeg_set.url, unique_samples="48", budget_samples="48", decoder="nvjpeg",
                      method_options=options, backbone="test_resnet", image_size=32, batch_size=12, num_workers=1,
                      optimizer=optimizer, lr=lr, out=str(tmp_path / "run"), log_with="none", progress=False)
    summary = train(cfg)
    assert summary["decoder"] == "nvjpeg" and summary["nvjpeg"]["images"] == 48
    assert summary["nvjpeg"]["cpu_decoded"] == 1 and np.isfinite(summary["final_loss"])


def test_images_over_the_gpu_pixel_cap_are_scaled_down_in_the_workers(jpeg_set, monkeypatch):
    from stream_ssl.data import nvjpeg
    from stream_ssl.data.encoded import shrink

    data, size = shrink(photo_like(120, 90, seed=1), 3000)
    assert size[0] * size[1] <= 3000 and Image.open(io.BytesIO(data)).size == size and size[0] / size[1] == \
        pytest.approx(120 / 90, rel=0.05)
    monkeypatch.setattr(nvjpeg.NvjpegDataset, "max_pixels", 3000)
    loader = make_nvjpeg_loader(_plan(jpeg_set), 0, VIEWS, seed=5)
    batch = next(iter(loader.loader))
    assert all(w * h <= 3000 for w, h in batch.sizes) and len(batch.data) == 12
    assert all(Image.open(io.BytesIO(d.tobytes())).size == s for d, s in zip(batch.data, batch.sizes))
