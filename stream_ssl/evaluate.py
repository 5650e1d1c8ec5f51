"""Evaluate a pretrained backbone on labeled shard sets.

    python -m stream_ssl.evaluate --checkpoint runs/simclr --train shards/down_train --test shards/down_test --knn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from shard_tools.shardset import ShardSet, load_shard_set
from stream_ssl.data.augment import center_view, decode_rgb, normalize, to_chw
from stream_ssl.data.loader import image_bytes, sample_label
from stream_ssl.data.plan import Slice
from stream_ssl.data.reader import ShardReader
from stream_ssl.models.backbone import create_backbone


def load_backbone(run: Path) -> tuple[torch.nn.Module, dict]:
    cfg = json.loads((Path(run) / "config.json").read_text())
    model, _ = create_backbone(cfg["backbone"], cfg["image_size"])
    model.load_state_dict(load_file(str(Path(run) / "backbone.safetensors")))
    return model.eval(), cfg


@torch.no_grad()
def extract_features(model: torch.nn.Module, shard_set: ShardSet, image_size: int, batch_size: int = 256,
                     device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of a shard set (center view, no augmentation)."""
    reader = ShardReader((shard_set,))
    feats, labels = [], []
    pending_x, pending_y = [], []

    def flush():
        x = normalize(to_chw(pending_x).to(device).float() / 255.0)
        feats.append(model(x).float().cpu())
        labels.extend(pending_y)
        pending_x.clear()
        pending_y.clear()

    for shard, info in enumerate(shard_set.shards):
        for s in reader.read(Slice(0, shard, 0, info.samples)):
            pending_x.append(center_view(decode_rgb(image_bytes(s), image_size), image_size))
            pending_y.append(sample_label(s))
            if len(pending_x) == batch_size:
                flush()
    if pending_x:
        flush()
    y = torch.tensor(labels, dtype=torch.int64)
    if (y < 0).any():
        raise ValueError(f"{shard_set.url}: {(y < 0).sum().item()} samples have no label (.cls)")
    return torch.cat(feats), y


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity: each of the k nearest votes exp(sim / T) for its class."""
    train_x = F.normalize(train_x, dim=1)
    test_x = F.normalize(test_x, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), classes)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_x)


def evaluate(run: Path, train: str, test: str, knn: bool = True) -> dict:
    model, cfg = load_backbone(run)
    size = cfg["image_size"]
    train_x, train_y = extract_features(model, load_shard_set(train), size)
    test_x, test_y = extract_features(model, load_shard_set(test), size)
    result = {"checkpoint": str(run), "train": train, "test": test, "train_samples": len(train_y),
              "test_samples": len(test_y), "classes": int(np.unique(train_y.numpy()).size)}
    if knn:
        result["knn_top1"] = knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_ssl.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder written by train.py")
    p.add_argument("--train", required=True, help="labeled shard set to fit the probe on")
    p.add_argument("--test", required=True, help="labeled shard set to score")
    p.add_argument("--knn", action="store_true", help="kNN accuracy (k=20, T=0.07, cosine)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    try:
        result = evaluate(a.checkpoint, a.train, a.test, knn=a.knn or True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
