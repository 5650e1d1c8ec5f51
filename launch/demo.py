"""The study in miniature, on generated data, small enough for a laptop: `make demo`.

Renders a labeled procedural image pool (domain a) and two downstream sets (domain a, and a shifted domain b),
packs them into shard sets, then runs a diversity sweep (launch/sweep.py): SimCLR pretrained at one fixed budget
C for three numbers of unique samples N (1%, 10%, 100% of the pool), each run evaluated on both downstream sets
with kNN, a linear probe and the Frechet distance between pool and downstream features, next to the untrained
backbone as a baseline. Prints the table and writes the plot (accuracy vs diversity D = N/C).

Settings: a narrow ResNet-10 (timm `resnet10t` with channels 16-32-64-128) at 24 px (images rendered at 64 px),
batch 128, SGD lr 1.0 x 128/256 with warm-up and cosine decay, weight decay 5e-4, temperature 0.2,
full-strength color jitter, 128K samples seen (1000 steps). Torch uses one thread per process by default
(`--threads`): with one loader worker that fills two cores without oversubscription (on a 2-core machine two
torch threads were over 10x slower than one). At 64K samples or 32 px the runs are undertrained and the trend
across N is not reliable at this size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from shard_tools.pack import pack
from shard_tools.synth import synthesize

REPO = Path(__file__).resolve().parent.parent


def make_set(root: Path, name: str, samples: int, domain: str, seed: int, source: str) -> Path:
    out = root / "shards" / name
    if (out / "index.json").exists():
        return out
    manifest = synthesize(root / "images" / name, samples, classes=10, size=64, domain=domain, seed=seed)
    pack(manifest, out, name=name, shard_size=250, seed=seed, source=source)
    return out


def demo_sweep(a: argparse.Namespace, pool: Path, down: dict[str, tuple[Path, Path]]) -> dict:
    train = {
        "backbone": a.backbone,
        "backbone_options": json.loads(a.backbone_options),
        "image_size": a.image_size,
        "batch_size": a.batch_size,
        "num_workers": a.workers,
        "optimizer": "sgd",
        "lr": a.lr,
        "weight_decay": 5e-4,
        "warmup_fraction": 0.1,  # the demo's runs predate the method recipes (whose SimCLR warm-up is 0.05)
        "method_options": {"proj_hidden": 256, "proj_dim": 128, "temperature": a.temperature, "color_strength": 1.0},
        "log_every": 25,
        "log_with": "none",
    }
    return {
        "name": "demo",
        "out": str(a.out / "sweep"),
        "budget": a.budget,
        "unique": [u.strip() for u in a.unique.split(",") if u.strip()],
        "methods": [a.method],
        "sources": {"procedural (a)": str(pool)},
        "downstream": {name: {"train": str(tr), "test": str(te)} for name, (tr, te) in down.items()},
        "seeds": [int(s) for s in a.seeds.split(",")],
        "train": train,
        "evaluate": {"knn": True, "linear": True, "distance": "source", "distance_samples": 1000},
        "random_init": True,
        "metric": "knn",
        "launch": {"env": {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--pool", type=int, default=4000, help="samples in the pretraining pool")
    p.add_argument("--down-train", type=int, default=1000, help="samples in each downstream training set")
    p.add_argument("--down-test", type=int, default=2000, help="samples in each downstream test set")
    p.add_argument("--budget", default="128K", help="budget C: samples seen by every run")
    p.add_argument("--unique", default="1%,10%,100%", help="comma-separated N values (counts or fractions)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--backbone-options", default='{"channels": [16, 32, 64, 128]}', help="JSON, to timm")
    p.add_argument("--image-size", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate for a batch of 256 (scaled)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--workers", type=int, default=1, help="data-loader workers of each run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return p


def prepare_data(a: argparse.Namespace) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    root = a.out
    pool = make_set(root, "pool", a.pool, "a", 0, "generated")
    down = {
        "a": (make_set(root, "down_a_train", a.down_train, "a", 101, "downstream"),
              make_set(root, "down_a_test", a.down_test, "a", 102, "downstream")),
        "b (shifted)": (make_set(root, "down_b_train", a.down_train, "b", 201, "downstream"),
                        make_set(root, "down_b_test", a.down_test, "b", 202, "downstream")),
    }
    return pool, down


def run_study(a: argparse.Namespace) -> tuple[dict, int]:
    """Data, then the sweep; returns the collected results and the number of failed cells."""
    from launch.sweep import collect, load_sweep, run_local

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    print(f"[demo] generating and packing data under {a.out} ...", flush=True)
    pool, down = prepare_data(a)
    print(f"[demo] data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    sweep = load_sweep(demo_sweep(a, pool, down))
    failed = run_local(sweep, None)
    return collect(sweep), failed


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from launch.sweep import SweepError

    t0 = time.perf_counter()
    try:
        result, failed = run_study(a)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"{a.method} on {a.backbone} at {a.image_size} px; budget C = {a.budget} samples seen; pool of {a.pool} "
          f"generated images (domain a); downstream sets: a (same domain) and b (shifted), {a.down_train} train / "
          f"{a.down_test} test each. kNN: cosine, weighted votes; linear: logistic regression; Frechet: pool vs "
          f"downstream features ({min(1000, a.pool, a.down_train)} samples each, fewer when N is smaller).")
    print(result["table"])
    (a.out / "results.md").write_text(result["table"] + "\n")
    print(f"\n[demo] done in {(time.perf_counter() - t0) / 60:.1f} min; table in {a.out / 'results.md'} and "
          f"{result['markdown']}, rows in {result['csv']}, plot in {result['plot']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
