"""Typed run configuration: defaults here, then a YAML file (`--config`), then command-line flags.

Every setting is a field of `TrainConfig` with its help text (and, where the value is one of a few names, its
choices) next to it; `parse_config` builds `train.py --help` from them, so what a flag means is written once.
Boolean settings are switches (`--progress` / `--no-progress`). The machinery (`setting`, the flags, reading and
checking a file's values) is shard_tools/settings.py, which the shard tools use too; the recipes are the trainer's.

Batch vocabulary: `batch_size` is the micro-batch of one process (what one forward pass sees, and what the
plan's per-rank batch is); an optimizer step accumulates `grad_accum` micro-batches, so the global batch is
world_size x batch_size x grad_accum, and that global batch sets the learning rate (lr x global / 256) and
the number of optimizer steps (budget // global batch). Method settings live in `method_options`.

Recipes: each method has recommended settings per scale in stream_ssl/recipes/ (also reachable as
configs/methods/): `NAME.yaml` for small images on a ResNet, `NAME_r50.yaml` for ResNets from 160 px,
`NAME_vit.yaml` for ViTs. A run starts from its method's recipe (`--recipe auto`), taking from it only how the
method trains (RECIPE_KEYS: method options, optimizer and its settings, warm-up, clipping, backbone options), never
the run's scale (backbone, image size, batch, precision, workers); `--config` and flags override it. The
optimizer's settings go together: a run that names another optimizer than its recipe's takes none of the
recipe's optimizer settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from shard_tools.quantities import COUNT_HELP, SIZE_HELP
from shard_tools.settings import (
    add_config_option,
    add_settings,
    check_required,
    file_value,
    given_values,
    read_mapping,
    setting,
    text_or_none,
)
from shard_tools.storage import STORAGE_OPTIONS_HELP, redact_options
from stream_ssl.data.decoders import DECODERS
from stream_ssl.data.fetch import LOCAL_READS

COUNT_RULE = f"{COUNT_HELP}, or a fraction of the pool (0.1, 10%; a number with a decimal point <= 1 is a fraction)"
PRECISIONS = ("no", "bf16", "fp16")
OPTIMIZER_NAMES = ("lars", "sgd", "adamw")
RECIPES = Path(__file__).resolve().parent / "recipes"
# What a recipe gives a run: how its method trains. The optimizer's settings are one group (see `with_recipe`).
OPTIMIZER_KEYS = ("optimizer", "optimizer_options", "lr", "weight_decay", "weight_decay_end", "momentum")
RECIPE_KEYS = ("method_options", *OPTIMIZER_KEYS, "warmup_fraction", "clip_grad", "backbone_options")
LARGE_IMAGES = 160  # from this side on, the 224 px recipes (NAME_r50) apply to convolutional backbones


def _method_names() -> tuple[str, ...]:
    """The choices of --method: the method registry's names (imported when asked: the registry imports torch)."""
    from stream_ssl.methods import METHODS

    return tuple(sorted(METHODS))


