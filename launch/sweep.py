"""The diversity sweep: at one budget C, pretrain for every number of unique samples N (x method x source x
seed), evaluate every run on every downstream set, and collect the study's table and plot.

    stream-ssl sweep configs/sweeps/demo.yaml              # run the cells here, then collect
    stream-ssl sweep configs/sweeps/demo.yaml --dry-run    # list cells (done / to do) and their commands
    stream-ssl sweep configs/sweeps/demo.yaml --slurm      # write OUT/sweep.sbatch (one array task a cell)
    stream-ssl sweep configs/sweeps/demo.yaml --cell 3     # one cell: train + evaluate (what a task runs)
    stream-ssl sweep configs/sweeps/demo.yaml --collect    # results.csv, results.md, diversity.png,
                                                           # gain_vs_distance.png (with 2+ downstream sets)

A sweep file (YAML; relative paths are taken from the current folder, normally the repository root):

    name: demo
    out: demo_out/sweep                  # default: sweeps/NAME
    budget: 64K                          # C, samples seen by every run
    unique: [1%, 10%, 100%]              # N: counts (40, 500K) or fractions of the source's pool
    methods: [simclr]                    # or {simclr: {method_options: {...}}, byol: {...}}: per-method settings
    sources:                             # pretraining data: name -> shard sets, or {data: [...], mix: ...}
      gen_a: demo_out/shards/pool
      real+gen: {data: [shards/real, shards/gen], mix: "real=0.7,gen=0.3"}
    downstream:                          # name -> labeled shard sets
      a: {train: demo_out/shards/down_a_train, test: demo_out/shards/down_a_test}
    seeds: [0]
    train_config: configs/demo.yaml      # optional base settings (a train.py --config file)
    train: {batch_size: 128, lr: 1.0}    # train.py settings for every cell (override train_config)
    evaluate: {knn: true, linear: true, distance: source, distance_samples: 2000}   # distance: source|pool|false
    random_init: true                    # also evaluate each method's untrained backbone (seed's init): a baseline
    metric: knn                          # accuracy in the plot and the table's D trend: knn | linear
    launch: {processes: 1, env: {OMP_NUM_THREADS: "1"}}   # processes > 1: accelerate launch per cell
    slurm: {partition: gpu, time: "08:00:00", gpus: 1, cpus: 16, mem: 64G, max_parallel: 16, setup: [...]}

Cells are the product methods x sources x N x seeds; cell `simclr-gen_a-N10pct-s0` trains into
OUT/runs/<cell> (settings in OUT/cells/<cell>.yaml) and writes OUT/runs/<cell>/eval.json. A cell whose run has
summary.json and whose eval.json covers the sweep's downstream sets and evaluation settings is finished and
skipped on a re-run; a half-trained run resumes from its last checkpoint (train.py --resume auto). Locally, cells
run one after another, or one per GPU when several GPUs are visible (and `launch.processes` is 1).

Before the first cell runs, every input of the unfinished cells (their sources' shard sets and every downstream
set) is checked to be a shard set (its index.json is read): a missing one stops the sweep with one line naming
them all, before any training. `--dry-run` writes the cells' YAML files (so the commands it prints run as they
are), starts nothing, and warns about missing inputs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shard_tools.cli import DIVERGED, run_main, tool_prog

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "stream_ssl" / "train.py"
CELL_FIELDS = ("data", "mix", "unique_samples", "budget_samples", "method", "seed", "out")
# distance: "source" (true): the whole data each run's pool is drawn from, the same samples for every N;
# "pool": the run's own N samples (few when N is small); false: none.
EVAL_DEFAULTS = {"knn": True, "linear": True, "distance": "source", "distance_samples": 2000, "batch_size": 256}
SLURM_DEFAULTS = {"partition": None, "account": None, "time": "24:00:00", "gpus": 1, "cpus": 8, "mem": None,
                  "max_parallel": None, "setup": [], "extra": []}
CSV_COLUMNS = ("cell", "status", "method", "source", "data", "mix", "backbone", "image_size", "unique", "N", "C", "D",
               "passes", "steps", "global_batch", "seed", "downstream", "knn_k20", "knn_k200", "linear_top1",
               "linear_top5", "frechet", "kid", "kid_std", "vdna", "distance_samples", "final_loss", "train_seconds",
               "eval_seconds", "run", "reason")
DISTANCES = (("frechet", "Frechet distance"), ("kid", "KID"), ("vdna", "VisualDNA EMD"))


class SweepError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------
# The sweep file.


@dataclass
class Cell:
    index: int
    name: str
    method: str
    source: str
    unique: str
    seed: int
    settings: dict  # the full train.py settings of the cell
    run: Path

    @property
    def summary_path(self) -> Path:
        return self.run / "summary.json"

    @property
    def eval_path(self) -> Path:
        return self.run / "eval.json"

    @property
    def diverged_path(self) -> Path:
        return self.run / "diverged.json"


@dataclass
class Sweep:
    path: Path | None
    name: str
    out: Path
    budget: str
    unique: list[str]
    methods: dict[str, dict]
    sources: dict[str, dict]
    downstream: dict[str, dict]
    seeds: list[int]
    train: dict
    evaluate: dict
    metric: str
    launch: dict
    slurm: dict
    random_init: bool = False
    cells: list[Cell] = field(default_factory=list)


def slug(text: str) -> str:
    text = str(text).replace("%", "pct").replace("+", "_plus_")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _as_list(value, what: str) -> list:
    if value is None:
        raise SweepError(f"{what} is required")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _train_fields() -> set[str]:
    from stream_ssl.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def _check_settings(settings: dict, where: str) -> None:
    unknown = set(settings) - _train_fields()
    if unknown:
        raise SweepError(f"{where}: unknown train.py settings {sorted(unknown)}")
    fixed = set(settings) & set(CELL_FIELDS)
    if fixed:
        raise SweepError(f"{where}: {sorted(fixed)} are set by the sweep (budget, unique, sources, methods, seeds, "
                         "out), not by train settings")


def _source(name: str, value) -> dict:
    if isinstance(value, (str, list, tuple)):
        value = {"data": value}
    if not isinstance(value, dict) or "data" not in value:
        raise SweepError(f"sources.{name}: expected shard sets or {{data: [...], mix: ...}}")
    data = value["data"]
    data = ",".join(str(d) for d in data) if isinstance(data, (list, tuple)) else str(data)
    mix = value.get("mix")
    if isinstance(mix, dict):
        mix = ",".join(f"{k}={v}" for k, v in mix.items())
    extra = set(value) - {"data", "mix"}
    if extra:
        raise SweepError(f"sources.{name}: unknown keys {sorted(extra)}")
    return {"data": data, "mix": mix}


def load_sweep(spec: dict | Path | str, out: Path | None = None) -> Sweep:
    """Read and check a sweep (a YAML file or the same as a dict) and lay out its cells."""
    path = None
    if not isinstance(spec, dict):
        path = Path(spec)
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SweepError(f"{path}: {e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping")
    known = {"name", "out", "budget", "unique", "methods", "sources", "downstream", "seeds", "train_config",
             "train", "evaluate", "metric", "launch", "slurm", "random_init"}
    unknown = set(spec) - known
    if unknown:
        raise SweepError(f"{path or 'sweep'}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    name = str(spec.get("name") or (path.stem if path else "sweep"))
    budget = spec.get("budget")
    if budget is None:
        raise SweepError("budget (C, samples seen by every run) is required")
    unique = [str(u) for u in _as_list(spec.get("unique"), "unique (the list of N)")]
    methods_raw = spec.get("methods", ["simclr"])
    if isinstance(methods_raw, dict):
        methods = {str(k): dict(v or {}) for k, v in methods_raw.items()}
    else:
        methods = {str(m): {} for m in _as_list(methods_raw, "methods")}
    sources_raw = spec.get("sources")
    if not isinstance(sources_raw, dict) or not sources_raw:
        raise SweepError("sources: a mapping of name -> shard sets is required")
    sources = {str(k): _source(str(k), v) for k, v in sources_raw.items()}
    down_raw = spec.get("downstream") or {}
    if not isinstance(down_raw, dict):
        raise SweepError("downstream: expected a mapping of name -> {train, test}")
    downstream = {}
    for k, v in down_raw.items():
        if not isinstance(v, dict) or not {"train", "test"} <= set(v):
            raise SweepError(f"downstream.{k}: expected {{train: SHARDS, test: SHARDS}}")
        downstream[str(k)] = {"train": str(v["train"]), "test": str(v["test"])}
    seeds = [int(s) for s in _as_list(spec.get("seeds", [0]), "seeds")]
    train: dict = {}
    if spec.get("train_config"):
        from stream_ssl.config import load_yaml_settings

        try:
            train.update(load_yaml_settings(Path(spec["train_config"])))
        except (OSError, ValueError) as e:
            raise SweepError(f"train_config: {e}") from None
        for key in CELL_FIELDS:  # a train config may name data or a method: the sweep decides those
            train.pop(key, None)
    train.update(spec.get("train") or {})
    _check_settings(train, "train")
    for m, overrides in methods.items():
        _check_settings(overrides, f"methods.{m}")
    evaluate = dict(EVAL_DEFAULTS)
    evaluate.update(spec.get("evaluate") or {})
    unknown = set(evaluate) - set(EVAL_DEFAULTS)
    if unknown:
        raise SweepError(f"evaluate: unknown keys {sorted(unknown)}")
    metric = str(spec.get("metric", "knn"))
    if metric not in ("knn", "linear"):
        raise SweepError("metric: knn or linear")
    if metric == "linear" and not evaluate["linear"]:
        raise SweepError("metric: linear needs evaluate.linear: true")
    if metric == "knn" and not evaluate["knn"]:
        raise SweepError("metric: knn needs evaluate.knn: true")
    launch = {"processes": 1, "env": {}}
    launch.update(spec.get("launch") or {})
    slurm = dict(SLURM_DEFAULTS)
    slurm.update(spec.get("slurm") or {})
    sweep = Sweep(path=path, name=name, out=Path(out or spec.get("out") or Path("sweeps") / slug(name)),
                  budget=str(budget), unique=unique, methods=methods, sources=sources, downstream=downstream,
                  seeds=seeds, train=train, evaluate=evaluate, metric=metric, launch=launch, slurm=slurm,
                  random_init=bool(spec.get("random_init", False)))
    sweep.cells = make_cells(sweep)
    return sweep


def make_cells(sweep: Sweep) -> list[Cell]:
    cells = []
    grid = itertools.product(sweep.methods, sweep.sources, sweep.unique, sweep.seeds)
    for i, (method, source, unique, seed) in enumerate(grid):
        name = f"{slug(method)}-{slug(source)}-N{slug(unique)}-s{seed}"
        run = sweep.out / "runs" / name
        settings = dict(sweep.train)
        settings.update(sweep.methods[method])
        settings.update(data=sweep.sources[source]["data"], mix=sweep.sources[source]["mix"], unique_samples=unique,
                        budget_samples=sweep.budget, method=method, seed=seed, out=str(run))
        cells.append(Cell(i, name, method, source, unique, seed, settings, run))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise SweepError("two cells map to the same folder name: give sources/methods/N distinct names")
    return cells


# ----------------------------------------------------------------------------------------------------------
# Running cells.


def cell_inputs(sweep: Sweep, cells: list[Cell]) -> dict[str, str]:
    """The shard sets `cells` read, URL -> where the sweep file names it: their sources' pretraining data, and
    every downstream set (each cell is evaluated on all of them, and its distances measured to them)."""
    inputs: dict[str, str] = {}
    for source in dict.fromkeys(c.source for c in cells):
        for url in sweep.sources[source]["data"].split(","):
            if url:
                inputs.setdefault(url, f"sources.{source}")
    for name, pair in (sweep.downstream if cells else {}).items():
        for part in ("train", "test"):
            inputs.setdefault(pair[part], f"downstream.{name}.{part}")
    return inputs


def missing_inputs(sweep: Sweep, cells: list[Cell]) -> dict[str, str]:
    """Those inputs of `cells` that are not shard sets, URL -> 'WHERE URL (why)': one read of each index.json."""
    from shard_tools.shardset import load_shard_set
    from shard_tools.storage import parse_storage_options, redact

    options = parse_storage_options(sweep.train.get("storage_options"))
    missing = {}
    for url, where in cell_inputs(sweep, cells).items():
        try:
            load_shard_set(url, options)
        except FileNotFoundError:
            missing[url] = f"{where} {redact(url)} (no index.json)"
        except (OSError, ValueError) as e:
            missing[url] = f"{where} {redact(url)} ({redact(str(e).splitlines()[0] if str(e) else type(e).__name__)})"
    return missing


def require_inputs(sweep: Sweep, cells: list[Cell]) -> None:
    """Stop before anything runs when an input of `cells` is not a shard set: one line naming all of them."""
    missing = list(missing_inputs(sweep, cells).values())
    if missing:
        many = len(missing) > 1
        raise SweepError(f"{len(missing)} input{'s' if many else ''} of the sweep "
                         f"{'are not shard sets' if many else 'is not a shard set'}, nothing was run: "
                         f"{'; '.join(missing)} (pack {'them' if many else 'it'} with `shard-tools pack`, or fix the "
                         "sweep file)")


def cell_config_path(sweep: Sweep, cell: Cell) -> Path:
    return sweep.out / "cells" / f"{cell.name}.yaml"


def write_cell_config(sweep: Sweep, cell: Cell) -> Path:
    path = cell_config_path(sweep, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({k: v for k, v in cell.settings.items() if v is not None}, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def train_command(sweep: Sweep, cell: Cell, python: str | None = None) -> list[str]:
    """How a cell trains: train.py with the cell's YAML, under accelerate launch when it has several processes."""
    config = cell_config_path(sweep, cell)
    procs = int(sweep.launch.get("processes", 1))
    if procs > 1:
        launcher = REPO / "launch" / "nodes.py"
        return [python or sys.executable, str(launcher), "--procs-per-node", str(procs), "--",
                "--config", str(config)]
    return [python or sys.executable, str(TRAIN), "--config", str(config)]


