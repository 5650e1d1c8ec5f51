"""Run by tests/stream_ssl/test_train.py under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes
over gloo): trains every method for a few steps in one launch and writes OUT/results.json (main process).

    accelerate launch --multi_gpu --num_processes 2 -m tests.helpers.trainer_driver DATA OUT [METHODS] [STEPS]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stream_ssl.config import TrainConfig
from stream_ssl.train import train
from tests.helpers.trainer import TINY


def main() -> int:
    data, out = sys.argv[1], Path(sys.argv[2])
    methods = sys.argv[3].split(",") if len(sys.argv) > 3 else list(TINY)
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    results = {}
    for method in methods:
        options, optimizer, lr = TINY[method]
        cfg = TrainConfig(data=data, unique_samples="32", budget_samples=str(32 * steps), method=method,
                          method_options=options, backbone="test_resnet", image_size=32, batch_size=16,
                          optimizer=optimizer, lr=lr, warmup_fraction=0.0, num_workers=0, log_every=1,
                          progress=False, log_with="none", out=str(out / method))
        summary = train(cfg)
        rank, world = dist.get_rank(), dist.get_world_size()
        # DDP keeps the replicas equal: compare a checksum of the final backbone across ranks.
        model = torch.load(out / method / "checkpoints" / f"step-{steps:08d}.pt", weights_only=True)["model"]
        total = torch.tensor([sum(float(v.double().sum()) for v in model.values() if v.is_floating_point())])
        sums = [torch.zeros(1, dtype=total.dtype) for _ in range(world)]
        dist.all_gather(sums, total)
        results[method] = {"losses": [loss for _, loss in summary["losses"]], "world_size": summary["world_size"],
                           "global_batch": summary["global_batch"], "steps": summary["steps"],
                           "checksums": [float(s) for s in sums], "rank": rank}
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
