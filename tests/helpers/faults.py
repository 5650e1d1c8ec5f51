"""The fault suite's table (`make faults`): every scenario records one row, printed one line per scenario at the
end of the pytest run, and written as a markdown table when FAULT_TABLE names a file.

    def test_x(fault_row):
        ...
        fault_row("s3: every connection cut after 24 KB", lost=0, duplicated=0, keys=480, cuts=57)

A row passes only when its test passes, and `fault_row` itself fails the test when anything was lost or
duplicated. Rows travel in the test report (`user_properties`), so they reach the table under pytest-xdist too.
Tests marked `faults` that fail before recording a row appear under their test name.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

PROPERTY = "fault_row"
_rows: list[dict] = []


@pytest.fixture
def fault_row(request):
    def record(scenario: str, lost: int, duplicated: int, **numbers) -> None:
        row = {"scenario": scenario, "lost": int(lost), "duplicated": int(duplicated), "numbers": numbers}
        request.node.user_properties.append((PROPERTY, json.dumps(row)))
        assert lost == 0 and duplicated == 0, f"{scenario}: {lost} samples lost, {duplicated} duplicated"

    return record


def lost_and_duplicated(got: list, want: list) -> tuple[int, int]:
    """Samples of `want` missing from `got`, and samples `got` holds more often than `want` (multisets)."""
    have, need = Counter(got), Counter(want)
    return sum((need - have).values()), sum((have - need).values())


def collect(report) -> None:
    """pytest_runtest_logreport: keep the rows of a finished test, or a bare row for a failed fault test."""
    if report.when != "call" and not (report.failed and "faults" in report.keywords):
        return
    rows = [json.loads(v) for k, v in report.user_properties if k == PROPERTY]
    if not rows and "faults" in report.keywords and (report.failed or report.when == "call"):
        rows = [{"scenario": report.nodeid.split("::")[-1], "lost": None, "duplicated": None, "numbers": {}}]
    for row in rows:
        row["outcome"] = "PASS" if report.passed else "FAIL"
        row["seconds"] = round(report.duration, 1)
        _rows.append(row)


def _numbers(row: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in row["numbers"].items())


def line(row: dict) -> str:
    counts = "lost ?, duplicated ?" if row["lost"] is None else f"lost {row['lost']}, duplicated {row['duplicated']}"
    return f"{row['outcome']}  {row['scenario']}: {counts}; {_numbers(row)} ({row['seconds']} s)"


def markdown(rows: list[dict]) -> str:
    out = ["| scenario | outcome | samples lost | duplicated | the numbers | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['outcome'].lower()} | {r['lost']} | {r['duplicated']} | {_numbers(r)} | "
                   f"{r['seconds']} |")
    return "\n".join(out) + "\n"


def summary(terminalreporter) -> None:
    """pytest_terminal_summary: one line per scenario, sorted by name."""
    if not _rows:
        return
    rows = sorted(_rows, key=lambda r: r["scenario"])
    terminalreporter.section(f"fault scenarios: {sum(r['outcome'] == 'PASS' for r in rows)} of {len(rows)} pass")
    for row in rows:
        terminalreporter.write_line(line(row))
    if os.environ.get("FAULT_TABLE"):
        Path(os.environ["FAULT_TABLE"]).write_text(markdown(rows))
        terminalreporter.write_line(f"table: {os.environ['FAULT_TABLE']}")