def eval_signature(sweep: Sweep, distance: bool = True) -> dict:
    """What an evaluation's results depend on: a saved eval.json with another signature is redone. The
    protocol (evaluation view, probe cap, distances) is part of it, so a changed protocol re-evaluates."""
    from stream_ssl.evaluate import EVAL_PROTOCOL

    evaluate = sweep.evaluate if distance else {**sweep.evaluate, "distance": False}
    return json.loads(json.dumps({"downstream": sweep.downstream, "evaluate": evaluate, "protocol": EVAL_PROTOCOL}))


def trained(cell: Cell) -> bool:
    if not cell.summary_path.exists() or not (cell.run / "backbone.safetensors").exists():
        return False
    saved = json.loads((cell.run / "config.json").read_text()) if (cell.run / "config.json").exists() else {}
    for key in ("data", "unique_samples", "budget_samples", "method", "seed", "backbone", "image_size"):
        want = cell.settings.get(key)
        if want is not None and key in saved and str(saved[key]) != str(want):
            raise SweepError(f"{cell.run} holds another run ({key}: {saved[key]!r} there, {want!r} in the sweep); "
                             "delete it or change the sweep's out")
    return True


def evaluated(sweep: Sweep, cell: Cell) -> bool:
    if not cell.eval_path.exists():
        return False
    try:
        saved = json.loads(cell.eval_path.read_text())
    except json.JSONDecodeError:
        return False
    return saved.get("signature") == eval_signature(sweep)


