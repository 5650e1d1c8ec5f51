"""The run: everything one pretraining run holds, built by `build_run` from a TrainConfig.

    run = build_run(accelerator, cfg)   # settings checked, plan, model, optimizer, schedule
    checkpointer.load(run)              # the resume point, the model's weights
    run.prepare()                       # run files, device settings, Accelerate, the meter, the loader
    checkpointer.restore(run)           # optimizer, random and meter states

`train.py` drives it (`train_step`, `fit`, `finish`); `checkpointer.py` saves and restores it. Nothing here is
method-specific: the method is an `SSLMethod` found by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed

from shard_tools.listing import ShardsMissing, require_shards
from shard_tools.quantities import parse_bytes, plural
from shard_tools.storage import is_url, parse_storage_options, redact
from stream_ssl import checkpoint
from stream_ssl.config import TrainConfig, config_json
from stream_ssl.data.augment import ViewSpec
from stream_ssl.data.decoders import DECODERS
from stream_ssl.data.nodecache import Node, describe_storage, node_from_env, storage_summary
from stream_ssl.data.plan import Plan, PlanError, make_plan
from stream_ssl.data.streaming import cache_bound
from stream_ssl.distributed import all_gather_objects
from stream_ssl.errors import RunError
from stream_ssl.methods import SSLMethod, build_method
from stream_ssl.metrics import Meter
from stream_ssl.models.backbone import create_backbone, is_vit
from stream_ssl.optim import build_optimizer, check_optimizer_options
from stream_ssl.plan import load_sets
from stream_ssl.runfolder import RemoteRunFolder, run_folder
from stream_ssl.schedules import cosine, warmup_cosine


class RunFinished(Exception):
    """The output folder holds this run, finished: running its command again changes nothing."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Schedule:
    """Learning rate (linear warm-up, then cosine to 0) and weight decay (constant, or cosine to an end value)
    as functions of the optimizer step."""

    total: int
    peak_lr: float
    warmup: int
    weight_decay: float
    weight_decay_end: float | None = None

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total, self.peak_lr, self.warmup)

    def wd(self, step: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        return cosine(step, self.total, self.weight_decay, self.weight_decay_end)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        """Set every parameter group's lr and weight decay (groups without decay keep
        none) for `step`; returns (lr, wd)."""
        lr, wd = self.lr(step), self.wd(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
            if g["base_weight_decay"] > 0:
                g["weight_decay"] = wd
        return lr, wd


@dataclass
class Run:
    cfg: TrainConfig
    acc: Accelerator
    plan: Plan
    method: SSLMethod  # the unwrapped module (checkpoints, hooks, export)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    views: list[ViewSpec]
    storage: dict  # parsed storage options
    feature_dim: int
    node: Node = Node(0, 1, 0, 1)  # which node this process is on (launcher environment)
    cache_bytes: int | None = None  # the node cache's bound (None: no cache)
    start_step: int = 0
    resume_from: Path | None = None
    model: torch.nn.Module | None = None  # the method as Accelerate prepared it (DDP on several processes)
    meter: Meter | None = None  # the run-long figures and the open metrics window (in every checkpoint)
    remote: RemoteRunFolder | None = None  # --out on object storage: where the main process publishes the run
    loader: object = None
    batches: object = None  # the loader's iterator
    state: dict | None = field(default=None, repr=False)  # a loaded checkpoint until checkpointer.restore

    @property
    def out(self) -> Path:
        """The local run folder (for an --out on object storage, its mirror)."""
        return run_folder(self.cfg.out, self.cfg.local_out)

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world_size(self) -> int:
        return self.acc.num_processes

    @property
    def global_batch(self) -> int:
        return self.plan.global_batch  # processes x batch x accumulation: the plan's batch is one optimizer step

    @property
    def total_steps(self) -> int:
        return self.plan.steps

    def prepare(self) -> None:
        """Run files, device settings, Accelerate, the meter and the loader (checkpointer.restore then puts back
        the optimizer, random and meter states of a resumed run)."""
        write_run_files(self)
        apply_device_settings(self.cfg, self.acc.device, self.method)
        if self.cfg.sync_bn and self.world_size > 1:
            self.method = sync_batchnorm(self.method, self.acc)
        self.model, self.optimizer = self.acc.prepare(self.method, self.optimizer)
        self.meter = Meter(self.world_size, self.global_batch, self.start_step)
        set_seed(self.cfg.seed + 1 + self.rank)  # per-process dropout / drop-path stream (the init was shared)
        self.loader = make_run_loader(self)
        self.batches = iter(self.loader)  # draws the loader's base seed from the global RNG: before restoring it


# ----------------------------------------------------------------------------------------------------------
# Building a run.


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerate for this process, with the experiment trackers of `--log-with` (TensorBoard events in OUT/tb).
    Launched on a machine without GPUs, the processes form a gloo group (without `cpu=True`, Accelerate 1.15
    treats each as a single-process run)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None
    cpu = launched and not torch.cuda.is_available()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=True),
                InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))]
    out = run_folder(cfg.out, cfg.local_out)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tb"))
    return Accelerator(mixed_precision=cfg.precision, cpu=cpu, kwargs_handlers=handlers,
                       log_with=trackers(cfg) or None, project_config=project)


