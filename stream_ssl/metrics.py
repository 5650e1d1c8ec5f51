"""Training metrics of a run: OUT/metrics.csv, and TensorBoard events in OUT/tb when asked."""

from __future__ import annotations

import csv
import os
from pathlib import Path


class MetricsLog:
    """metrics.csv (+ TensorBoard events) on the main process. On resume, rows after the resume step (written
    by a run that died before its next checkpoint) are dropped, so the file reads as one clean run."""

    FIXED = ("step", "samples", "loss", "lr", "weight_decay", "samples_per_s", "data_wait", "skipped")

    def __init__(self, out: Path, start_step: int, tensorboard: bool):
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
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:  # tensorboard not installed: CSV only
                self.tb = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.header is None:
            extra = sorted(k for k in values if k not in self.FIXED)
            self.header = list(self.FIXED) + extra
            self.writer.writerow(self.header)
        row = [step] + [_fmt(values.get(k, "")) for k in self.header[1:]]
        self.writer.writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
