"""`stream-ssl COMMAND ...`: the trainer's commands behind one console script (see shard_tools/cli.py)."""

from __future__ import annotations

import sys

from shard_tools.cli import Commands, dispatch

COMMANDS: Commands = {
    "train": ("stream_ssl.train", "pretrain at a fixed budget C with N unique samples (one process; many: "
                                  "accelerate launch stream_ssl/train.py)"),
    "plan": ("stream_ssl.plan", "print the plan of a run (passes, steps, reads, cache) or the keys a rank reads"),
    "evaluate": ("stream_ssl.evaluate", "kNN, linear probe and distances of a trained backbone"),
    "distance": ("stream_ssl.distance", "Frechet, KID and VisualDNA distances between shard sets, before training"),
    "sweep": ("launch.sweep", "the diversity sweep: train and evaluate every N (x method x source x seed), "
                              "then the table and plot"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("stream-ssl", "Streaming self-supervised pretraining under a fixed budget with a controlled "
                                  "number of unique samples.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