@dataclass
class TrainConfig:
    # data
    data: str = setting("", "required: comma-separated shard sets (folders or s3://, gs://, http(s):// URLs with "
                            "index.json), folders of plain WebDataset tars, single tars or brace patterns "
                            "(pool-{000000..000099}.tar; local tars are indexed on the fly), on the command line "
                            "or in --config", required=True)
    unique_samples: str = setting("1.0", f"N, the unique samples of the pool: {COUNT_RULE}", parse=str)
    budget_samples: str = setting("100K", f"C, the samples seen in pretraining: {COUNT_HELP}", parse=str)
    mix: str | None = setting(None, "pool weights per source or set name: real=0.7,generated=0.3 "
                                    "(default: proportional to size)", parse=text_or_none)
    num_workers: int = setting(2, "loader worker processes per training process")
    decoder: str = setting("pil", "; ".join(f"{d.name}: {d.help}" for d in DECODERS.values()), tuple(DECODERS))
    dali_threads: int = setting(2, "DALI CPU threads per process (--decoder dali)")
    storage_options: str = setting("", f"{STORAGE_OPTIONS_HELP}; credentials are never written down")
    cache_dir: str = setting("", "folder on the node's local disk, shared by its processes, that keeps what the "
                                 "run reads again, so repeated passes skip the object store")
    cache_size: str = setting("", f"bound of the cache, {SIZE_HELP}; empty: what the plan's repeats need")
    cache_fill: bool = setting(True, "fill the cache in the background with what this process reads later in the "
                                     "run, ahead of training, so that repeated passes on several nodes read the "
                                     "object store once per node (with --cache-dir on each node's local disk)")
    read_ahead_bytes: str = setting("256MiB", f"memory per process for reads ahead of training, {SIZE_HELP}; "
                                              "the reader plans the reads of the steps it covers together and "
                                              "keeps enough requests in flight to hide storage latency (local files: "
                                              "at most 16MiB per loader worker)")
    local_reads: str = setting("mmap", "how local shard files are read: mmap (views of the mapped file, no copy) or "
                                       "pread (one copy per read; for shard files that may be truncated or "
                                       "rewritten while the run reads them: a mapped file that shrinks kills the "
                                       "process)", choices=LOCAL_READS)
    shuffle_window: int = setting(8, "steps whose samples are mixed together (see stream_ssl/data/plan.py)")
    shuffle_block: int = setting(-1, "samples moved together when mixing; 0: no mixing, -1: automatic (global "
                                     "batch / 16, at most ~4 MB of samples)")
    skip_fraction: float = setting(0.01, "fail when more than this share of samples (past 32) cannot be decoded")
    check_shards: bool = setting(True, "before training, check that every shard the plan reads and its .idx exist "
                                       "with the size index.json records (listings of each folder, by name prefixes "
                                       "many at once in object stores, never a request per shard; stops at once "
                                       "naming what is missing)")
    # model
    recipe: str = setting("auto", "the method's recommended settings this run starts from (stream_ssl/recipes/): "
                                  "auto (NAME.yaml for ResNets under 160 px, NAME_r50.yaml from 160 px, NAME_vit.yaml "
                                  "for ViTs), a recipe name (simclr_r50), a YAML path, or none (only the generic "
                                  "defaults); --config and flags override it")
    method: str = setting("simclr", "SSL method", _method_names)
    method_options: dict = setting({}, "settings passed to the method, as JSON or YAML: "
                                       "'{\"temperature\": 0.2}'")
    backbone: str = setting("resnet18", "timm model name (random weights; nothing is downloaded)")
    backbone_options: dict = setting({}, "settings passed to timm.create_model, as JSON: '{\"drop_path_rate\": 0.1}'")
    image_size: int = setting(64, "side of the global views in pixels")
    sync_bn: bool = setting(False, "BatchNorm statistics over all GPUs (SyncBatchNorm; GPUs only)")
    # optimization
    batch_size: int = setting(256, "micro-batch per process (one forward pass)")
    grad_accum: int = setting(1, "micro-batches per optimizer step (global batch = processes x batch x accum)")
    optimizer: str = setting("lars", "optimizer", OPTIMIZER_NAMES)
    optimizer_options: dict = setting({}, "the optimizer's own settings, as JSON or YAML. LARS (timm's Lars): "
                                          "trust_coeff (eta, 0.001: the paper, SimCLR, BYOL), trust_clip (LARC "
                                          "clipping; solo-learn recipes: '{trust_coeff: 0.02, trust_clip: true}'), "
                                          "eps, nesterov; SGD: nesterov, dampening; AdamW: betas, eps, amsgrad")
    lr: float = setting(0.3, "learning rate for a global batch of 256, scaled linearly with the global batch")
    weight_decay: float = setting(1e-6, "weight decay (biases and norm parameters get none)")
    weight_decay_end: float | None = setting(None, "cosine weight-decay schedule to this value (DINO: 0.04 -> 0.4)")
    momentum: float = setting(0.9, "SGD/LARS momentum (AdamW uses betas 0.9, 0.999)")
    warmup_fraction: float = setting(0.1, "share of optimizer steps with a linear learning-rate warm-up")
    precision: str = setting("no", "mixed precision", PRECISIONS)
    clip_grad: float = setting(0.0, "clip the gradient norm to this value (0: off)")
    seed: int = setting(0, "seed of the plan, the initialization and every augmentation")
    # GPU settings (no effect on CPU)
    tf32: bool = setting(True, "CUDA: TF32 matrix multiplies and convolutions for float32 work")
    cudnn_benchmark: bool = setting(True, "CUDA: let cuDNN pick the fastest convolution algorithms")
    channels_last: bool = setting(True, "CUDA: channels-last memory format for convolutional backbones")
    num_processes: int = setting(1, "training processes to start on this machine (one per GPU; on CPUs they form "
                                    "a gloo group); unlike accelerate launch or torchrun, the run's exit status and "
                                    "its one error line come back unchanged. Ignored in a process a launcher started")
    dist_timeout: int = setting(3600, "seconds a collective may wait for the slowest process (rank-0 work "
                                      "such as the kNN monitor or a checkpoint write) before the run fails")
    # output
    out: str = setting("runs/run", "run folder: config, metrics, checkpoints, summary, exported backbone; a local "
                                   "folder or an object-store URL (s3://..., gs://...: the run works in --local-out "
                                   "and publishes there at every checkpoint)")
    local_out: str = setting("", "for an --out on object storage, the local folder the run works in (default: "
                                 "~/.cache/stream-ssl/runs/NAME-HASH); refilled from --out when the run starts")
    log_every: int = setting(10, "optimizer steps between metric rows")
    save_every: int = setting(0, "optimizer steps between checkpoints (0: only at the end and on a stop signal)")
    save_every_minutes: float = setting(30.0, "also write a checkpoint once this many minutes of training passed "
                                              "since the last one (bounds what a SIGKILL or a crash loses; 0: off)")
    stop_signals: str = setting("TERM,INT,USR1", "signals that stop the run cleanly: the step in progress finishes, "
                                                 "a checkpoint is written, exit status 75; the same command then "
                                                 "continues. A second signal stops at once. none: no handling")
    keep_checkpoints: int = setting(2, "newest checkpoints kept (0: all)")
    resume: str = setting("auto", "auto (continue the run in --out), never, or the path of a checkpoint file")
    log_with: str = setting("tensorboard", "experiment trackers (Accelerate's), comma-separated: tensorboard "
                                           "(OUT/tb), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, "
                                           "trackio; none: only OUT/metrics.csv, which is always written. Offline "
                                           "modes are the trackers' own: WANDB_MODE=offline (files in OUT/wandb), "
                                           "mlflow's local ./mlruns unless MLFLOW_TRACKING_URI says otherwise")
    collapse_threshold: float = setting(0.1, "warn once when the std of the L2-normalized embeddings (healthy: "
                                             "1/sqrt(d), collapsed: 0) falls under this fraction of 1/sqrt(d); "
                                             "0: never")
    progress: bool = setting(True, "progress bar on the main process")
    log_keys: bool = setting(False, "write the sample keys each rank trains on to OUT/keys/rank-R.txt")
    # online kNN monitor (labeled shard sets)
    eval_every: int = setting(0, "optimizer steps between kNN evaluations (0: only at the end, when sets are given)")
    knn_train: str = setting("", "labeled shard set for the kNN monitor's memory bank")
    knn_test: str = setting("", "labeled shard set the kNN monitor scores")
    knn_k: int = setting(20, "neighbours of the kNN monitor")
    knn_temperature: float = setting(0.07, "temperature of the kNN monitor's vote weights")

    # Fields that define what a run computes; an output folder holding another run differs in one of them.
    # The per-process batch and accumulation are not among them: the global batch is (see train.py), so a
    # run can resume on another number of processes.
    IDENTITY = ("data", "unique_samples", "budget_samples", "mix", "method", "method_options", "backbone",
                "backbone_options", "image_size", "optimizer", "optimizer_options", "lr", "weight_decay",
                "weight_decay_end", "seed", "shuffle_window", "shuffle_block")

    def to_dict(self) -> dict:
        """The settings as written to config.json and checkpoints: credentials in storage_options redacted."""
        d = dataclasses.asdict(self)
        d["storage_options"] = redact_options(d["storage_options"])
        return d