def trackers(cfg: TrainConfig) -> list[str]:
    """The experiment trackers `--log-with` names, each known to Accelerate and installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [n.strip() for n in cfg.log_with.split(",") if n.strip() and n.strip().lower() != "none"]
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise RunError(f"--log-with {name}: not a tracker (choose from {', '.join(LOGGER_TYPE_TO_CLASS)}, or none)")
        if name not in installed:
            raise RunError(f"--log-with {name}: the {name} package is not installed (pip install {name}); "
                           "tensorboard or none need nothing more")
    return list(dict.fromkeys(names))


def build_run(acc: Accelerator, cfg: TrainConfig) -> Run:
    check_settings(cfg)
    storage = parse_storage_options(cfg.storage_options)
    plan = make_run_plan(cfg, storage, acc)
    out = run_folder(cfg.out, cfg.local_out)
    check_output_folder(cfg, out, plan.global_batch, plan.shuffle_block)
    finished = finished_summary(cfg, out, plan.steps)
    if finished is not None:
        where = f"{redact(cfg.out)}/summary.json" if is_url(cfg.out) else out / "summary.json"
        raise RunFinished(f"finished at step {plan.steps} of {plan.steps}; summary: {where} (nothing was changed)",
                          finished)
    if cfg.check_shards:
        check_plan_shards(acc, plan, storage)
    set_seed(cfg.seed)
    backbone, dim = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_options)
    method = build_method(cfg.method, backbone, dim, **cfg.method_options)
    if method.needs_batch_stats and cfg.batch_size < 2:
        raise RunError(f"{cfg.method} uses batch statistics; --batch-size (per process, per micro-batch) "
                       "must be >= 2")
    peak_lr = cfg.lr * plan.global_batch / 256
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(), peak_lr, cfg.weight_decay, cfg.momentum,
                                cfg.optimizer_options)
    for g in optimizer.param_groups:
        g["base_weight_decay"] = g["weight_decay"]
    warmup = max(1, int(cfg.warmup_fraction * plan.steps)) if cfg.warmup_fraction > 0 else 0
    schedule = Schedule(plan.steps, peak_lr, warmup, cfg.weight_decay, cfg.weight_decay_end)
    return Run(cfg, acc, plan, method, optimizer, schedule, method.views(cfg.image_size), storage, dim,
               node_from_env(), cache_bytes(cfg, plan))


def check_settings(cfg: TrainConfig) -> None:
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise RunError("--batch-size and --grad-accum must be >= 1")
    check_optimizer_options(cfg.optimizer, cfg.optimizer_options)
    if bool(cfg.knn_train) != bool(cfg.knn_test):
        raise RunError("the kNN monitor needs both --knn-train and --knn-test")
    if not cfg.knn_temperature > 0:
        raise RunError(f"--knn-temperature must be > 0, got {cfg.knn_temperature}")
    try:
        DECODERS[cfg.decoder].check()
    except ImportError as e:
        raise RunError(str(e)) from None


def make_run_plan(cfg: TrainConfig, storage: dict, acc: Accelerator) -> Plan:
    """The plan of the run: its per-rank batch is one optimizer step's (batch x accumulation); a setting it
    refuses is named by its flag."""
    sets = load_sets(cfg.data, storage, warn=acc.print)
    try:
        return make_plan(sets, cfg.unique_samples, cfg.budget_samples, cfg.mix, acc.num_processes, cfg.num_workers,
                         cfg.batch_size * cfg.grad_accum, cfg.seed, shuffle_window=cfg.shuffle_window,
                         shuffle_block=None if cfg.shuffle_block < 0 else cfg.shuffle_block)
    except PlanError as e:
        accum = f" (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum})" if cfg.grad_accum > 1 else ""
        raise RunError(e.as_flag() + (accum if e.setting == "budget_samples" else "")) from None


def check_plan_shards(acc: Accelerator, plan: Plan, storage: dict) -> None:
    """Before anything is trained: every shard the plan reads, and its .idx, exists with the size index.json
    records (shard_tools/listing.py: listings of each folder, on the main process). Every process stops with the
    main process's one line, so none waits for the others in a collective."""
    verdict = None
    if acc.is_main_process:
        try:
            checks = require_shards(plan.shards_used(), storage)
            acc.print("shards: " + "; ".join(c.summary() for c in checks))
        except ShardsMissing as e:
            verdict = str(e)
        except Exception as e:  # noqa: BLE001 - the listing failed (denied, unreachable): name it and the way round
            verdict = (f"could not list the shard sets to check them before training ({type(e).__name__}: {e}); "
                       "fix the access, or skip the check with --no-check-shards")
    verdict = all_gather_objects(verdict)[0]
    if verdict:
        raise RunError(redact(verdict))


