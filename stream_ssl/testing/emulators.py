"""Local emulators of the object stores other than S3, as subprocesses on 127.0.0.1: Google Cloud Storage
(`gcp-storage-emulator`, a Python package of the test extras) and Azure Blob Storage (Azurite, the npm package
`azurite` that `make test` installs under .venv-node/). Each stands where stream_ssl/testing/servers.py's MotoServer
stands for S3: `port`, `endpoint`, `options(endpoint)` (per-protocol storage options that point a client at it,
or at a proxy in front of it), `create_bucket(name)` and `close()`. One that cannot start raises
EmulatorMissing, whose message says why (the tests skip with it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stream_ssl.testing.servers import free_port, stop_server, wait_for_port

REPO = Path(__file__).resolve().parents[2]
# Azurite's well-known development account (its README): public, accepted by every Azurite.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class EmulatorMissing(RuntimeError):
    """An emulator that is not installed or did not start."""


class Emulator:
    """A server subprocess on a free loopback port; its output goes to a file (never an unread pipe)."""

    scheme = ""

    def _start(self, command: list[str], env: dict | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([c.format(port=self.port) for c in command], stdout=self.log, stderr=self.log,
                                     env=env)
        try:
            wait_for_port(self.port, self.proc)
        except (RuntimeError, TimeoutError) as e:
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self.close()
            raise EmulatorMissing(f"{command[0]} did not start ({e}): {tail[0][:200]}") from None

    def options(self, endpoint: str | None = None) -> dict:
        raise NotImplementedError

    def create_bucket(self, name: str) -> None:
        from shard_tools.storage import filesystem

        filesystem(f"{self.scheme}://{name}", self.options()).mkdir(name)

    def close(self) -> None:
        stop_server(self.proc, self.log)


class GcsEmulator(Emulator):
    """gcp-storage-emulator, in memory; gcsfs reaches it with `endpoint_url` and no credentials."""

    scheme = "gs"

    def __init__(self):
        binary = Path(sys.executable).with_name("gcp-storage-emulator")
        if not binary.exists():
            raise EmulatorMissing(f"{binary} not found: install the test extras (pip install -e '.[test]')")
        env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
        self._start([str(binary), "start", "--host", "127.0.0.1", "--port", "{port}", "--in-memory", "--quiet"], env)

    def options(self, endpoint: str | None = None) -> dict:
        return {"gs": {"endpoint_url": endpoint or self.endpoint, "token": "anon", "project": "test"}}


def azurite_binary() -> str | None:
    """`azurite-blob`: $AZURITE_BLOB, .venv-node/ (`make test` installs it there), or on PATH."""
    for candidate in (os.environ.get("AZURITE_BLOB"), REPO / ".venv-node" / "node_modules" / ".bin" / "azurite-blob"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return shutil.which("azurite-blob")


class Azurite(Emulator):
    """Azurite's blob service, in memory, with its development account; adlfs reaches it by connection string."""

    scheme = "az"

    def __init__(self):
        binary = azurite_binary()
        if binary is None or shutil.which("node") is None:
            raise EmulatorMissing("azurite-blob (npm package azurite) or node not found: `make test` installs it "
                                  "under .venv-node/ (npm install --prefix .venv-node azurite)")
        # --skipApiVersionCheck: the Python client may speak a newer API version than this Azurite knows.
        self._start([binary, "--blobHost", "127.0.0.1", "--blobPort", "{port}", "--inMemoryPersistence", "--silent",
                     "--disableTelemetry", "--skipApiVersionCheck"])

    def options(self, endpoint: str | None = None, key: str = AZURITE_KEY) -> dict:
        return {"az": {"connection_string": f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                                            f"AccountKey={key};BlobEndpoint={endpoint or self.endpoint}/"
                                            f"{AZURITE_ACCOUNT};"}}


EMULATORS = {"gs": GcsEmulator, "az": Azurite}
