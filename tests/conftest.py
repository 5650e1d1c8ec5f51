"""Shared fixtures: small generated image sets packed into shard sets, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from shard_tools.pack import pack
from shard_tools.synth import synthesize
from tests.helpers import faults
from tests.helpers.faults import fault_row  # noqa: F401  (the fault suite's fixture, for every test module)

# Property tests draw the same examples on every run, so CI cannot pass once and fail the next time on the
# same code; HYPOTHESIS_PROFILE=explore searches with fresh random examples (PLAN_EXAMPLES=1000 for more).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SLOW_KINDS = ("s3", "emulator", "multiprocess", "dali", "faults")


def pytest_collection_modifyitems(items):
    """Every test of a slow kind (S3 server, GCS/Azure emulators, several processes, DALI, fault scenarios) is
    also `slow`: `pytest -m "not slow"` is the quick loop."""
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    faults.collect(report)


def pytest_terminal_summary(terminalreporter):
    faults.summary(terminalreporter)


@pytest.fixture(scope="session")
def make_shard_set(tmp_path_factory):
    """make_shard_set(samples, shard_size=..., domain=..., seed=..., size=...) -> folder of a packed shard set.

    Results are cached per argument tuple, so several tests can share one set."""
    cache: dict[tuple, Path] = {}

    def make(samples: int, shard_size: int = 100, domain: str = "a", seed: int = 0, size: int = 32,
             classes: int = 10) -> Path:
        key = (samples, shard_size, domain, seed, size, classes)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"set{samples}_{domain}{seed}")
            manifest = synthesize(root / "images", samples, classes=classes, size=size, domain=domain, seed=seed)
            out = root / "shards"
            pack(manifest, out, name="set", shard_size=shard_size, seed=seed)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server on loopback for the tests of one module (stream_ssl/testing/servers.py)."""
    from stream_ssl.testing.servers import MotoServer

    server = MotoServer()
    yield server
    server.close()