def cache_bytes(cfg: TrainConfig, plan: Plan) -> int | None:
    """The bound of the node cache: --cache-size, or what the plan's repeats need; None without --cache-dir."""
    return cache_bound(plan, cfg.cache_dir, parse_bytes(cfg.cache_size, "--cache-size"))


def storage_report(run: Run, bytes_read: int) -> dict:
    """The run's expected object-store bytes (nodecache.storage_summary) and the sample bytes all processes
    read from storage (`bytes_read`: this process's; summed here, so every process must call it)."""
    expected = storage_summary(run.plan, run.node.nodes, run.cache_bytes)
    total = torch.tensor([bytes_read], dtype=torch.float64)
    if run.world_size > 1:
        total = run.acc.reduce(total.to(run.acc.device), reduction="sum").cpu()
    return {**expected, "object_store_bytes_read": int(total.item()), "node": run.node.rank,
            "cache_fill": run.cfg.cache_fill and run.cache_bytes is not None}


def finished_summary(cfg: TrainConfig, out: Path, steps: int) -> dict | None:
    """The summary of the run in `out` when `--resume auto` would continue a run that has finished all its `steps`
    (its latest checkpoint is the last step and summary.json describes it); None otherwise."""
    ckpt = checkpoint.latest_checkpoint(out) if cfg.resume == "auto" else None
    if ckpt is None or checkpoint.step_of(ckpt) != steps:
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # killed after the last checkpoint, before the summary: resuming writes it
    return summary if summary.get("steps") == steps else None


