"""Features of shard sets, as evaluation and the distances between sets take them (one module that both import).

The evaluation view (EVAL_VIEW): each image fully decoded, its shorter side resized to floor(S / 0.875) and
center-cropped to S x S, normalized with the ImageNet statistics, fed to the backbone in float32. Samples of
a set for distances are drawn by `sample_set` (few, long reads); `load_backbone` opens a run folder's export.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from shard_tools.shardset import ShardSet, load_shard_set
from stream_ssl.data.augment import center_view, decode_rgb, normalize, to_chw
from stream_ssl.data.plan import Slice
from stream_ssl.data.reader import ShardReader
from stream_ssl.data.streaming import image_bytes, sample_label
from stream_ssl.models.backbone import create_backbone

CROP_FRACTION = 0.875
# The evaluation view (see the module docstring).
# The evaluation view (see the module docstring).
EVAL_VIEW = {"decode": "full", "resize": f"shorter side to floor(S / {CROP_FRACTION}), bilinear, antialiased",
             "crop": "center, S x S", "normalize": "ImageNet mean/std", "features": "float32"}
# What evaluation results depend on besides the sweep's settings (a sweep re-evaluates its cells when it changes).
SAMPLE_RUN = 64  # the distance sample of a shard set: runs of about this many consecutive samples


def load_backbone(run: Path) -> tuple[torch.nn.Module, dict]:
    """The exported backbone of a run folder (config.json + backbone.safetensors, as train.py writes them)."""
    run = Path(run)
    cfg_path, weights = run / "config.json", run / "backbone.safetensors"
    for p in (cfg_path, weights):
        if not p.exists():
            raise FileNotFoundError(f"{run}: not a finished run ({p.name} is missing)")
    cfg = json.loads(cfg_path.read_text())
    model, _ = create_backbone(cfg["backbone"], cfg["image_size"], **(cfg.get("backbone_options") or {}))
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), cfg


def resolve_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def progress_bar(total: int, progress: bool | str, label: str, unit: str = "img"):
    """A tqdm bar on stderr for one phase of an evaluation, labeled `progress` when it is text, else `label`;
    a disabled bar (its methods do nothing) when `progress` is false."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=progress if isinstance(progress, str) else label, unit=unit, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr, disable=not progress)


def _decode_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1) - 1))


@torch.no_grad()
def features_of_slices(model: torch.nn.Module, sets: Sequence[ShardSet], pieces: Sequence[Slice], image_size: int,
                       batch_size: int = 256, device: str = "cpu", progress: bool | str = False,
                       require_labels: bool = True, workers: int | None = None,
                       storage_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32, CPU) and labels (-1 where a sample has none) of the samples in `pieces`, in order.

    Each image is fully decoded and cut to the evaluation view (`EVAL_VIEW`); the model runs in float32 even
    when called under autocast. Images are decoded by `workers` threads (default: the CPU count - 1, at most 8;
    PIL releases the GIL)."""
    reader = ShardReader(tuple(sets), storage_options)
    total = sum(len(p) for p in pieces)
    bar = progress_bar(total, progress, "features")
    workers = _decode_workers() if workers is None else max(1, workers)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    feats, labels, pending = [], [], []

    def view(data: bytes) -> np.ndarray:
        return center_view(decode_rgb(data), image_size, CROP_FRACTION)

    def flush():
        images = list(pool.map(view, [d for d, _ in pending]) if pool else map(view, [d for d, _ in pending]))
        x = normalize(to_chw(images).to(device).float() / 255.0)
        with torch.autocast(torch.device(device).type, enabled=False):
            feats.append(model(x).float().cpu())
        labels.extend(y for _, y in pending)
        bar.update(len(pending))
        pending.clear()

    try:
        for piece in pieces:
            if len(piece) == 0:
                continue
            for s in reader.read(piece):
                pending.append((image_bytes(s), sample_label(s)))
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    y = torch.tensor(labels, dtype=torch.int64)
    if require_labels and (y < 0).any():
        names = ", ".join(sorted({sets[p.source].url for p in pieces}))
        raise ValueError(f"{names}: {(y < 0).sum().item()} samples have no label (.cls)")
    if not feats:
        return torch.zeros(0, 0), y
    return torch.cat(feats), y


def extract_features(model: torch.nn.Module, shard_set: ShardSet, image_size: int, batch_size: int = 256,
                     device: str = "cpu", progress: bool | str = False, limit: int | None = None,
                     require_labels: bool = True, workers: int | None = None,
                     storage_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of a shard set (or its first `limit` samples), center view."""
    pieces, left = [], shard_set.num_samples if limit is None else min(limit, shard_set.num_samples)
    for i, info in enumerate(shard_set.shards):
        if left <= 0:
            break
        take = min(info.samples, left)
        pieces.append(Slice(0, i, 0, take))
        left -= take
    return features_of_slices(model, (shard_set,), pieces, image_size, batch_size, device, progress, require_labels,
                              workers, storage_options)


def spread(total: int, sizes: Sequence[int]) -> list[int]:
    """Split `total` over parts of the given sizes in proportion to them (largest remainder), capped at sizes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(total, sizes.sum()))
    if total <= 0 or len(sizes) == 0:
        return [0] * len(sizes)
    exact = sizes * (total / sizes.sum())
    take = np.minimum(np.floor(exact).astype(np.int64), sizes)
    order = np.argsort(-(exact - take), kind="stable")
    for i in order:
        if take.sum() >= total:
            break
        if take[i] < sizes[i]:
            take[i] += 1
    return [int(t) for t in take]


def open_set(url: str, storage_options: dict | None = None) -> ShardSet:
    return load_shard_set(url, storage_options)


def sample_pieces(pieces: Sequence[Slice], m: int) -> list[Slice]:
    """m samples of a pool, spread over its slices in proportion to their sizes (a prefix of each slice)."""
    take = spread(m, [len(p) for p in pieces])
    return [Slice(p.source, p.shard, p.start, p.start + t) for p, t in zip(pieces, take) if t > 0]


def sample_set(shard_set: ShardSet, m: int, seed: int = 0, run: int = SAMPLE_RUN) -> list[Slice]:
    """A seeded sample of min(m, size) samples of a shard set, as slices (source 0) in shard order.

    Shards are taken in a seeded random order until they hold m samples and number at least m / `run`; m is
    spread over them in proportion to their sizes, and each takes a window at a seeded random position. Few,
    long reads (good for object stores); a uniform random subset when the set was packed (packing shuffles
    globally), else runs of about `run` consecutive samples from random shards."""
    sizes = np.array([s.samples for s in shard_set.shards], dtype=np.int64)
    m = int(min(m, sizes.sum()))
    if m <= 0:
        return []
    rng = np.random.default_rng([seed, 0x5E7])
    order = rng.permutation(len(sizes))
    enough = int(np.searchsorted(np.cumsum(sizes[order]), m)) + 1
    chosen = np.sort(order[:max(enough, min(len(sizes), -(-m // run)))])
    take = spread(m, sizes[chosen].tolist())
    pieces = []
    for shard, t in zip(chosen.tolist(), take):
        if t > 0:
            start = int(rng.integers(0, int(sizes[shard]) - t + 1))
            pieces.append(Slice(0, shard, start, start + t))
    return pieces


def write_result(result: dict, table: str, markdown: bool, out: Path | None) -> None:
    """A command's result: JSON (or with `markdown` the table) on stdout; with `out`, the JSON there and the
    table next to it (.md)."""
    text = json.dumps(result, indent=1)
    print(table if markdown else text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".md").write_text(table + "\n")
