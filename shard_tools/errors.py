"""What the shard tools share: whole-run failures, the errors CSV, result totals and CLI argument types."""

from __future__ import annotations

import argparse
import csv
import io
import re


class ToolError(Exception):
    """A tool failed as a whole, with a one-line reason. Library callers catch it (or `Exception`); a command's
    `main` prints `error: REASON` and exits 1 (see shard_tools/cli.py: run_main)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def shard_set_name(out: str, name: str | None, error: type[ToolError] = ToolError) -> str:
    """`name`, or by default the last part of the output folder `out`; raises `error` unless it is made of
    letters, digits, '_', '-' and '.' (it starts every shard's file name)."""
    name = name or str(out).rstrip("/").rsplit("/", 1)[-1]
    if not name or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        raise error(f"--name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


class ShardSetTotals:
    """For result dataclasses holding the written `index` (index.json as a dict)."""

    index: dict

    @property
    def shards(self) -> int:
        return len(self.index.get("shards", []))

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.index.get("shards", []))


Error = tuple[int, str, str]  # (manifest row, path or url, reason): "kind" or "kind (detail)"


def error_kind(reason: str) -> str:
    return reason.split(" (")[0]


def count_by_kind(errors: list[Error]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, reason in errors:
        counts[error_kind(reason)] = counts.get(error_kind(reason), 0) + 1
    return dict(sorted(counts.items()))


def write_errors(output, name: str, errors: list[Error], column: str = "path") -> None:
    """`NAME-errors.csv` (row, `column`, reason), sorted by row; removed when there are no errors.
    `output` is a shard_tools.storage.Output."""
    target = f"{name}-errors.csv"
    if not errors:
        output.remove(target)
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", column, "reason"])
    w.writerows(sorted(errors))
    output.write_bytes(target, buf.getvalue().encode())


def remove_partial_shards(output, name: str, keep: int) -> None:
    """Remove leftovers of an interrupted run: temporary files, and shards numbered `keep` or more."""
    pattern = re.compile(rf"^{re.escape(name)}-(\d{{6}})\.(tar|idx)(\.tmp)?$")
    for entry in output.list():
        m = pattern.match(entry)
        if m and (m.group(3) or int(m.group(1)) >= keep):
            output.remove(entry)
        elif entry in ("index.json.tmp", f"{name}-errors.csv.tmp"):
            output.remove(entry)


def read_errors(output, name: str) -> list[Error]:
    """The rows of `NAME-errors.csv` written by `write_errors` (empty when there is none)."""
    data = output.read_bytes(f"{name}-errors.csv")
    if not data:
        return []
    return [(int(a), b, c) for a, b, c in list(csv.reader(io.StringIO(data.decode())))[1:]]


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v
