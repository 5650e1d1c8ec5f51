"""Local files (`/path`, `file://`, `local://`): the reader maps or preads them itself; listing is `os.scandir`."""

from __future__ import annotations

import os

from shard_tools.protocols.base import Protocol


def list_files(fs, path: str, visit) -> None:
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file():
                visit(entry.name, entry.stat().st_size)


LOCAL = Protocol(name="file", schemes=("file", "local"), list=list_files, local=True)
