"""Print the plan of a run, or the samples one rank will read.

    stream-ssl plan --data DIR[,DIR...] --unique-samples N --budget-samples C [--json]
    stream-ssl plan ... --world-size W --nodes K --cache-size SIZE --json   # + object_store_bytes
    stream-ssl plan ... --world-size W --batch-size B --keys --rank R [--start-step S] [--end-step E]

`--keys` prints, one per line, the sample keys rank R reads from step S on, in the order the loader yields
them. They come from the shards' `.idx` files (the member names wds2idx took from the tar headers); with
`--check-headers` every member's tar header is also fetched with a ranged read and compared. Nothing is
decoded. Shard sets can be local folders, `s3://` (AWS environment variables or `--storage-options`) or
`http(s)://` URLs. `--check` lists each shard-set folder once and stops with one line when a shard the plan
reads, or its `.idx`, is missing or has another size than index.json records.

The summary ends with what the run is expected to read from storage on `--nodes` K nodes (W/K processes each)
with a node cache of `--cache-size` (JSON: `object_store_bytes`, and the policy it assumes; see
stream_ssl/data/nodecache.py): about K (1 - (1 - 1/K)^E) pool bytes for E passes when the pool fits the cache.
"""

from __future__ import annotations

import argparse
import json
import sys

from shard_tools.cli import run_main, tool_prog
from shard_tools.inputs import open_shard_sets
from shard_tools.listing import require_shards
from shard_tools.quantities import COUNT_HELP, SIZE_HELP, parse_bytes
from shard_tools.storage import STORAGE_OPTIONS_HELP, redact, storage_options_arg
from stream_ssl.data.nodecache import describe_storage, storage_summary
from stream_ssl.data.plan import DEFAULT_SHUFFLE_BLOCK, DEFAULT_SHUFFLE_WINDOW, Plan, PlanError, make_plan
from stream_ssl.data.reader import ShardReader


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="comma-separated shard sets (folders or URLs with index.json), "
                   "folders of plain tars, single tars or brace patterns (local tars are indexed on the fly)")
    p.add_argument("--unique-samples", required=True,
                   help=f"N: {COUNT_HELP}, or a fraction of the pool (0.1, 10%%)")
    p.add_argument("--budget-samples", required=True, help=f"C: total samples seen in pretraining, {COUNT_HELP}")
    p.add_argument("--mix", help="per-source weights of the pool, e.g. real=0.7,generated=0.3 (default: "
                                 "proportional to size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool and of every pass's order (default 0)")
    p.add_argument("--shuffle-window", type=int, default=DEFAULT_SHUFFLE_WINDOW,
                   help=f"steps whose samples are mixed together (default {DEFAULT_SHUFFLE_WINDOW})")
    p.add_argument("--shuffle-block", type=int, default=DEFAULT_SHUFFLE_BLOCK,
                   help="samples per contiguous block in the mixing (default: global batch / 16, at most ~4 MB of "
                        "samples; 0: no mixing)")
    p.add_argument("--storage-options", type=storage_options_arg, default={}, help=STORAGE_OPTIONS_HELP)


def load_sets(data: str, storage_options: dict | None = None, warn=None) -> list:
    """The pretraining shard sets of `--data` (comma-separated; shard_tools/inputs.py: shard sets, plain tars,
    brace patterns). A set packed as a downstream set is accepted with
    a warning through `warn` (default: stderr; None from every process but one): pretraining on it is how test
    images leak into pretraining."""
    sets = open_shard_sets(data, storage_options)
    for s in sets:
        if s.source == "downstream":
            (warn or (lambda m: print(m, file=sys.stderr)))(
                f"warning: --data {redact(s.url)}: packed with --source downstream (an evaluation set); pretraining "
                "on it puts its images into the model that evaluation then scores")
    return sets


