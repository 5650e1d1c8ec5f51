"""Helpers shared by the test modules: `from tests.helpers.NAME import ...` everywhere.

images (photo-like JPEGs, corrupt copies), packing (manifests, tars, CLI runs of the shard tools), plans (fake
shard sets for plan properties), runs (evaluation run folders), trainer (tiny method settings, subprocess
runners), crawl_server (loopback image server for img2dataset), trainer_driver (a module run under `accelerate
launch -m`), and for the fault suite: faults (its table), fault_runs (training runs, keys, a small tmpfs),
fault_driver (train.py with faults injected). What the benchmarks and demos share with the tests (the S3 server
and fault proxy, the GCS and Azure emulators, a fake S3 listing, near-duplicate images) is stream_ssl.testing."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