def diverged(cell: Cell) -> dict | None:
    """The record of a cell whose training diverged (train.py exit status 3) with its current settings, if any."""
    try:
        record = json.loads(cell.diverged_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("settings") == json.loads(json.dumps(cell.settings)) else None


def record_divergence(cell: Cell) -> dict:
    """Write RUN/diverged.json: the settings and train.py's one-line reason (the last line of its log)."""
    reason = ""
    for log in sorted((cell.run / ".logs").glob("train*.log"))[:1]:  # train.log, or train-rank-0.log
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1].split(": ", 1)[-1] if lines else ""
    record = {"cell": cell.name, "status": "diverged", "exit_status": DIVERGED, "reason": reason,
              "settings": cell.settings}
    cell.diverged_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def cell_done(sweep: Sweep, cell: Cell) -> bool:
    """Trained and evaluated, or diverged with the same settings (a result too: re-running diverges again)."""
    return diverged(cell) is not None or (trained(cell) and evaluated(sweep, cell))


def unfinished(sweep: Sweep) -> list[Cell]:
    return [c for c in sweep.cells if not cell_done(sweep, c)]


def _env(sweep: Sweep, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (sweep.launch.get("env") or {}).items()})
    env.update(extra or {})
    pythonpath = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pythonpath if pythonpath else "")
    return env