def print_keys(plan: Plan, rank: int, start_step: int = 0, end_step: int | None = None,
               storage_options: dict | None = None, check_headers: bool = False, long: bool = False,
               out=None, micro_batches: int = 1) -> int:
    """Write the keys `rank` reads in steps [start_step, end_step), in yield order (micro-batch by micro-batch
    with `micro_batches` > 1, as the loader yields them). Returns how many."""
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"--rank {rank} outside [0, {plan.world_size})")
    end_step = plan.steps if end_step is None else min(end_step, plan.steps)
    if not 0 <= start_step <= end_step:
        raise ValueError(f"--start-step {start_step} outside [0, {plan.steps}]")
    out = out or sys.stdout
    reader = ShardReader(plan.sets, storage_options)
    count = 0
    for step in range(start_step, end_step):
        for part in range(micro_batches):
            rows = []
            for piece in plan.rank_slices(step, rank, part, micro_batches):
                if check_headers:
                    reader.verify_headers(piece)
                name = plan.sets[piece.source].name
                rows += [(name, piece.shard, key) for key in reader.keys(piece)]
            order = plan.rank_order(step, rank, part, micro_batches)
            if order is not None:
                rows = [rows[int(k)] for k in order]
            if long:
                out.write("".join(f"{step}\t{name}\t{shard}\t{key}\n" for name, shard, key in rows))
            else:
                out.write("".join(f"{key}\n" for _, _, key in rows))
            count += len(rows)
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=tool_prog("python -m stream_ssl.plan"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(p)
    p.add_argument("--world-size", type=int, default=1, help="training processes, all nodes together (default 1)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="per-rank batch size (default 256)")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes the --world-size processes run on (it divides --world-size), for the storage estimate "
                        "(default 1)")
    p.add_argument("--cache-size", default="",
                   help=f"node cache for the storage estimate, {SIZE_HELP} per node (default: no cache)")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="print the summary as JSON (default: off)")
    p.add_argument("--keys", action=argparse.BooleanOptionalAction, default=False,
                   help="print the sample keys --rank reads, one per line (default: off)")
    p.add_argument("--rank", type=int, default=0, help="the rank whose keys --keys prints (default 0)")
    p.add_argument("--start-step", type=int, default=0, help="first step (resume point) for --keys (default 0)")
    p.add_argument("--end-step", type=int, help="stop --keys before this step (default: the last step)")
    p.add_argument("--long", action=argparse.BooleanOptionalAction, default=False,
                   help="--keys prints step, set name, shard and key (default: off)")
    p.add_argument("--check-headers", action=argparse.BooleanOptionalAction, default=False,
                   help="--keys also checks each member's tar header (default: off)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=False,
                   help="check that every shard the plan reads and its .idx exist with the size index.json records "
                        "(listings of each folder, as train.py does before training; default: off)")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="--keys in the order of a loader that splits each batch into this many micro-batches "
                        "(default 1)")
    a = p.parse_args(argv)
    return run_main("plan", lambda: _run(a), usage_errors=(ValueError, FileNotFoundError))


def _run(a: argparse.Namespace) -> int:
    try:
        sets = load_sets(a.data, a.storage_options)
        try:
            plan = make_plan(sets, a.unique_samples, a.budget_samples, a.mix, a.world_size, a.num_workers,
                             a.batch_size, a.seed, shuffle_window=a.shuffle_window, shuffle_block=a.shuffle_block)
        except PlanError as e:
            raise ValueError(e.as_flag()) from None
        if a.check:
            for check in require_shards(plan.shards_used(), a.storage_options):
                print(f"checked {check.summary()}", file=sys.stderr)
        if a.keys:
            print_keys(plan, a.rank, a.start_step, a.end_step, a.storage_options, a.check_headers, a.long,
                       micro_batches=a.micro_batches)
            sys.stdout.flush()
        else:
            storage = storage_summary(plan, a.nodes, parse_bytes(a.cache_size, "--cache-size"))
            print(json.dumps({**plan.summary(), **storage}, indent=1) if a.json
                  else f"{plan.describe()}\n{describe_storage(storage)}")
    except BrokenPipeError:  # `... --keys | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
