"""Assemble the streaming loader: plan -> reader -> decode + geometric views -> uint8 batches.

The dataset yields whole per-rank batches (DataLoader with batch_size=None); worker k of K produces steps
k, k+K, ... which is the order the DataLoader collects them in. Each worker reads ahead (readahead.py: the
reads of its coming steps planned together, many in flight, within its share of `read_ahead_bytes`) and,
with `cache_dir` (one folder per node, on local disk), keeps what later passes will read again there; with
`cache_fill`, worker 0 also runs the rank's node filler (nodecache.py), which fetches what the rank reads
later in the background, so that repeated passes on many nodes read the object store once per node. Keep
this loader out of `accelerator.prepare()`: the plan already splits the data by rank.

Undecodable samples are replaced by another view of a decodable sample of the same batch (every rank's
batch stays full) and counted; a worker fails loudly once it has skipped more than
`skip_grace + skip_fraction x samples read`.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shard_tools.shardset import IMAGE_EXTS
from stream_ssl.data.augment import ViewSpec, decode_views, to_chw
from stream_ssl.data.cache import DiskCache
from stream_ssl.data.nodecache import CacheShare, NodeFiller, ReaderWaits
from stream_ssl.data.plan import Plan
from stream_ssl.data.readahead import DEFAULT_READ_AHEAD, ReadAhead
from stream_ssl.data.reader import ShardReader
from stream_ssl.data.rng import batch_rng


class TooManySkipped(RuntimeError):
    """More undecodable samples than the skip threshold allows."""


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


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member")


def sample_label(sample: dict) -> int:
    raw = sample.get("cls")
    return int(raw) if raw is not None else -1


def default_cache_size(plan: Plan, cache_dir: str | Path) -> int:
    """Enough for the repeated part of the pool (+20%), at most 80% of the free space where the cache lives."""
    need = int(plan.summary()["cache_needed_bytes"] * 1.2) + (64 << 20)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return max(64 << 20, min(need, int(shutil.disk_usage(cache_dir).free * 0.8)))


class PlanDataset(IterableDataset):
    """The batches of one rank, from `start_step` to the end of the plan."""

    def __init__(self, plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0,
                 storage_options: dict | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                 cache_size: int | None = None, read_ahead_bytes: int = DEFAULT_READ_AHEAD,
                 skip_fraction: float = 0.01, skip_grace: int = 32, retries: int = 8, backoff: float = 0.2,
                 micro_batches: int = 1, cache_local: bool = False, cache_fill: bool = True,
                 local_reads: str = "mmap"):
        if not 0 <= start_step <= plan.steps:
            raise ValueError(f"start_step {start_step} outside [0, {plan.steps}]")
        if micro_batches < 1 or plan.batch_size % micro_batches:
            raise ValueError(f"the per-rank batch {plan.batch_size} does not split into {micro_batches} "
                             "micro-batches")
        self.micro_batches, self.cache_local = micro_batches, cache_local
        self.plan, self.rank, self.views, self.start_step = plan, rank, views, start_step
        self.storage_options, self.seed = storage_options, seed
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.cache_size = cache_size
        if self.cache_dir and not self.cache_size:
            self.cache_size = default_cache_size(plan, self.cache_dir)
        self.share = CacheShare.of(plan, self.cache_size) if self.cache_dir else None
        self.cache_fill = bool(cache_fill and self.cache_dir and plan.last_pass > 0)
        self.read_ahead_bytes = read_ahead_bytes
        self.skip_fraction, self.skip_grace = skip_fraction, skip_grace
        self.retries, self.backoff, self.local_reads = retries, backoff, local_reads

    def __len__(self) -> int:
        return max(0, self.plan.steps - self.start_step) * self.micro_batches

    def make_reader(self) -> ShardReader:
        cache = DiskCache(self.cache_dir, self.cache_size) if self.cache_dir else None
        return ShardReader(self.plan.sets, self.storage_options, retries=self.retries, backoff=self.backoff,
                           cache=cache, plan=self.plan, cache_local=self.cache_local, share=self.share,
                           local_reads=self.local_reads)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self.make_reader()
        items = self.plan.worker_items(worker, workers, self.start_step, self.micro_batches)
        budget = self.read_ahead_bytes // max(1, workers)
        stream = ReadAhead(reader, self.plan, self.rank, items, parts=self.micro_batches, read_ahead_bytes=budget)
        filler = None
        if self.cache_fill and worker == 0:
            filler = NodeFiller(self.make_reader(), self.plan, self.rank, self.start_step, self.micro_batches,
                                budget, frontier=lambda: stream.frontier, starving=ReaderWaits(reader.stats)).start()
        readers = [reader] + ([filler.reader] if filler else [])
        try:
            yield from self._batches(stream, readers, worker)
        finally:
            stream.close()
            if filler is not None:
                filler.stop()
            reader.close()

    def _batches(self, stream: ReadAhead, readers: list[ShardReader], worker: int):
        """The batches of `stream`, each with the storage counters of `readers` (the worker's reader and, in
        worker 0, the node filler's) since the previous one."""
        seen = skipped = 0
        before = _counters(readers)
        for (step, micro), samples in stream:
            now = _counters(readers)
            batch = self.make_batch(step, samples, micro)
            batch.io = {k: now[k] - before[k] for k in now}
            batch.worker = worker
            before = now
            seen += len(samples)
            skipped += batch.skipped
            if skipped > self.skip_grace + self.skip_fraction * seen:
                raise TooManySkipped(
                    f"rank {self.rank} worker {worker}: {skipped} of {seen} samples could not be decoded "
                    f"(threshold {self.skip_grace} + {self.skip_fraction:.1%}); last: {self._last_error}. "
                    "Check the shard set (shard_tools verify) or raise the threshold."
                )
            yield batch

    _last_error = ""

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
            except (OSError, ValueError, SyntaxError) as e:
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


def _counters(readers: list[ShardReader]) -> dict:
    snaps = [r.stats.snapshot() for r in readers]
    return {k: sum(s[k] for s in snaps) for k in snaps[0]}


def _identity(batch):
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker leaves stop signals to its training process: SLURM and a terminal's Ctrl-C signal every
    process of the job, and torch's workers die of SIGTERM, which would fail the run that is stopping cleanly
    (stream_ssl/stopping.py). The training process ends its workers when it stops; they also exit when it dies."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def batch_loader(dataset: IterableDataset, num_workers: int, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """The DataLoader over a dataset that yields whole batches (every loader of this package)."""
    kwargs = {"prefetch_factor": prefetch, "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity, pin_memory=pin_memory,
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None, **kwargs)


def make_loader(plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0, num_workers: int = 0,
                storage_options: dict | None = None, seed: int = 0, prefetch: int = 2,
                cache_dir: str | Path | None = None, cache_size: int | None = None,
                read_ahead_bytes: int = DEFAULT_READ_AHEAD, skip_fraction: float = 0.01, skip_grace: int = 32,
                micro_batches: int = 1, cache_local: bool = False, pin_memory: bool = False,
                cache_fill: bool = True, local_reads: str = "mmap") -> DataLoader:
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
    return batch_loader(ds, num_workers, prefetch, pin_memory)
