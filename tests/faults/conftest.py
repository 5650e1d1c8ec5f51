"""Fixtures of the fault suite: the small shard set every scenario uses and the clean local run it is compared
with (helpers in tests/helpers/fault_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.fault_runs import SET, Trained, train


@pytest.fixture(scope="session")
def pool(make_shard_set) -> Path:
    return make_shard_set(**SET)


@pytest.fixture(scope="session")
def local_run(pool, tmp_path_factory) -> Trained:
    """The reference: a clean run on local disk (1 process, no loader workers)."""
    run = train(pool, tmp_path_factory.mktemp("local") / "run", num_workers=0)
    assert run.returncode == 0, run.stderr[-3000:]
    return run
