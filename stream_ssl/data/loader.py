"""Assemble the streaming loader: plan -> reader -> decode + geometric views -> uint8 batches.

The dataset yields whole per-rank batches (DataLoader with batch_size=None); worker k of K produces steps
k, k+K, ... which is the order the DataLoader collects them in. Keep this loader out of
`accelerator.prepare()`: the plan already splits the data by rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shard_tools.shardset import IMAGE_EXTS
from stream_ssl.data.augment import ViewSpec, crop_view, decode_rgb, to_chw
from stream_ssl.data.plan import Plan
from stream_ssl.data.reader import ShardReader


@dataclass
class Batch:
    step: int
    views: list[torch.Tensor]  # uint8 (B, 3, H, W), one tensor per view
    labels: torch.Tensor  # int64 (B,), -1 where the sample has no label
    keys: list[str]
    skipped: int  # undecodable samples in this batch (replaced by repeats of decodable ones)
    bytes_read: int


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member")


def sample_label(sample: dict) -> int:
    raw = sample.get("cls")
    return int(raw) if raw is not None else -1


def augment_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, rank, 0xA06])


class PlanDataset(IterableDataset):
    """The batches of one rank, from `start_step` to the end of the plan."""

    def __init__(self, plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0,
                 storage_options: dict | None = None, seed: int = 0):
        self.plan, self.rank, self.views, self.start_step = plan, rank, views, start_step
        self.storage_options, self.seed = storage_options, seed
        self.min_side = max(v.size for v in views)

    def __len__(self) -> int:
        return max(0, self.plan.steps - self.start_step)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.plan.sets, self.storage_options)
        for step in self.plan.worker_steps(worker, workers, self.start_step):
            before = reader.stats.bytes_read
            samples = reader.read_all(self.plan.rank_slices(step, self.rank))
            yield self.make_batch(step, samples, reader.stats.bytes_read - before)

    def make_batch(self, step: int, samples: list[dict], bytes_read: int) -> Batch:
        rng = augment_rng(self.seed, step, self.rank)
        images, labels, keys, bad = [], [], [], []
        for i, s in enumerate(samples):
            try:
                images.append(decode_rgb(image_bytes(s), self.min_side))
                labels.append(sample_label(s))
                keys.append(s["__key__"])
            except (OSError, ValueError, SyntaxError):
                bad.append(i)
        if not images:
            raise RuntimeError(f"step {step}: no decodable image among {len(samples)} samples")
        # Keep every rank's batch full (cross-rank gathers need equal sizes): an undecodable sample is
        # replaced by another view of a decodable one from the same batch, and counted.
        for j in range(len(bad)):
            k = j % len(keys)
            images.append(images[k])
            labels.append(labels[k])
            keys.append(keys[k])
        views = [to_chw([crop_view(im, spec, rng) for im in images]) for spec in self.views]
        return Batch(step, views, torch.tensor(labels, dtype=torch.int64), keys, len(bad), bytes_read)


def _identity(batch):
    return batch


def make_loader(plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0, num_workers: int = 0,
                storage_options: dict | None = None, seed: int = 0, prefetch: int = 2) -> DataLoader:
    ds = PlanDataset(plan, rank, views, start_step, storage_options, seed)
    kwargs = {"prefetch_factor": prefetch, "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=_identity, **kwargs)
