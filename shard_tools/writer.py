"""Write samples into WebDataset tar shards with DALI `.idx` files; publish `index.json` last.

Every file is written under a temporary name and renamed when complete, so a crash never leaves a
partial shard or index that looks finished. Tar headers carry no time, user or host, so the same
samples always give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from shard_tools.shardset import FORMAT, VERSION, ShardInfo, format_idx, idx_name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_shard(samples: list[tuple[str, dict[str, bytes]]]) -> tuple[bytes, str]:
    """Tar bytes and `.idx` text for `samples`, a list of (key, {ext: bytes}) in write order."""
    buf = io.BytesIO()
    index = []
    # USTAR format only: a name that does not fit raises instead of silently adding a pax header,
    # which keeps every member's data exactly 512 bytes after its header.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            members = []
            for ext, data in fields.items():
                name = f"{key}.{ext}"
                header_at = buf.tell()
                tar.addfile(_member(name, len(data)), io.BytesIO(data))
                members.append((ext, header_at + 512, len(data), name))
            index.append(members)
    return buf.getvalue(), format_idx(index)


class ShardWriter:
    """Collects samples and writes `NAME-%06d.tar` (+ `.idx`) every `shard_size` samples."""

    def __init__(self, out: Path, name: str, shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.out, self.name, self.shard_size = Path(out), name, shard_size
        self.out.mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._pending: list[tuple[str, dict[str, bytes]]] = []

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        self._pending.append((key, fields))
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        tar_name = f"{self.name}-{len(self.shards):06d}.tar"
        data, idx = build_shard(self._pending)
        atomic_write_bytes(self.out / idx_name(tar_name), idx.encode())
        atomic_write_bytes(self.out / tar_name, data)
        self.shards.append(ShardInfo(tar_name, len(self._pending), len(data), hashlib.sha256(data).hexdigest()))
        self._pending = []

    def finish(self, **meta) -> dict:
        """Write the last shard, then `index.json`: the step that makes the folder a shard set."""
        self.flush()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "num_samples": sum(s.samples for s in self.shards),
            **meta,
            "shards": [vars(s) for s in self.shards],
        }
        atomic_write_bytes(self.out / "index.json", (json.dumps(index, indent=1) + "\n").encode())
        return index
