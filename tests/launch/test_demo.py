"""`make demo` end to end at toy size: data, the sweep, the printed table, the plot."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import PYTHON, REPO
from tests.helpers.runs import TINY_BACKBONE
from tests.helpers.trainer import child_env

pytestmark = pytest.mark.multiprocess


def test_demo_prints_the_study_table_and_writes_the_plot(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([PYTHON, str(REPO / "launch" / "demo.py"), "--out", str(out), "--pool", "200",
                           "--down-train", "100", "--down-test", "100", "--budget", "96", "--unique", "25%,100%",
                           "--backbone", TINY_BACKBONE, "--backbone-options", "{}", "--batch-size", "16",
                           "--workers", "0"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| downstream |"):]
    rows = [ln for ln in table.splitlines() if ln.startswith("| a ") or ln.startswith("| b (shifted) ")]
    assert len(rows) == 6  # (N = 50, N = 200, untrained) x (a, b)
    assert sum("| 50 | 0.5208 | 1.9 | 6 |" in r for r in rows) == 2  # N, D = 50/96, passes, steps
    assert sum("random init" in r for r in rows) == 2
    assert (out / "results.md").read_text().strip() in proc.stdout
    assert (out / "sweep" / "diversity.png").stat().st_size > 5000
    assert (out / "sweep" / "results.csv").read_text().count("\n") == 1 + 6
