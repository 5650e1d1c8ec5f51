"""Training throughput with the streaming loader vs an in-memory source of identical batches.

    python -m benchmarks.train_step                                  # CPU: generated data, test_resnet, 32 px
    python -m benchmarks.train_step --data shards/pool --device cuda --backbone resnet50 --image-size 224 \
        --batch-size 128 --num-workers 8 --precision bf16 --method simclr --steps 60
    python -m benchmarks.train_step --quick       # a few steps of each source at toy sizes: does it still run?

Both runs do the same training step (photometric augmentation on the device, forward, backward, optimizer
step, momentum updates) from the same initial weights; the in-memory run takes its uint8 batches from a list
filled beforehand by the same loader, so it measures the step alone. The ratio streaming / in-memory is the
share of the step's throughput the data path keeps: 1.0 means loading costs nothing (fully hidden behind
compute), 0.5 means training waits for data half the time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.quick import parse_quick
from shard_tools.shardset import load_shard_set
from stream_ssl.data.augment import photometric
from stream_ssl.data.loader import make_loader
from stream_ssl.data.plan import make_plan
from stream_ssl.data.rng import batch_generator
from stream_ssl.methods import build_method
from stream_ssl.models.backbone import create_backbone
from stream_ssl.optim import build_optimizer


def generated_shard_set(root: Path, samples: int, size: int) -> str:
    from shard_tools.pack import pack
    from shard_tools.synth import synthesize

    manifest = synthesize(root / "images", samples, classes=10, size=size, domain="a", seed=0)
    pack(manifest, root / "shards", name="bench", shard_size=max(16, samples // 16), seed=0)
    return str(root / "shards")


def build(args, device: torch.device):
    torch.manual_seed(0)
    backbone, dim = create_backbone(args.backbone, args.image_size)
    method = build_method(args.method, backbone, dim, **json.loads(args.method_options)).to(device)
    optimizer = build_optimizer(args.optimizer, method.param_groups(), args.lr * args.batch_size / 256, 1e-6, 0.9)
    return method, optimizer


def measure(args, device: torch.device, batches, total_steps: int) -> tuple[float, float]:
    """(samples/s, share of time waiting for the next batch) over the steps after the warm-up."""
    method, optimizer = build(args, device)
    views = method.views(args.image_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else \
        contextlib.nullcontext()
    method.train()
    wait = 0.0
    samples = 0
    t0 = None
    it = iter(batches)
    for i in range(total_steps):
        if i == args.warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, wait, samples = time.perf_counter(), 0.0, 0
        tw = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - tw
        gen = batch_generator(0, batch.step, 0, device=device)
        x = [photometric(v.to(device, non_blocking=True), spec, gen) for v, spec in zip(batch.views, views)]
        method.set_step(i, total_steps)
        with autocast:
            loss = method(x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(i, total_steps)
        optimizer.step()
        method.on_optimizer_step(i + 1, total_steps)
        samples += batch.views[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return samples / elapsed, wait / elapsed


# --quick: a few seconds on the CPU
QUICK = {"samples": 64, "method_options": '{"proj_hidden": 64}', "batch_size": 8, "steps": 1, "warmup_steps": 1,
         "num_workers": 1, "device": "cpu", "memory_batches": 2, "repeats": 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="shard set (default: generate one in a temporary folder)")
    p.add_argument("--samples", type=int, default=2048, help="size of the generated set (default: 2048)")
    p.add_argument("--method", default="simclr", help="SSL method (default: simclr)")
    p.add_argument("--method-options", default='{"proj_hidden": 512}',
                   help='the method\'s options, JSON (default: {"proj_hidden": 512})')
    p.add_argument("--backbone", default="test_resnet", help="timm backbone (default: test_resnet)")
    p.add_argument("--image-size", type=int, default=32, help="view side in px (default: 32)")
    p.add_argument("--batch-size", type=int, default=64, help="batch (default: 64)")
    p.add_argument("--optimizer", default="lars", help="optimizer (default: lars)")
    p.add_argument("--lr", type=float, default=0.3, help="learning rate for a batch of 256 (default: 0.3)")
    p.add_argument("--steps", type=int, default=30, help="measured steps (after the warm-up) (default: 30)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps before the measured ones (default: 5)")
    p.add_argument("--num-workers", type=int, default=2, help="data-loader workers (default: 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="training device (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--precision", choices=("no", "bf16"), default="no", help="autocast precision (default: no)")
    p.add_argument("--memory-batches", type=int, default=16,
                   help="distinct batches the in-memory source cycles (default: 16)")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating measurements of each source, the median kept (default: 3)")
    p.add_argument("--json", type=Path, help="also write the numbers here (default: no file)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes on the CPU, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    args = parse_quick(p, argv, QUICK)
    device = torch.device(args.device)
    total = args.warmup_steps + args.steps

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or generated_shard_set(Path(tmp), args.samples, max(args.image_size, 32))
        sets = [load_shard_set(data)]
        plan = make_plan(sets, "1.0", total * args.batch_size, None, 1, args.num_workers, args.batch_size, 0)
        method, _ = build(args, torch.device("cpu"))
        views = method.views(args.image_size)
        del method

        # In-memory source: the first batches of the same stream, decoded and cropped beforehand, cycled.
        first = list(itertools.islice(make_loader(plan, 0, views, 0, args.num_workers, seed=0),
                                      min(total, args.memory_batches)))
        # Alternate the two sources and keep the medians: on a shared machine the load drifts between runs.
        memory, stream = [], []
        for _ in range(args.repeats):
            memory.append(measure(args, device, itertools.cycle(first), total))
            stream.append(measure(args, device, make_loader(plan, 0, views, 0, args.num_workers, seed=0), total))
    memory_rate = statistics.median(r for r, _ in memory)
    stream_rate = statistics.median(r for r, _ in stream)
    stream_wait = statistics.median(w for _, w in stream)
    ratio = stream_rate / memory_rate
    result = {"method": args.method, "backbone": args.backbone, "image_size": args.image_size,
              "batch_size": args.batch_size, "views": len(views), "num_workers": args.num_workers,
              "device": str(device), "precision": args.precision, "steps": args.steps, "repeats": args.repeats,
              "in_memory_runs": [round(r, 1) for r, _ in memory], "streaming_runs": [round(r, 1) for r, _ in stream],
              "in_memory_samples_per_s": round(memory_rate, 1), "streaming_samples_per_s": round(stream_rate, 1),
              "streaming_data_wait": round(stream_wait, 3), "ratio": round(ratio, 3)}
    print(f"{args.method} {args.backbone} {args.image_size}px batch {args.batch_size} x {len(views)} views on "
          f"{device} ({args.num_workers} workers, {args.steps} steps, median of {args.repeats})")
    print(f"  in-memory batches: {memory_rate:8.1f} samples/s")
    print(f"  streaming loader:  {stream_rate:8.1f} samples/s  (waiting for data {stream_wait:.0%} of the time)")
    print(f"ratio streaming / in-memory: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