def run_cell(sweep: Sweep, cell: Cell, log=print) -> str:
    """Train (unless trained) and evaluate (unless evaluated) one cell. Returns what it did. A run that diverges
    (train.py exit status 3) is recorded in RUN/diverged.json and is a result, not a failure."""
    if diverged(cell) is not None:
        return "skipped (diverged; delete the run folder to try again)"
    if cell_done(sweep, cell):
        return "skipped (finished)"
    did = []
    if not trained(cell):
        write_cell_config(sweep, cell)
        cmd = train_command(sweep, cell)
        log(f"[sweep] cell {cell.index} {cell.name}: training ({shlex.join(cmd)})")
        proc = subprocess.run(cmd, cwd=os.getcwd(), env=_env(sweep))
        if proc.returncode == DIVERGED:
            return f"diverged ({record_divergence(cell)['reason'] or 'see its log'})"
        if proc.returncode != 0 or not cell.summary_path.exists():
            raise SweepError(f"cell {cell.name}: training failed (exit status {proc.returncode})")
        did.append("trained")
    if not evaluated(sweep, cell):
        log(f"[sweep] cell {cell.index} {cell.name}: evaluating on {', '.join(sweep.downstream) or 'nothing'}")
        evaluate_cell(sweep, cell)
        did.append("evaluated")
    return " + ".join(did)


def _distance_mode(value) -> bool | str:
    if value is True:
        return "source"
    if value in (False, None, "none", "no"):
        return False
    if value not in ("source", "pool"):
        raise SweepError(f"evaluate.distance: source, pool or false, got {value!r}")
    return value


def evaluate_cell(sweep: Sweep, cell: Cell) -> dict:
    from stream_ssl.evaluate import evaluate_sets

    threads = (sweep.launch.get("env") or {}).get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    ev = sweep.evaluate
    names = list(sweep.downstream)
    t0 = time.perf_counter()
    results = evaluate_sets(cell.run, [(sweep.downstream[n]["train"], sweep.downstream[n]["test"]) for n in names],
                            knn=bool(ev["knn"]), linear=bool(ev["linear"]), distance=_distance_mode(ev["distance"]),
                            distance_samples=int(ev["distance_samples"]), batch_size=int(ev["batch_size"]),
                            seed=cell.seed) if names else []
    record = {"cell": cell.name, "signature": eval_signature(sweep), "seconds": time.perf_counter() - t0,
              "results": dict(zip(names, results))}
    tmp = cell.eval_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, cell.eval_path)
    return record


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run_local(sweep: Sweep, config_arg: str | None, log=print) -> int:
    """Every unfinished cell, one after another, or one per GPU when several are visible."""
    todo = unfinished(sweep)
    require_inputs(sweep, todo)
    for c in sweep.cells:
        if c not in todo:
            log(f"[sweep] cell {c.index} {c.name}: {'diverged' if diverged(c) else 'finished'}, skipped")
    gpus = gpu_count()
    if len(todo) > 1 and gpus > 1 and int(sweep.launch.get("processes", 1)) == 1 and config_arg:
        return _run_parallel(sweep, todo, gpus, config_arg, log)
    failed = 0
    for c in todo:
        t0 = time.perf_counter()
        try:
            did = run_cell(sweep, c, log)
        except SweepError as e:
            log(f"[sweep] error: {e}")
            failed += 1
            continue
        log(f"[sweep] cell {c.index} {c.name}: {did} in {(time.perf_counter() - t0) / 60:.1f} min")
    return failed


def _run_parallel(sweep: Sweep, todo: list[Cell], gpus: int, config_arg: str, log) -> int:
    logs = sweep.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible[:gpus] if len(visible) >= gpus else [str(i) for i in range(gpus)]  # keep the user's selection
    free, running, failed, queue = list(ids), {}, 0, list(todo)
    while queue or running:
        while queue and free:
            cell, gpu = queue.pop(0), free.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), config_arg, "--out", str(sweep.out),
                   "--cell", str(cell.index)]
            f = open(logs / f"{cell.name}.log", "a")
            log(f"[sweep] cell {cell.index} {cell.name} on GPU {gpu} (log {f.name})")
            running[cell.index] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                    env=_env(sweep, {"CUDA_VISIBLE_DEVICES": gpu})), gpu, f,
                                   cell)
        time.sleep(2)
        for idx, (proc, gpu, f, cell) in list(running.items()):
            if proc.poll() is not None:
                f.close()
                free.append(gpu)
                del running[idx]
                if proc.returncode:
                    failed += 1
                    log(f"[sweep] cell {cell.index} {cell.name} failed (exit {proc.returncode}); see {f.name}")
                else:
                    log(f"[sweep] cell {cell.index} {cell.name} done")
    return failed


def baseline_run(sweep: Sweep, method: str, seed: int) -> Path:
    return sweep.out / "runs" / f"random-init-{slug(method)}-s{seed}"


