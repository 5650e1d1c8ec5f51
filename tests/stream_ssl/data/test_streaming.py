"""The Python API (docs/python-api.md): `stream_ssl.StreamingDataset` and `StreamingDataLoader` deliver the plan's
stream exactly: the repeat counts, equal batches on every rank, resume from a loader state with any number of
workers, the trainer's own stream, every decode mode, and inputs given as plain tars."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import stream_ssl
from stream_ssl import StreamingDataLoader, StreamingDataset
from stream_ssl.train import main as train_main
from tests.helpers.trainer import train_args

N, C, B = 96, 600, 8  # 2 ranks x 8: 37 steps of 16, 592 samples seen (8 dropped)


@pytest.fixture(scope="module")
def data(make_shard_set):
    return make_shard_set(160, shard_size=40)


def keys(loader) -> list[list[str]]:
    return [list(batch["__key__"]) for batch in loader]


def dataset(data, rank=0, world_size=2, **kw) -> StreamingDataset:
    return StreamingDataset(str(data), unique_samples=N, budget_samples=C, batch_size=B, rank=rank,
                            world_size=world_size, decode=kw.pop("decode", None), **kw)


def test_every_key_repeats_as_the_plan_says_and_every_rank_gets_the_same_batches(data):
    ranks = [keys(StreamingDataLoader(dataset(data, rank), num_workers=2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == C // (2 * B) == len(StreamingDataLoader(dataset(data, 1)))
    assert all(len(batch) == B for rank in ranks for batch in rank)
    counts = Counter(k for rank in ranks for batch in rank for k in batch)
    assert len(counts) == N  # the pool, no more
    seen = sum(counts.values())
    assert seen == (C // (2 * B)) * 2 * B
    low, high = math.floor(C / N), math.ceil(C / N)
    assert all(low - 1 <= c <= high for c in counts.values())  # the last pass is partial ...
    assert sum(c < low for c in counts.values()) <= C - seen  # ... and only the dropped rest is missing


def test_the_plan_is_what_stream_ssl_plan_prints(data):
    ds = dataset(data)
    summary = ds.plan.summary()
    assert summary["unique_samples"] == N and summary["budget_samples"] == C and summary["steps"] == C // 16
    assert "passes" in ds.plan.describe() and len(ds) == (C // 16) * B


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_state_continues_the_stream_exactly(data, workers):
    whole = keys(StreamingDataLoader(dataset(data), num_workers=workers))
    loader = StreamingDataLoader(dataset(data), num_workers=workers)
    head = []
    for i, batch in enumerate(loader):
        head.append(list(batch["__key__"]))
        if i == 6:
            state = loader.state_dict()
            break
    again = StreamingDataLoader(dataset(data), num_workers=2 - workers)  # another number of workers
    again.load_state_dict(state)
    assert len(again) == len(whole) - 7
    assert head + keys(again) == whole
    with pytest.raises(ValueError, match="another plan"):
        StreamingDataLoader(dataset(data, seed=1)).load_state_dict(state)


def test_decode_modes_and_labels(data):
    raw, pil, tensor = (next(iter(StreamingDataLoader(dataset(data, decode=d)))) for d in (None, "pil", "tensor"))
    assert isinstance(raw["image"][0], bytes) and raw["image"][0][:2] == b"\xff\xd8"
    assert pil["image"][0].mode == "RGB" and pil["image"][0].size == (32, 32)
    assert tensor["image"].dtype == torch.uint8 and tensor["image"].shape == (B, 3, 32, 32)
    assert torch.equal(tensor["image"][0], torch.from_numpy(np.array(pil["image"][0])).permute(2, 0, 1))
    assert tensor["label"].dtype == torch.int64 and tensor["label"].min() >= 0
    assert raw["__set__"][0] == "set" and raw["__step__"].tolist() == [0] * B


def test_transforms_draw_the_same_augmentations_with_any_number_of_workers(data):
    def jitter(image):  # a random transform on torch's generator
        return image.float() + torch.rand(()) + torch.randint(0, 100, ())

    streams = [[b["image"] for b in StreamingDataLoader(dataset(data, decode="tensor", transform=jitter),
                                                        num_workers=w)] for w in (0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(*streams)) and len(streams[0]) == C // 16
    assert not torch.equal(streams[0][0][0], streams[0][0][1])  # per-sample draws differ


def test_the_trainer_reads_the_same_stream(data, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, unique_samples=str(N), budget_samples=str(C // 2), batch_size=str(B),
                      log_with="none", log_keys="true")
    assert train_main(args) == 0
    logged = (out / "keys" / "rank-0.txt").read_text().split()
    trained = [logged[i + 1] for i in range(0, len(logged), 2)]
    api = StreamingDataset(str(data), unique_samples=N, budget_samples=C // 2, batch_size=B, rank=0, world_size=1,
                           decode=None)
    assert [k for batch in keys(StreamingDataLoader(api)) for k in batch] == trained


def test_plain_tars_and_brace_patterns_give_the_indexed_stream(data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    plain = tmp_path / "plain"
    plain.mkdir()
    for tar in sorted(data.glob("*.tar")):
        shutil.copy(tar, plain / tar.name)
    want = keys(StreamingDataLoader(dataset(data)))
    assert keys(StreamingDataLoader(dataset(plain))) == want
    assert keys(StreamingDataLoader(dataset(f"{plain}/set-{{000000..000003}}.tar"))) == want
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in data.glob("*.tar"))  # nothing added


def test_rank_and_world_size_come_from_the_launcher(data, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = StreamingDataset(str(data), unique_samples=N, budget_samples=C, batch_size=B, decode=None)
    assert (ds.rank, ds.plan.world_size) == (1, 2)
    assert keys(StreamingDataLoader(ds)) == keys(StreamingDataLoader(dataset(data, 1)))
    with pytest.raises(ValueError, match="rank 3 outside"):
        dataset(data, rank=3)


def test_importing_the_package_is_cheap():
    code = ("import sys, stream_ssl; print(sorted(m for m in ('torch', 'timm', 'accelerate', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert stream_ssl.__all__ == sorted(stream_ssl.__all__) and "StreamingDataset" in dir(stream_ssl)


def test_batches_from_workers_are_those_of_one_process(data):
    """With workers, plain numbers cross as numpy arrays and become tensors in this process: every batch equals
    the one-process batch, value, type and dtype."""
    def typed(batch):
        return {k: (v.dtype, v.tolist()) if isinstance(v, torch.Tensor) else (type(v[0]), v) for k, v in batch.items()}

    streams = [[typed(b) for b in StreamingDataLoader(dataset(data, decode="tensor"), num_workers=w)] for w in (0, 2)]
    assert streams[0] == streams[1] and streams[0][0]["__step__"][0] == torch.int64


@pytest.mark.parametrize("column", [[1, 2, 3], [0.5, 1.0, 2.0], [1, 2.5, 3], [True, False, True], [2**70, 1, 2],
                                    [np.int32(1), np.int32(2), np.int32(3)], ["a", "b", "c"], [b"x", b"y", b"z"]])
def test_collate_in_worker_lands_as_collate_samples(column):
    from stream_ssl.data.streaming import collate_in_worker, collate_samples

    samples = [{"x": v, "t": torch.tensor([i])} for i, v in enumerate(column)]
    try:
        want = collate_samples(samples)
    except (RuntimeError, OverflowError, ValueError) as e:  # (torch refuses an int beyond int64; so does the worker)
        with pytest.raises(type(e)):
            collate_in_worker(samples).landed()
        return
    got = collate_in_worker(samples).landed()
    assert list(got) == list(want) and torch.equal(got["t"], want["t"])
    if isinstance(want["x"], torch.Tensor):
        assert got["x"].dtype == want["x"].dtype and torch.equal(got["x"], want["x"])
    else:
        assert got["x"] == want["x"]