def load_yaml_settings(path: Path) -> dict:
    """A YAML file of TrainConfig settings, as written (a recipe, a --config file); unknown keys are an error."""
    return read_mapping(TrainConfig, path)


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, usage="%(prog)s --data SETS [--config FILE] [options]",
                                description="Streaming self-supervised pretraining at a fixed budget of samples seen "
                                "with a controlled number of unique samples.")
    add_config_option(p, "batch_size: 128")
    add_settings(p, TrainConfig)
    return p


def parse_config(argv: list[str] | None = None, prog: str = "train.py") -> TrainConfig:
    """The run's settings: the defaults, its recipe, a YAML file (--config), then the flags."""
    p = build_parser(prog)
    values = given_values(p, TrainConfig, p.parse_args(argv))
    try:
        values = with_recipe(values)
    except (OSError, ValueError, yaml.YAMLError) as e:
        p.error(str(e))
    check_required(p, TrainConfig, values)
    return TrainConfig(**values)


def _default(name: str):
    return TrainConfig.__dataclass_fields__[name].default


def recipe_path(recipe: str, method: str, backbone: str, image_size: int) -> Path | None:
    """The file `--recipe` names for this method and scale: None for `none`, and for `auto` when the method has
    no recipe (a method registered by the user)."""
    if recipe == "none":
        return None
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        return Path(recipe)
    if recipe == "auto":
        vit = re.search(r"(^|_)(vit|deit|beit|eva)", backbone) is not None
        auto = RECIPES / f"{method}{'_vit' if vit else '_r50' if image_size >= LARGE_IMAGES else ''}.yaml"
        return auto if auto.exists() else None
    path = RECIPES / f"{recipe}.yaml"
    if not path.exists():
        names = ", ".join(sorted(q.stem for q in RECIPES.glob("*.yaml")))
        raise ValueError(f"--recipe {recipe}: no such recipe (auto, none, a YAML path, or one of {names})")
    return path