def ensure_baselines(sweep: Sweep, log=print) -> None:
    """Untrained backbones (the exact initialization of each method's runs, seed by seed), evaluated like the
    cells except for the distance: the reference every pretrained run must beat."""
    if not sweep.random_init or not sweep.downstream:
        return
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import save_file

    from stream_ssl.config import TrainConfig, config_json
    from stream_ssl.evaluate import evaluate_sets
    from stream_ssl.models.backbone import create_backbone

    names = list(sweep.downstream)
    signature = eval_signature(sweep, distance=False)
    for method in sweep.methods:
        for seed in sweep.seeds:
            run = baseline_run(sweep, method, seed)
            settings = {**sweep.train, **sweep.methods[method], "method": method, "seed": seed, "out": str(run),
                        "data": next(iter(sweep.sources.values()))["data"]}
            cfg = TrainConfig(**settings)
            if not (run / "backbone.safetensors").exists():
                run.mkdir(parents=True, exist_ok=True)
                set_seed(seed)  # as train.py does right before it creates the backbone
                model, _ = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_options)
                state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
                save_file(state, str(run / "backbone.safetensors"), metadata={"timm_name": cfg.backbone})
                (run / "config.json").write_text(config_json(cfg))
            path = run / "eval.json"
            if path.exists() and json.loads(path.read_text()).get("signature") == signature:
                continue
            log(f"[sweep] evaluating the untrained {cfg.backbone} ({method}, seed {seed}) as a baseline")
            threads = (sweep.launch.get("env") or {}).get("OMP_NUM_THREADS")
            if threads:
                torch.set_num_threads(int(threads))
            ev = sweep.evaluate
            results = evaluate_sets(run, [(sweep.downstream[n]["train"], sweep.downstream[n]["test"]) for n in names],
                                    knn=bool(ev["knn"]), linear=bool(ev["linear"]), distance=False,
                                    batch_size=int(ev["batch_size"]), seed=seed)
            path.write_text(json.dumps({"cell": run.name, "signature": signature,
                                        "results": dict(zip(names, results))}, indent=1) + "\n")


def baseline_rows(sweep: Sweep) -> list[dict]:
    rows = []
    if not sweep.random_init:
        return rows
    for method in sweep.methods:
        for seed in sweep.seeds:
            path = baseline_run(sweep, method, seed) / "eval.json"
            if not path.exists():
                continue
            for down, r in json.loads(path.read_text()).get("results", {}).items():
                knn, lin = r.get("knn", {}), r.get("linear", {})
                rows.append({"cell": path.parent.name, "method": f"{method}: random init", "source": "-",
                             "unique": "0", "N": 0, "C": 0, "D": None, "passes": None, "steps": 0, "seed": seed,
                             "downstream": down, "knn_k20": knn.get("k20_t0.07"), "knn_k200": knn.get("k200_t0.1"),
                             "linear_top1": lin.get("top1"), "linear_top5": lin.get("top5"),
                             "eval_seconds": r.get("seconds"), "run": str(path.parent), "baseline": True,
                             "status": "done"})
    return rows


# ----------------------------------------------------------------------------------------------------------
# SLURM.


