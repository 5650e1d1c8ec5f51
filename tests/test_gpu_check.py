"""benchmarks/gpu_check.py in its CPU mode (what CI can run): every section's code path on tiny settings, the
CUDA-only measurements named as skipped, one table written, exit status 0 only when every check passed."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PYTHON, REPO
from tests.helpers.trainer import child_env

pytestmark = pytest.mark.multiprocess


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([PYTHON, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = out.read_text()
    assert "CPU (CUDA parts skipped)" in table and table in proc.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    checks = {r["check"]: r for r in rows}
    assert checks["ceiling: synthetic input, bf16, channels-last"]["steps_per_s"] > 0
    loaders = [r for r in rows if r["check"].startswith("loader")]
    assert {r["check"].split(",")[0] for r in loaders} == {"loader --decoder pil", "loader --decoder nvjpeg"}
    assert all(r["steps_per_s"] > 0 and "ratio" in r for r in loaders)
    methods = [r for r in rows if r["check"].startswith("method")]
    assert len(methods) == 7 and all(r["ok"] and r["relative"] <= 5e-2 for r in methods)
    assert any(r["check"].startswith("augment.py: (b) ours") for r in rows)
