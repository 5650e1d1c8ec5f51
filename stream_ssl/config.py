"""Typed run configuration: defaults here, then a YAML file (`--config`), then command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # data
    data: str = ""  # comma-separated shard-set folders or URLs
    unique_samples: str = "1.0"  # N: count (1M, 500K) or fraction of the pool (0.1)
    budget_samples: str = "100K"  # C: samples seen in pretraining
    mix: str | None = None  # per-source pool weights: real=0.7,generated=0.3
    num_workers: int = 2  # loader workers per process
    # model
    method: str = "simclr"
    method_options: dict = field(default_factory=dict)  # passed to the method's constructor
    backbone: str = "resnet18"
    image_size: int = 64
    # optimization
    batch_size: int = 256  # per process
    optimizer: str = "lars"  # lars | sgd | adamw
    lr: float = 0.3  # for a global batch of 256; scaled linearly
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_fraction: float = 0.1  # share of steps with linear warm-up
    precision: str = "no"  # no | bf16 | fp16
    clip_grad: float = 0.0  # max gradient norm, 0 = off
    seed: int = 0
    # output
    out: str = "runs/run"
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    resume: str = "auto"  # auto | never
    log_keys: bool = False  # write the sample keys each rank trains on to OUT/keys/rank-R.txt

    # Fields that define what a run computes; an output folder holding another run differs in one of them.
    IDENTITY = ("data", "unique_samples", "budget_samples", "mix", "method", "method_options", "backbone",
                "image_size", "batch_size", "optimizer", "lr", "weight_decay", "seed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(text: str, default):
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, dict):
        return json.loads(text)
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_config(argv: list[str] | None = None, prog: str = "train.py") -> TrainConfig:
    p = argparse.ArgumentParser(prog=prog, description="Streaming self-supervised pretraining.")
    p.add_argument("--config", type=Path, help="YAML file of settings; flags given here override it")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                       help=f"(default: {getattr(defaults, f.name)!r})")
    args = p.parse_args(argv)
    values: dict = {}
    if args.config:
        loaded = yaml.safe_load(args.config.read_text()) or {}
        unknown = set(loaded) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            p.error(f"{args.config}: unknown settings {sorted(unknown)}")
        values.update(loaded)
    for f in dataclasses.fields(TrainConfig):
        raw = getattr(args, f.name)
        if raw is not None:
            try:
                values[f.name] = _parse_value(raw, getattr(defaults, f.name))
            except ValueError as e:
                p.error(f"--{f.name.replace('_', '-')}: {e}")
    for key in ("unique_samples", "budget_samples"):
        if key in values:
            values[key] = str(values[key])
    cfg = TrainConfig(**values)
    if not cfg.data:
        p.error("--data is required (comma-separated shard sets)")
    return cfg