def with_recipe(values: dict) -> dict:
    """The settings chosen in `values` (from --config and flags) on top of the recipe they name (`recipe`,
    default auto): the recipe gives only RECIPE_KEYS, and its optimizer settings only to a run with its
    optimizer. `recipe` in the result is the recipe's name (or path) or `none`."""
    method = values.get("method", _default("method"))
    path = recipe_path(values.get("recipe", _default("recipe")), method, values.get("backbone", _default("backbone")),
                       values.get("image_size", _default("image_size")))
    if path is None:
        return {**values, "recipe": "none"}
    recipe = load_yaml_settings(path)
    if recipe.get("method", method) != method:
        raise ValueError(f"--recipe {path}: a recipe for {recipe['method']}, the run's method is {method}")
    taken = {k: v for k, v in recipe.items() if k in RECIPE_KEYS}
    optimizer = taken.get("optimizer", _default("optimizer"))
    if values.get("optimizer", optimizer) != optimizer:
        taken = {k: v for k, v in taken.items() if k not in OPTIMIZER_KEYS}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    taken = {k: file_value(fields[k], v, str(path)) for k, v in taken.items()}
    name = path.stem if path.resolve().parent == RECIPES else str(path)
    return {**taken, **values, "recipe": name}


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=1) + "\n"
