"""docs/python-api.md's examples, run as they are written there (each block starting `# example: NAME.py`), on a
small labeled shard set in `shards/labeled`."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import PYTHON, REPO
from tests.helpers.trainer import accelerate_cmd, child_env

pytestmark = pytest.mark.multiprocess

BLOCK = re.compile(r"```python\n# example: (\S+)\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    return dict(BLOCK.findall((REPO / "docs" / "python-api.md").read_text()))


@pytest.fixture(scope="module")
def folder(make_shard_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    (root / "shards").mkdir()
    (root / "shards" / "labeled").symlink_to(make_shard_set(160, shard_size=40))
    for name, code in examples().items():
        (root / name).write_text(code)
    return root


def run(folder, cmd: list, timeout: float = 300) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=folder, env=child_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_the_docs_have_the_four_examples():
    assert sorted(examples()) == ["accelerate_loop.py", "lightning_module.py", "resume.py", "supervised.py"]


def test_supervised(folder):
    # 160 images twice, in steps of 32
    assert "10 steps of 32; 2 passes over 160 images; last loss" in run(folder, [PYTHON, "supervised.py"])


def test_resume(folder):
    # 80 images 4 times in steps of 16 = 20 batches; 5 were consumed before the checkpoint
    assert "continued at batch 5; 15 batches left" in run(folder, [PYTHON, "resume.py"])


def test_accelerate_on_two_processes(folder):
    out = run(folder, [*accelerate_cmd("accelerate_loop.py", 2)])
    assert sorted(line.split(":")[0] for line in out.splitlines() if line.startswith("process")) == \
        ["process 0 of 2", "process 1 of 2"]
    assert "10 batches of 16" in out  # 320 samples / (2 processes x 16)


def test_lightning(folder):
    pytest.importorskip("lightning", reason="lightning is a test extra (pip install -e '.[test]')")
    assert "trained 10 steps" in run(folder, [PYTHON, "lightning_module.py"])