def check_output_folder(cfg: TrainConfig, out: Path, global_batch: int, shuffle_block: int) -> None:
    """Refuse to mix two different runs in one folder (read-only: every process runs it)."""
    ckpt = checkpoint.latest_checkpoint(out)
    if ckpt is not None and cfg.resume == "never":
        raise RunError(f"{out} already holds a run (checkpoint {ckpt.name}); use --resume auto to continue it, "
                       "or choose another --out")
    saved = out / "config.json"
    if not saved.exists() or ckpt is None:
        return
    old = json.loads(saved.read_text())
    diffs = [f"{k}: {old.get(k)!r} there vs {getattr(cfg, k)!r} now"
             for k in TrainConfig.IDENTITY if old.get(k) != getattr(cfg, k)]
    run_info = out / "run.json"
    if run_info.exists():
        info = json.loads(run_info.read_text())
        old_g, old_block = info.get("global_batch"), info.get("shuffle_block")
        if old_g is not None and old_g != global_batch:
            diffs.append(f"global batch: {old_g} there vs {global_batch} now")
        if old_block is not None and old_block != shuffle_block:
            diffs.append(f"shuffle block: {old_block} there vs {shuffle_block} now (pass --shuffle-block "
                         f"{old_block} to continue that run)")
    if diffs:
        raise RunError(f"{out} holds a different run ({'; '.join(diffs)}); choose another --out or delete it")


# ----------------------------------------------------------------------------------------------------------
# Preparing it.


def write_run_files(run: Run) -> None:
    acc, cfg = run.acc, run.cfg
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(config_json(cfg))
        info = {"global_batch": run.global_batch, "world_size": run.world_size, "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum, "optimizer_steps": run.total_steps,
                "peak_lr": run.schedule.peak_lr, "shuffle_block": run.plan.shuffle_block}
        (run.out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
        acc.print(run.plan.describe())
        acc.print(describe_recipe(cfg))
        if run.plan.remote:  # what the run will take from the object store
            acc.print(describe_storage(storage_summary(run.plan, run.node.nodes, run.cache_bytes)))
        processes = plural(run.world_size, "process", "processes")
        acc.print(f"optimizer steps: {run.total_steps} of global batch {run.global_batch} ({processes} x "
                  f"{cfg.batch_size} x {cfg.grad_accum} accumulation); peak lr {run.schedule.peak_lr:.4g}")
    acc.wait_for_everyone()


def describe_recipe(cfg: TrainConfig) -> str:
    """One line: which recipe the run's settings start from."""
    if cfg.recipe == "none":
        return f"recipe: none ({cfg.method} with the generic defaults and the settings given)"
    return (f"recipe: {cfg.recipe} ({cfg.method}'s recommended settings for this scale; --config and flags override "
            "them; --recipe none for the generic defaults)")


def apply_device_settings(cfg: TrainConfig, device: torch.device, method: torch.nn.Module) -> dict:
    """The GPU speed settings (TF32, cuDNN autotuning, channels-last for convolutional backbones) on CUDA;
    nothing elsewhere. Returns what was set."""
    if device.type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    channels_last = cfg.channels_last and not is_vit(method.backbone)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    return {"tf32": cfg.tf32, "cudnn_benchmark": cfg.cudnn_benchmark, "channels_last": channels_last}


def sync_batchnorm(method: SSLMethod, acc: Accelerator) -> SSLMethod:
    """SyncBatchNorm on GPUs, through timm's converter: torch's turns timm's BatchNormAct2d into a plain
    SyncBatchNorm and silently drops its activation."""
    if acc.device.type != "cuda":
        acc.print(f"note: --sync-bn ignored: SyncBatchNorm needs GPUs (device {acc.device})")
        return method
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(method)


def make_run_loader(run: Run):
    """The loader of this process, from the resume step on (kept out of `accelerator.prepare`: the plan
    already splits the data by rank)."""
    cfg = run.cfg
    options = dict(storage_options=run.storage, seed=cfg.seed, micro_batches=cfg.grad_accum,
                   cache_dir=cfg.cache_dir or None, cache_size=run.cache_bytes, cache_fill=cfg.cache_fill,
                   skip_fraction=cfg.skip_fraction, local_reads=cfg.local_reads,
                   read_ahead_bytes=parse_bytes(cfg.read_ahead_bytes, "--read-ahead-bytes"))
    return DECODERS[cfg.decoder].loader(run.plan, run.rank, run.views, run.start_step, cfg.num_workers,
                                        run.acc.device, cfg, **options)