def compress_indices(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (SLURM's --array syntax)."""
    parts, run = [], []
    for i in sorted(set(indices)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def slurm_script(sweep: Sweep, config_arg: str, cells: list[Cell] | None = None) -> str:
    """An array job: task i runs cell i (finished cells are left out of the array)."""
    s = sweep.slurm
    cells = unfinished(sweep) if cells is None else cells
    if not cells:
        raise SweepError("every cell is finished: nothing to submit (run --collect)")
    array = compress_indices([c.index for c in cells])
    if s.get("max_parallel"):
        array += f"%{int(s['max_parallel'])}"
    logs = (sweep.out / "logs").resolve()
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{slug(sweep.name)}", f"#SBATCH --array={array}",
             f"#SBATCH --output={logs}/%x-%A_%a.out", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={int(s['cpus'])}", f"#SBATCH --time={s['time']}"]
    if int(s.get("gpus") or 0) > 0:
        lines.append(f"#SBATCH --gpus-per-node={int(s['gpus'])}")
    for key in ("partition", "account", "mem"):
        if s.get(key):
            lines.append(f"#SBATCH --{key}={s[key]}")
    for extra in _as_list(s.get("extra") or [], "slurm.extra"):
        lines.append(f"#SBATCH {extra}")
    cmd = ["$PYTHON", str(Path(__file__).resolve()), str(Path(config_arg).resolve()), "--out",
           str(sweep.out.resolve()), "--cell", '"$SLURM_ARRAY_TASK_ID"']
    lines += ["", "# One cell of the sweep per array task: train (resuming if a previous task was cut short), then",
              "# evaluate. A finished cell exits at once, so resubmitting the whole array is safe.",
              "set -eo pipefail", f"cd {shlex.quote(os.getcwd())}", f"mkdir -p {logs}"]
    # setup lines (module load, conda activate, source venv) run before nounset: activation scripts often
    # read unset variables
    for setup in _as_list(s.get("setup") or [], "slurm.setup"):
        lines.append(str(setup))
    lines.append("set -u")
    procs = int(sweep.launch.get("processes", 1))
    if procs > 1 and int(s.get("gpus") or 0) != procs:
        lines.append(f"# note: launch.processes is {procs}; ask SLURM for as many GPUs (slurm.gpus)")
    for k, v in (sweep.launch.get("env") or {}).items():
        lines.append(f"export {k}={shlex.quote(str(v))}")
    lines += [f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}", " ".join(cmd), ""]
    return "\n".join(lines)


def collect_script(sweep: Sweep, config_arg: str) -> str:
    logs = (sweep.out / "logs").resolve()
    return "\n".join([
        "#!/bin/bash", f"#SBATCH --job-name=collect-{slug(sweep.name)}", f"#SBATCH --output={logs}/%x-%j.out",
        "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=2", "#SBATCH --time=00:30:00",
        *([f"#SBATCH --partition={sweep.slurm['partition']}"] if sweep.slurm.get("partition") else []),
        *([f"#SBATCH --account={sweep.slurm['account']}"] if sweep.slurm.get("account") else []),
        "set -eo pipefail", f"cd {shlex.quote(os.getcwd())}",
        *[str(x) for x in _as_list(sweep.slurm.get("setup") or [], "slurm.setup")],
        "set -u", f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
        f"$PYTHON {Path(__file__).resolve()} {Path(config_arg).resolve()} --out {sweep.out.resolve()} --collect", ""])


# ----------------------------------------------------------------------------------------------------------
# Collecting results.


def result_rows(sweep: Sweep) -> tuple[list[dict], list[Cell]]:
    rows, missing = [], []
    for c in sweep.cells:
        record = diverged(c)
        if record is not None:
            rows.append({"cell": c.name, "status": "diverged", "method": c.method, "source": c.source,
                         "data": c.settings.get("data"), "mix": c.settings.get("mix"), "unique": c.unique,
                         "C": sweep.budget, "seed": c.seed, "downstream": "", "run": str(c.run),
                         "reason": record.get("reason")})
            continue
        if not (c.summary_path.exists() and c.eval_path.exists()):
            missing.append(c)
            continue
        summary = json.loads(c.summary_path.read_text())
        record = json.loads(c.eval_path.read_text())
        plan = summary.get("plan", {})
        n, budget = plan.get("unique_samples"), plan.get("budget_samples")
        base = {"cell": c.name, "status": "done", "method": c.method, "source": c.source,
                "data": c.settings.get("data"), "mix": c.settings.get("mix"), "backbone": summary.get("backbone"),
                "image_size": summary.get("image_size"), "unique": c.unique, "N": n, "C": budget,
                "D": plan.get("diversity", n / budget if n and budget else None), "passes": plan.get("passes"),
                "steps": summary.get("steps"), "global_batch": summary.get("global_batch"), "seed": c.seed,
                "final_loss": summary.get("final_loss"), "train_seconds": summary.get("wall_seconds"),
                "run": str(c.run)}
        results = record.get("results", {})
        if not results:
            rows.append({**base, "downstream": "", "eval_seconds": record.get("seconds")})
        for down, r in results.items():
            knn = r.get("knn", {})
            lin = r.get("linear", {})
            dist = r.get("distance", {})
            rows.append({**base, "downstream": down, "knn_k20": knn.get("k20_t0.07"), "knn_k200": knn.get("k200_t0.1"),
                         "linear_top1": lin.get("top1"), "linear_top5": lin.get("top5"),
                         "frechet": dist.get("frechet"), "kid": dist.get("kid"), "kid_std": dist.get("kid_std"),
                         "vdna": dist.get("vdna"), "distance_samples": dist.get("samples"),
                         "eval_seconds": r.get("seconds")})
    return rows, missing


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return m, sd  # no spread from one value


def grouped(rows: list[dict]) -> list[dict]:
    """Rows averaged over seeds: one per (downstream, method, source, N)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "diverged":  # no accuracy: listed under the table instead
            continue
        groups.setdefault((r["downstream"], r["method"], r["source"], r["N"]), []).append(r)
    out = []
    for (down, method, source, n), rs in groups.items():
        g = {"downstream": down, "method": method, "source": source, "N": n, "seeds": len(rs),
             "baseline": bool(rs[0].get("baseline"))}
        for key in ("D", "passes", "steps", "knn_k20", "knn_k200", "linear_top1", "linear_top5", "frechet", "kid",
                    "vdna", "final_loss", "train_seconds"):
            g[key], g[key + "_std"] = _mean_std([r.get(key) for r in rs])
        out.append(g)
    out.sort(key=lambda g: (g["downstream"], g["baseline"], g["method"], g["source"], g["N"] or 0))
    return out


def _fmt(value, std=None, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.{digits}f}"
    return text


def _sci(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def markdown(groups: list[dict]) -> str:
    cols = ["downstream", "method", "source", "N", "D", "passes", "steps", "final loss", "kNN k=20", "kNN k=200",
            "linear top-1", "Frechet", "KID", "VisualDNA", "seeds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in groups:
        cells = [g["downstream"], g["method"], g["source"], str(g["N"]), _fmt(g["D"], digits=4),
                 _fmt(g["passes"], digits=1), _fmt(g["steps"], digits=0), _fmt(g["final_loss"], digits=3),
                 _fmt(g["knn_k20"], g["knn_k20_std"]),
                 _fmt(g["knn_k200"], g["knn_k200_std"]), _fmt(g["linear_top1"], g["linear_top1_std"]),
                 _fmt(g["frechet"], g["frechet_std"], digits=2), _sci(g["kid"]), _sci(g["vdna"]), str(g["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: list[dict], path: Path, metric: str = "knn", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = _metric_key(metric)
    lines: dict[tuple, list[dict]] = {}
    baselines = [g for g in groups if g["baseline"] and not math.isnan(g[key])]
    for g in groups:
        if not g["baseline"] and g["D"] is not None and not math.isnan(g["D"]) and not math.isnan(g[key]):
            lines.setdefault((g["method"], g["source"], g["downstream"]), []).append(g)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colors = {}
    several_sources = len({k[1] for k in lines}) > 1
    for (method, source, down), gs in sorted(lines.items()):
        gs = sorted(gs, key=lambda g: g["D"])
        name = f"{method} ({source}) → {down}" if several_sources else f"{method} → {down}"
        spread = [0.0 if math.isnan(g[key + "_std"]) else g[key + "_std"] for g in gs]
        bars = ax.errorbar([g["D"] for g in gs], [g[key] for g in gs], yerr=spread,
                           marker="o", capsize=3, label=name)
        colors.setdefault(down, bars.lines[0].get_color())
    for g in baselines:
        ax.axhline(g[key], linestyle="--", linewidth=1, color=colors.get(g["downstream"], "gray"),
                   label=f"{g['method']} → {g['downstream']}")
    ax.set_xscale("log")
    ds = sorted({g["D"] for gs in lines.values() for g in gs})
    if ds:
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(ds, [f"{d:.3g}" for d in ds])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("diversity D = N / C (log scale)")
    ax.set_ylabel(label)
    ax.set_title(title or "accuracy vs pretraining data diversity")
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _metric_key(metric: str) -> tuple[str, str]:
    return ("knn_k20", "kNN top-1 (k=20, T=0.07)") if metric == "knn" else ("linear_top1", "linear probe top-1")


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def gains(groups: list[dict], metric: str = "knn") -> list[dict]:
    """Per (method, source, downstream): accuracy (mean over seeds) at the smallest and the largest N, the gain
    between them, and the distances from the source to the downstream set measured with the largest-N encoder."""
    key, _ = _metric_key(metric)
    lines: dict[tuple, list[dict]] = {}
    for g in groups:
        if not g["baseline"] and g["N"] is not None and not _nan(g[key]):
            lines.setdefault((g["method"], g["source"], g["downstream"]), []).append(g)
    out = []
    for (method, source, down), gs in sorted(lines.items()):
        if len(gs) < 2:
            continue
        lo, hi = min(gs, key=lambda g: g["N"]), max(gs, key=lambda g: g["N"])
        out.append({"method": method, "source": source, "downstream": down, "N_small": lo["N"], "N_large": hi["N"],
                    "acc_small": lo[key], "acc_large": hi[key], "gain": hi[key] - lo[key],
                    **{d: hi[d] for d, _ in DISTANCES}})
    return out


def gains_markdown(rows: list[dict], metric: str = "knn") -> str:
    _, label = _metric_key(metric)
    lines = [f"| method | source | downstream | N small → large | {label} small → large | gain | Frechet | KID | "
             "VisualDNA |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['source']} | {r['downstream']} | {r['N_small']} → {r['N_large']} | "
                     f"{_fmt(r['acc_small'])} → {_fmt(r['acc_large'])} | {r['gain']:+.3f} | "
                     f"{_fmt(r['frechet'], digits=2)} | {_sci(r['kid'])} | {_sci(r['vdna'])} |")
    return "\n".join(lines)


def gain_plot(rows: list[dict], path: Path, metric: str = "knn", title: str = "") -> None:
    """Gain from the smallest to the largest N against the distance to the downstream set: one point per
    method x source x downstream, one panel per distance (those the sweep measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, label = _metric_key(metric)
    panels = [(d, name) for d, name in DISTANCES if any(not _nan(r[d]) for r in rows)] or [DISTANCES[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=120, squeeze=False)
    several = len({(r["method"], r["source"]) for r in rows}) > 1
    for ax, (d, name) in zip(axes[0], panels):
        for r in rows:
            if _nan(r[d]):
                continue
            ax.scatter([r[d]], [r["gain"]], s=36)
            text = f"{r['method']} ({r['source']}) → {r['downstream']}" if several else f"→ {r['downstream']}"
            ax.annotate(text, (r[d], r["gain"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.margins(x=0.3, y=0.15)  # room for the labels
        ax.set_xlabel(f"{name} (source vs downstream)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"gain in {label},\nsmallest to largest N")
    fig.suptitle(title or "accuracy gain from more unique samples vs distance", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gain_plot_skipped(rows: list[dict]) -> str | None:
    """Why gain_vs_distance.png is not drawn, or None: it compares downstream sets, so it needs gains on at least
    two of them with a distance measured (with one, each panel would hold one point per method and source)."""
    if not rows:
        return "no gains (a gain needs finished cells at 2 or more N)"
    measured = sorted({r["downstream"] for r in rows if any(not _nan(r[d]) for d, _ in DISTANCES)})
    if not measured:
        return "no distances were measured (evaluate.distance is false)"
    if len(measured) < 2:
        return (f"one downstream set ({measured[0]}): the plot compares the gains on several downstream sets at "
                "their distances, and needs at least 2")
    return None


def collect(sweep: Sweep, log=print) -> dict:
    """results.csv (one row per cell and downstream set), results.md (mean ± std over seeds, and the gain from
    the smallest to the largest N with the distances), diversity.png, gain_vs_distance.png."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    rows, missing = result_rows(sweep)
    for c in missing:
        log(f"[sweep] cell {c.index} {c.name}: not finished, left out")
    ensure_baselines(sweep, log)
    rows += baseline_rows(sweep)
    write_csv(rows, sweep.out / "results.csv")
    groups = grouped(rows)
    table = markdown(groups)
    gain_rows = gains(groups, sweep.metric)
    header = (f"{sweep.name}: budget C = {sweep.budget}, {len(sweep.cells) - len(missing)} of {len(sweep.cells)} "
              f"cells; accuracy mean ± std over seeds")
    gone = [f"- {r['cell']}: diverged ({r['reason'] or 'see its log'})" for r in rows if r.get("status") == "diverged"]
    if gone:
        table += "\n\nDiverged (no accuracy):\n" + "\n".join(gone)
    gain_text = (f"Gain from the smallest to the largest N (means over seeds) and the distances from the source to "
                 f"the downstream set (largest-N encoder):\n\n{gains_markdown(gain_rows, sweep.metric)}\n")
    skipped = gain_plot_skipped(gain_rows)
    if skipped:
        gain_text += f"\ngain_vs_distance.png is not drawn: {skipped}.\n"
    (sweep.out / "results.md").write_text(f"{header}\n\n{table}\n\n{gain_text}")
    title = f"{sweep.name}: budget C = {sweep.budget}"
    plot(groups, sweep.out / "diversity.png", sweep.metric, title=title)
    gain_path: Path | None = sweep.out / "gain_vs_distance.png"
    if skipped:
        gain_path.unlink(missing_ok=True)  # one from an earlier collect would describe other results
        log(f"[sweep] gain_vs_distance.png not drawn: {skipped}")
        gain_path = None
    else:
        gain_plot(gain_rows, gain_path, sweep.metric, title=title)
    return {"rows": rows, "groups": groups, "table": table, "gains": gain_rows, "missing": [c.name for c in missing],
            "csv": sweep.out / "results.csv", "markdown": sweep.out / "results.md", "plot": sweep.out / "diversity.png",
            "gain_plot": gain_path, "gain_plot_skipped": skipped}


# ----------------------------------------------------------------------------------------------------------
# Command line.


def describe(sweep: Sweep, config_arg: str, missing: dict[str, str] | None = None) -> str:
    """The dry run's listing: every cell, its status and its training command (which reads the cell's YAML:
    `dry_run` writes them). A cell reading one of the `missing` inputs is marked."""
    lines = [f"# sweep {sweep.name}: {len(sweep.cells)} cells ({len(sweep.methods)} methods x {len(sweep.sources)} "
             f"sources x {len(sweep.unique)} N x {len(sweep.seeds)} seeds), budget C = {sweep.budget}, "
             f"out {sweep.out}; the cells' settings are in {sweep.out / 'cells'}"]
    for c in sweep.cells:
        status = "done" if cell_done(sweep, c) else ("trained, to evaluate" if trained(c) else "to do")
        if status != "done" and set(cell_inputs(sweep, [c])) & set(missing or {}):
            status += ", input missing"
        lines.append(f"cell {c.index} {c.name} [{status}]: {shlex.join(train_command(sweep, c))}")
    gain = ", gain_vs_distance.png" if len(sweep.downstream) > 1 else ""
    lines.append(f"# then: evaluate on {', '.join(sweep.downstream) or 'nothing'}; collect into "
                 f"{sweep.out}/results.csv, results.md, diversity.png{gain}")
    return "\n".join(lines)


def dry_run(sweep: Sweep, config_arg: str) -> None:
    """List the cells and their commands, writing the cells' YAML files those commands read (and nothing else);
    warn about inputs that are not shard sets."""
    for c in sweep.cells:
        write_cell_config(sweep, c)
    missing = missing_inputs(sweep, unfinished(sweep))
    print(describe(sweep, config_arg, missing))
    for text in missing.values():
        print(f"warning: not a shard set: {text}", file=sys.stderr)
    if missing:
        print(f"warning: the cells marked 'input missing' would fail; a real run stops before training until "
              f"{'these inputs exist' if len(missing) > 1 else 'this input exists'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=tool_prog("python launch/sweep.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="sweep YAML (configs/sweeps/NAME.yaml)")
    p.add_argument("--out", type=Path, help="results folder (overrides the file's out)")
    p.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                   help="list the cells and their commands, write the cells' YAML files those commands read, warn "
                        "about inputs that are not shard sets, and start nothing (with --slurm: print the script; "
                        "default: off)")
    p.add_argument("--slurm", action=argparse.BooleanOptionalAction, default=False,
                   help="write OUT/sweep.sbatch and OUT/collect.sbatch (default: off)")
    p.add_argument("--cell", type=int, help="run one cell (train + evaluate) and exit")
    p.add_argument("--collect", action=argparse.BooleanOptionalAction, default=False,
                   help="only collect the finished cells (default: off)")
    a = p.parse_args(argv)
    return run_main("sweep", lambda: _run(a), log_folder=a.out, usage_errors=(SweepError,))


def _run(a: argparse.Namespace) -> int:
    sweep = load_sweep(a.config, a.out)
    if a.cell is not None:
        if not 0 <= a.cell < len(sweep.cells):
            raise SweepError(f"--cell {a.cell}: the sweep has cells 0..{len(sweep.cells) - 1}")
        cell = sweep.cells[a.cell]
        if not cell_done(sweep, cell):
            require_inputs(sweep, [cell])
        print(f"[sweep] cell {cell.index} {cell.name}: {run_cell(sweep, cell)}", flush=True)
        return 0
    if a.slurm:
        script = slurm_script(sweep, a.config)
        if a.dry_run:
            print(script)
            for text in missing_inputs(sweep, unfinished(sweep)).values():
                print(f"warning: not a shard set: {text}", file=sys.stderr)
            return 0
        require_inputs(sweep, unfinished(sweep))
        (sweep.out / "logs").mkdir(parents=True, exist_ok=True)  # SLURM needs it before the tasks start
        (sweep.out / "sweep.sbatch").write_text(script)
        (sweep.out / "collect.sbatch").write_text(collect_script(sweep, a.config))
        print(f"wrote {sweep.out / 'sweep.sbatch'} and {sweep.out / 'collect.sbatch'}; submit with\n"
              f"  jid=$(sbatch --parsable {sweep.out / 'sweep.sbatch'}) && "
              f"sbatch --dependency=afterany:$jid {sweep.out / 'collect.sbatch'}")
        return 0
    if a.dry_run:
        dry_run(sweep, a.config)
        return 0
    failed = 0 if a.collect else run_local(sweep, a.config)
    result = collect(sweep)
    print()
    print(result["table"])
    outputs = [result[k] for k in ("csv", "markdown", "plot", "gain_plot") if result[k]]
    print(f"\n[sweep] {', '.join(map(str, outputs))}")
    return 1 if failed or result["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
