"""The trainer's loader: plan -> reader -> decode + geometric views -> uint8 batches.

`PlanDataset` is a `StreamingDataset` (streaming.py: the planned stream of one rank, read ahead, with the node
cache and its filler) whose items are whole batches of augmented views instead of samples: each step's samples
are decoded and cropped in the loader worker with the step's own random draws (rng.py), so the batches do not
depend on the number of workers. `make_loader` wraps it in a `StreamingDataLoader` (kept out of
`accelerator.prepare()`: the plan already splits the data by rank).

Undecodable samples are replaced by another view of a decodable sample of the same batch (every rank's
batch stays full) and counted; a worker fails loudly once it has skipped more than
`skip_grace + skip_fraction x samples read`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from stream_ssl.data.augment import ViewSpec, decode_views, to_chw
from stream_ssl.data.plan import Plan
from stream_ssl.data.readahead import DEFAULT_READ_AHEAD
from stream_ssl.data.rng import batch_rng
from stream_ssl.data.streaming import UNDECODABLE, StreamingDataLoader, StreamingDataset, image_bytes, sample_label


@dataclass
class Batch:
    step: int
    views: list[torch.Tensor]  # uint8 (B, 3, H, W), one tensor per view
    labels: torch.Tensor  # int64 (B,), -1 where the sample has no label
    keys: list[str]
    skipped: int  # undecodable samples in this batch (replaced by repeats of decodable ones)
    io: dict = field(default_factory=dict)  # the reader's counters since the previous batch (fetch.ReadStats)
    worker: int = 0
    micro: int = 0  # micro-batch index within the step (gradient accumulation), 0 without

    def pin_memory(self) -> Batch:
        """Page-locked views (the DataLoader's pin-memory thread calls this), so copies to the GPU overlap."""
        self.views = [v.pin_memory() for v in self.views]
        return self

    @property
    def bytes_read(self) -> int:  # from storage; cache hits not counted
        return self.io.get("bytes_read", 0)

    @property
    def cache_hits(self) -> int:
        return self.io.get("cache_hits", 0)

    @property
    def retries(self) -> int:
        return self.io.get("retries", 0)


class PlanDataset(StreamingDataset):
    """The batches of one rank, from `start_step` to the end of the plan: each step's samples decoded and cut
    into `views` (see StreamingDataset.setup for the reading settings)."""

    yields_batches = True

    def __init__(self, plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0,
                 storage_options: dict | None = None, seed: int = 0, **reading):
        self.setup(plan, rank, start_step, storage_options, seed, **reading)
        self.views = views

    def emit(self, step: int, micro: int, samples: list[dict], io_counts: dict, worker: int) -> tuple[list, int]:
        batch = self.make_batch(step, samples, micro)
        batch.io, batch.worker = io_counts, worker
        return [batch], batch.skipped

    def make_batch(self, step: int, samples: list[dict], micro: int = 0) -> Batch:
        rng = batch_rng(self.seed, step, self.rank, micro)
        crops, datas, labels, keys, bad = [], [], [], [], []
        for i, s in enumerate(samples):
            try:
                if "__error__" in s:
                    raise ValueError(s["__error__"])
                data = image_bytes(s)
                crops.append(decode_views(data, self.views, rng))
                datas.append(data)
                labels.append(sample_label(s))
                keys.append(s["__key__"])
            except UNDECODABLE as e:
                self._last_error = f"{s.get('__url__', '?')} {s.get('__key__', '?')}: {e}"
                bad.append(i)
        if not crops:
            raise RuntimeError(f"step {step}: no decodable image among {len(samples)} samples")
        # Keep every rank's batch full (cross-rank gathers need equal sizes): an undecodable sample is
        # replaced by other views of a decodable one from the same batch, and counted.
        for j in range(len(bad)):
            k = j % len(keys)
            crops.append(decode_views(datas[k], self.views, rng))
            labels.append(labels[k])
            keys.append(keys[k])
        views = [to_chw([c[v] for c in crops]) for v in range(len(self.views))]
        return Batch(step, views, torch.tensor(labels, dtype=torch.int64), keys, len(bad), micro=micro)


def make_loader(plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0, num_workers: int = 0,
                storage_options: dict | None = None, seed: int = 0, prefetch: int = 2,
                cache_dir: str | Path | None = None, cache_size: int | None = None,
                read_ahead_bytes: int = DEFAULT_READ_AHEAD, skip_fraction: float = 0.01, skip_grace: int = 32,
                micro_batches: int = 1, cache_local: bool = False, pin_memory: bool = False,
                cache_fill: bool = True, local_reads: str = "mmap") -> StreamingDataLoader:
    """The loader of one rank, from plan step `start_step` on.

    `cache_dir`/`cache_size`: the repeat-aware cache of this node (a folder on local disk that the node's
    processes share; default size: what the plan's repeats need); `cache_fill`: fill it in the background with
    what this rank reads later (nodecache.py);
    `read_ahead_bytes`: memory for reads ahead of the consumer, per process (split between workers);
    `micro_batches`: split every step's batch into that many micro-batches (gradient accumulation with a plan
    whose batch_size is the per-rank batch of one optimizer step), yielded in order with `Batch.micro` = 0, 1,
    ...; `cache_local`: use the cache for local paths too (shard sets on a network file system); `pin_memory`:
    batches in page-locked memory (training on a GPU); `local_reads`: "mmap" (views of the mapped local shards)
    or "pread" (a copy; for shard files that may change in place while the run reads them)."""
    ds = PlanDataset(plan, rank, views, start_step, storage_options, seed, cache_dir=cache_dir,
                     cache_size=cache_size, read_ahead_bytes=read_ahead_bytes,
                     skip_fraction=skip_fraction, skip_grace=skip_grace, micro_batches=micro_batches,
                     cache_local=cache_local, cache_fill=cache_fill, local_reads=local_reads)
    return StreamingDataLoader(ds, num_workers=num_workers, prefetch_factor=prefetch, pin_memory=pin_memory)
