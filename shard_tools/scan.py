"""Read a tar shard once: its `.idx` view, size and sha256, and optionally check every member it holds."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

from shard_tools.images import ImageError, check_image
from shard_tools.shardset import IMAGE_EXTS, TAR_BLOCK, check_tar_end, group_members, scan_tar


@dataclass
class ShardScan:
    samples: list[list[tuple[str, int, int, str]]]
    size: int
    sha256: str | None
    bad_members: list[str] = field(default_factory=list)  # "member: reason" found by the decode check


class _Hashing(io.RawIOBase):
    def __init__(self, f, checksum: bool):
        self.f = f
        self.hash = hashlib.sha256() if checksum else None
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        if self.hash is not None:
            self.hash.update(data)
        self.count += len(data)
        b[: len(data)] = data
        return len(data)


def check_member(ext: str, data: bytes) -> str | None:
    """A reason when a member's content is not what its extension promises, else None."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        try:
            check_image(data, max_pixels=1 << 62, decode=True)
        except ImageError as e:
            return str(e)
    elif ext == "json":
        try:
            json.loads(data)
        except ValueError as e:
            return f"invalid json ({e})"
    elif ext == "cls":
        try:
            int(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return f"label is not an integer: {data[:20]!r}"
    return None


def scan_shard(f, where: str = "tar", checksum: bool = True, decode: bool = False) -> ShardScan:
    """Scan an open binary file holding a tar archive. Raises ValueError when it is not a whole tar."""
    if not checksum and not decode and f.seekable():
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        return ShardScan(scan_tar(f, size, where), size, None)
    hashing = _Hashing(f, checksum)
    stream = io.BufferedReader(hashing, 1 << 20)
    members, bad = [], []
    end = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                end = m.offset_data + (-(-m.size // TAR_BLOCK) * TAR_BLOCK if m.isreg() else 0)
                if not m.isreg():
                    continue
                members.append((m.name, m.offset_data, m.size))
                if decode:
                    ext = m.name.rsplit("/", 1)[-1].partition(".")[2]
                    data = tar.extractfile(m).read()
                    if len(data) != m.size:
                        raise ValueError(f"{where}: truncated in member {m.name}")
                    reason = check_member(ext, data)
                    if reason:
                        bad.append(f"{m.name}: {reason}")
    except tarfile.TarError as e:
        raise ValueError(f"{where}: not a readable tar archive ({e})") from None
    while stream.read(1 << 20):
        pass
    size = hashing.count
    check_tar_end(members, end, size, where)
    return ShardScan(group_members(members, where), size, hashing.hash.hexdigest() if checksum else None, bad)
