"""Training metrics of a run: OUT/metrics.csv and the experiment trackers (Accelerate's: TensorBoard in OUT/tb,
W&B, MLflow, ...), the loop's meter, the keys log."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

PROJECT = "stream-ssl"  # the trackers' project / experiment name; a run is named after its folder


class MetricsLog:
    """metrics.csv on the main process, and the same rows (as `train/NAME`) to the experiment trackers the
    Accelerator was made with. On resume, rows after the resume step (written by a run that died before its next
    checkpoint) are dropped, so the file reads as one clean run; TensorBoard purges them the same way."""

    FIXED = ("step", "samples", "loss", "lr", "weight_decay", "samples_per_s", "data_wait", "skipped")

    def __init__(self, out: Path, start_step: int, acc=None, config: dict | None = None):
        self.path = out / "metrics.csv"
        self.header: list[str] | None = None
        rows: list[list[str]] = []
        if start_step > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                lines = list(csv.reader(f))
            if lines:
                self.header = lines[0]
                rows = [r for r in lines[1:] if r and int(r[0]) <= start_step]
        tmp = self.path.with_name("metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            if self.header:
                w.writerow(self.header)
                w.writerows(rows)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="", buffering=1)
        self.writer = csv.writer(self.file)
        self.acc = acc if acc is not None and acc.log_with else None
        if self.acc is not None:
            start_trackers(self.acc, out, start_step, config or {})

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.header is None:
            extra = sorted(k for k in values if k not in self.FIXED)
            self.header = list(self.FIXED) + extra
            self.writer.writerow(self.header)
        row = [step] + [_fmt(values.get(k, "")) for k in self.header[1:]]
        self.writer.writerow(row)
        if self.acc is not None:
            self.acc.log({f"train/{k}": v for k, v in values.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}, step=step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.acc is not None:
            self.acc.log({name: value}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.acc is not None:  # not acc.end_training(): that also ends the process group
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers.clear()


def start_trackers(acc, out: Path, start_step: int, config: dict) -> None:
    """Accelerate's trackers for this run: the settings as its configuration (nested values as JSON text, which
    every tracker takes), the run named after its folder, TensorBoard purging what a resumed run redoes."""
    flat = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}
    kwargs = {"tensorboard": {"purge_step": start_step + 1} if start_step else {},
              "wandb": {"name": out.name, "dir": str(out)}, "mlflow": {"run_name": out.name}}
    acc.init_trackers(PROJECT, config=flat, init_kwargs=kwargs)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class Meter:
    """What the training loop accumulates between metric rows, and over the whole run.

    Per micro-batch: `add_batch` (samples, loader wait, skips, storage counters of this process) and
    `add_result` (the method's loss and extra scalars, kept on the device until a row is due). `row` reduces
    the window over processes (one all_reduce) into the values of a metrics row and starts a new window.

    The run-long figures (the rows' losses, training time, waits, skips, storage counters, kNN results, the
    segments the run was trained in) and the open window travel in every checkpoint (`state_dict`), so a run
    resumed any number of times is described as a whole, and its rows equal a straight run's."""

    # storage counters of this process's reads (fetch.ReadStats), per row and over the run
    IO = ("bytes_read", "requests", "retries", "cut", "throttled", "cache_hits", "cache_bytes", "index_fetches",
          "ttfb_seconds")

    def __init__(self, world_size: int, global_batch: int, start_step: int = 0):
        self.world_size, self.global_batch = world_size, global_batch
        self.t_start = self.t_last = time.perf_counter()
        self.losses: list = []
        self.extra: dict[str, list] = {}
        self.seen, self.wait, self.wait_total, self.skipped = 0, 0.0, 0.0, 0
        self.io = dict.fromkeys(self.IO, 0)  # since the last row
        self.io_total = dict.fromkeys(self.IO, 0)
        self.logged: list[tuple[int, float]] = []
        self.last_finite: dict | None = None  # {step, loss, lr} of the last row with a finite loss
        self.skipped_steps = 0  # optimizer steps the fp16 gradient scaler skipped
        self.knn: list[dict] = []  # the kNN monitor's results
        self.collapse: dict | None = None  # {step, embed_std, limit} of the collapse warning, once given
        self.last_row: dict = {}
        self.earlier_seconds = 0.0  # training time of the segments before this one (up to their checkpoints)
        self.segments: list[dict] = []  # earlier segments: {start_step, end_step, seconds, ended}
        self.segment_start = start_step

    @property
    def seconds(self) -> float:
        """Training time of the run so far: earlier segments (up to the checkpoint each resumed from) and this one."""
        return self.earlier_seconds + time.perf_counter() - self.t_start

    def run_segments(self, end_step: int, ended: str) -> list[dict]:
        """Every segment of the run, this one ending at `end_step` as `ended` says."""
        now = {"start_step": self.segment_start, "end_step": end_step,
               "seconds": round(time.perf_counter() - self.t_start, 3), "ended": ended}
        return [*self.segments, now]

    def state_dict(self, step: int) -> dict:
        """What a checkpoint at `step` keeps of this process's meter (plain numbers: loads with weights_only)."""
        return {"window": {"losses": [float(v) for v in self.losses],
                           "extra": {k: [float(v) for v in vs] for k, vs in self.extra.items()},
                           "seen": self.seen, "wait": self.wait, "io": dict(self.io)},
                "logged": [list(x) for x in self.logged], "wait_total": self.wait_total, "skipped": self.skipped,
                "skipped_steps": self.skipped_steps, "io_total": dict(self.io_total), "knn": self.knn,
                "collapse": self.collapse, "last_row": self.last_row, "last_finite": self.last_finite,
                "seconds": self.seconds, "segments": self.run_segments(step, "checkpoint")}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Continue the run a checkpoint describes: its figures, and its open window (with the same processes)."""
        import torch

        window = state["window"]
        self.losses = [torch.tensor(v, device=device) for v in window["losses"]]
        self.extra = {k: [torch.tensor(v, device=device) for v in vs] for k, vs in window["extra"].items()}
        self.seen, self.wait, self.io = window["seen"], window["wait"], dict(window["io"])
        self.logged = [(int(s), v) for s, v in state["logged"]]
        self.wait_total, self.skipped = state["wait_total"], state["skipped"]
        self.skipped_steps, self.io_total = state["skipped_steps"], dict(state["io_total"])
        self.knn, self.collapse, self.last_row = list(state["knn"]), state["collapse"], state["last_row"]
        self.last_finite, self.earlier_seconds = state["last_finite"], state["seconds"]
        self.segments = list(state["segments"])

    def add_batch(self, batch, waited: float) -> None:
        self.wait += waited
        self.wait_total += waited
        self.seen += len(batch.keys)
        self.skipped += batch.skipped
        for name in self.IO:
            value = batch.io.get(name, 0)
            self.io[name] += value
            self.io_total[name] += value

    def add_result(self, result: dict) -> None:
        for k, v in result.items():
            (self.losses if k == "loss" else self.extra.setdefault(k, [])).append(v.detach().float().reshape(()))

    def row(self, acc, step: int, info: dict) -> dict:
        """Mean of the window over steps and processes, with rates; resets the window."""
        import torch

        keys = sorted(self.extra)
        vec = torch.stack([torch.stack(self.losses).mean()] + [torch.stack(self.extra[k]).mean() for k in keys])
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="mean")
        vals = vec.tolist()
        now = time.perf_counter()
        span = max(now - self.t_last, 1e-9)
        values = {"loss": vals[0], **dict(zip(keys, vals[1:])), **info}
        values.update(samples=step * self.global_batch, samples_per_s=self.seen * self.world_size / span,
                      data_wait=self.wait / span, skipped=self.skipped, skipped_steps=self.skipped_steps,
                      **storage_figures(self.io, span))
        self.losses, self.extra, self.t_last, self.wait, self.seen = [], {}, now, 0.0, 0
        self.io = dict.fromkeys(self.IO, 0)
        self.logged.append((step, values["loss"]))
        return values


def storage_figures(io: dict, seconds: float) -> dict:
    """What a metrics row or the summary says of storage: bytes, requests, retries, cut responses, throttling,
    cache hits, .idx fetches, the mean time to first byte (ms) and the read rate (MB/s) of this process."""
    out = {k: v for k, v in io.items() if k != "ttfb_seconds"}
    out["ttfb_ms"] = 1e3 * io["ttfb_seconds"] / io["requests"] if io["requests"] else 0.0
    out["read_MBps"] = io["bytes_read"] / max(seconds, 1e-9) / 1e6
    return out


class KeysLog:
    """OUT/keys/rank-R.txt: `STEP KEY` per sample this rank trained on. On resume, what a killed run logged
    after its last checkpoint is dropped, so the file reads as one run."""

    def __init__(self, out: Path, rank: int, start_step: int):
        folder = out / "keys"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank-{rank}.txt"
        kept = []
        if start_step and path.exists():
            with open(path) as f:
                kept = [line for line in f if int(line.split(" ", 1)[0]) < start_step]
        self.file = open(path, "w", buffering=1)
        self.file.writelines(kept)

    def write(self, batch) -> None:
        self.file.writelines(f"{batch.step} {key}\n" for key in batch.keys)

    def close(self) -> None:
        self.file.close()


def progress_bar(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0)
