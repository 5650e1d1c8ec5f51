"""Print the plan of a run: `python -m stream_ssl.plan --data DIR[,DIR...] --unique-samples N --budget-samples C`."""

from __future__ import annotations

import argparse
import json
import sys

from shard_tools.shardset import load_shard_set
from stream_ssl.data.plan import make_plan


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="comma-separated shard-set folders (local, s3://, http(s)://)")
    p.add_argument("--unique-samples", required=True, help="N: count (1M, 500K) or fraction of the pool (0.1)")
    p.add_argument("--budget-samples", required=True, help="C: total samples seen in pretraining")
    p.add_argument("--mix", help="per-source weights of the pool, e.g. real=0.7,generated=0.3")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_ssl.plan", description=__doc__)
    add_plan_arguments(p)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank")
    p.add_argument("--batch-size", type=int, default=256, help="per-rank batch size")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    try:
        sets = [load_shard_set(u) for u in a.data.split(",") if u]
        plan = make_plan(sets, a.unique_samples, a.budget_samples, a.mix, a.world_size, a.num_workers,
                         a.batch_size, a.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.summary(), indent=1) if a.json else plan.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
