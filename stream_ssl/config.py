"""Typed run configuration: defaults here, then a YAML file (`--config`), then command-line flags.

Batch vocabulary: `batch_size` is the micro-batch of one process (what one forward pass sees, and what the
plan's per-rank batch is); an optimizer step accumulates `grad_accum` micro-batches, so the global batch is
world_size x batch_size x grad_accum, and that global batch sets the learning rate (lr x global / 256) and
the number of optimizer steps (budget // global batch). Method settings live in `method_options`; the YAMLs
in configs/methods/ give each method's recommended settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shard_tools.storage import redact_options


@dataclass
class TrainConfig:
    # data
    data: str = ""  # comma-separated shard-set folders or URLs
    unique_samples: str = "1.0"  # N: count (1M, 500K) or fraction of the pool (0.1)
    budget_samples: str = "100K"  # C: samples seen in pretraining
    mix: str | None = None  # per-source pool weights: real=0.7,generated=0.3
    num_workers: int = 2  # loader workers per process
    decoder: str = "pil"  # pil: workers decode + crop, photometric batched on the device | dali: DALI pipeline
    dali_threads: int = 2  # DALI CPU threads per process (--decoder dali)
    storage_options: str = ""  # fsspec options as JSON (or a JSON file), flat or per protocol: {"s3": {...}}
    cache_dir: str = ""  # local cache of what pass 1 read, so repeated passes skip the object store
    cache_size: str = ""  # cache bound (20G, 512MiB); empty: what the plan's repeats need
    shuffle_window: int = 8  # steps whose samples are mixed together (see data/plan.py)
    shuffle_block: int = -1  # samples moved together when mixing; 0: no mixing, -1: automatic
    skip_fraction: float = 0.01  # fail when more than this share of samples (past 32) cannot be decoded
    # model
    method: str = "simclr"
    method_options: dict = field(default_factory=dict)  # passed to the method's constructor
    backbone: str = "resnet18"
    backbone_options: dict = field(default_factory=dict)  # passed to timm.create_model (drop_path_rate, ...)
    image_size: int = 64
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm when running on several GPUs
    # optimization
    batch_size: int = 256  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "lars"  # lars | sgd | adamw
    lr: float = 0.3  # for a global batch of 256; scaled linearly
    weight_decay: float = 1e-6
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value (DINO: 0.04 -> 0.4)
    momentum: float = 0.9  # SGD/LARS momentum (AdamW uses betas 0.9, 0.999)
    warmup_fraction: float = 0.1  # share of optimizer steps with linear warm-up
    precision: str = "no"  # no | bf16 | fp16
    clip_grad: float = 0.0  # max gradient norm, 0 = off
    seed: int = 0
    # output
    out: str = "runs/run"
    log_every: int = 10  # optimizer steps between metric rows
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    resume: str = "auto"  # auto | never | path of a checkpoint file
    tensorboard: bool = True  # also write metrics as TensorBoard events to OUT/tb
    progress: bool = True  # progress bar on the main process
    log_keys: bool = False  # write the sample keys each rank trains on to OUT/keys/rank-R.txt
    # online kNN monitor (labeled shard sets)
    eval_every: int = 0  # optimizer steps between kNN evaluations (0: only at the end when sets are given)
    knn_train: str = ""  # labeled shard set for the kNN memory bank
    knn_test: str = ""  # labeled shard set to score
    knn_k: int = 20
    knn_temperature: float = 0.07

    # Fields that define what a run computes; an output folder holding another run differs in one of them.
    # The per-process batch and accumulation are not among them: the global batch is (see train.py), so a
    # run can resume on another number of processes.
    IDENTITY = ("data", "unique_samples", "budget_samples", "mix", "method", "method_options", "backbone",
                "backbone_options", "image_size", "optimizer", "lr", "weight_decay", "weight_decay_end", "seed",
                "shuffle_window", "shuffle_block")

    def to_dict(self) -> dict:
        """The settings as written to config.json and checkpoints: credentials in storage_options redacted."""
        d = dataclasses.asdict(self)
        d["storage_options"] = redact_options(d["storage_options"])
        return d


def _parse_value(text: str, default, annotation: str = ""):
    if "None" in annotation and text.strip().lower() in ("none", "null", ""):
        return None
    if isinstance(default, bool) or annotation.startswith("bool"):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(default, dict) or annotation.startswith("dict"):
        value = yaml.safe_load(text)  # JSON is YAML; YAML flow style ({temperature: 0.2}) works too
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like '{{\"temperature\": 0.2}}', got {text!r}")
        return value
    if isinstance(default, int) or annotation.startswith("int"):
        return int(text)
    if isinstance(default, float) or annotation.startswith("float"):
        return float(text)
    return text


def _check_types(cfg: TrainConfig, where: str) -> None:
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        default = getattr(TrainConfig(), f.name)
        if value is None:
            if "None" not in str(f.type):
                raise ValueError(f"{where}: {f.name} may not be null")
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}: {f.name} must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: {f.name} must be an integer, got {value!r}")
        if (isinstance(default, float) or str(f.type).startswith("float")) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {f.name} must be a number, got {value!r}")
        if isinstance(default, dict) and not isinstance(value, dict):
            raise ValueError(f"{where}: {f.name} must be a mapping, got {value!r}")


def load_yaml_settings(path: Path) -> dict:
    """A YAML file of TrainConfig settings; unknown keys are an error."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    unknown = set(loaded) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    return loaded


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
        try:
            values.update(load_yaml_settings(args.config))
        except (OSError, ValueError, yaml.YAMLError) as e:
            p.error(str(e))
    for f in dataclasses.fields(TrainConfig):
        raw = getattr(args, f.name)
        if raw is not None:
            try:
                values[f.name] = _parse_value(raw, getattr(defaults, f.name), str(f.type))
            except (ValueError, yaml.YAMLError) as e:
                p.error(f"--{f.name.replace('_', '-')}: {e}")
    for key in ("unique_samples", "budget_samples"):
        if key in values:
            values[key] = str(values[key])
    for f in dataclasses.fields(TrainConfig):  # YAML 1.1 reads 1e-6 as a string and 1 as an int
        value = values.get(f.name)
        if str(f.type).startswith("float") and value is not None and not isinstance(value, bool):
            try:
                values[f.name] = float(value)
            except (TypeError, ValueError):
                where = f"{args.config}: " if args.config and getattr(args, f.name) is None else ""
                p.error(f"{where}{f.name} must be a number, got {value!r}")
    cfg = TrainConfig(**values)
    try:
        _check_types(cfg, str(args.config) if args.config else "settings")
    except ValueError as e:
        p.error(str(e))
    if not cfg.data:
        p.error("--data is required (comma-separated shard sets)")
    return cfg


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=1) + "\n"
