"""The shard-set contract shared by `shard_tools` (writer) and `stream_ssl` (reader).

A shard set is a folder with `NAME-000000.tar` shards, one DALI-style `.idx` per shard (wds2idx v1.2)
and `index.json`, which is written last: a folder without it is not a shard set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec
import numpy as np

FORMAT = "stream-ssl-shards"
VERSION = 1
IDX_VERSION = "v1.2"
TAR_BLOCK = 512
# Members the reader will ever decode. Anything else (notably .pyd/.pickle) is ignored, never unpickled.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAFE_EXTS = IMAGE_EXTS + ("cls", "json", "txt")


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the shard-set folder
    samples: int
    bytes: int
    sha256: str = ""


@dataclass(frozen=True)
class ShardSet:
    url: str  # folder URL: local path, s3://..., http(s)://...
    name: str
    source: str
    num_samples: int
    shards: tuple[ShardInfo, ...]
    labels: tuple[str, ...]
    meta: dict

    def shard_url(self, i: int) -> str:
        return join_url(self.url, self.shards[i].path)

    def idx_url(self, i: int) -> str:
        return join_url(self.url, idx_name(self.shards[i].path))


def join_url(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def idx_name(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + ".idx" if tar_path.endswith(".tar") else tar_path + ".idx"


def load_shard_set(url: str, storage_options: dict | None = None) -> ShardSet:
    """Read and check `index.json` of the shard set at `url`."""
    index_url = join_url(url, "index.json")
    try:
        with fsspec.open(index_url, "r", **(storage_options or {})) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{url}: not a shard set (no index.json). Pack a manifest with shard_tools/pack.py, "
            "or index existing tars with shard_tools/index.py"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_url}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{index_url}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        shards = tuple(
            ShardInfo(path=s["path"], samples=int(s["samples"]), bytes=int(s["bytes"]), sha256=s.get("sha256", ""))
            for s in meta["shards"]
        )
        total = int(meta["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{index_url}: malformed shard list or num_samples ({e!r})") from None
    if sum(s.samples for s in shards) != total:
        raise ValueError(f"{index_url}: num_samples={total} but shards hold {sum(s.samples for s in shards)}")
    return ShardSet(
        url=url.rstrip("/"),
        name=str(meta.get("name", "")),
        source=str(meta.get("source", "")),
        num_samples=total,
        shards=shards,
        labels=tuple(meta.get("labels", {}).get("names", []) or []),
        meta=meta,
    )


def format_idx(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """wds2idx v1.2 text: a header line, then one line per sample of `ext data_offset size member_name`."""
    lines = [f"{IDX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members))
    return "\n".join(lines) + "\n"


def parse_idx(text: str, where: str = ".idx") -> list[list[tuple[str, int, int, str]]]:
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{where}: empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] != IDX_VERSION:
        raise ValueError(f"{where}: first line must be '{IDX_VERSION} <count>', got {lines[0]!r}")
    count = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise ValueError(f"{where}: header says {count} samples, found {len(body)} lines")
    samples = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{where}:{n}: expected groups of 'ext offset size name'")
        samples.append(
            [(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)]
        )
    return samples


def sample_boundaries(samples: list[list[tuple[str, int, int, str]]]) -> np.ndarray:
    """Byte offsets where each sample's tar records start, plus the end of the last sample (n + 1 values).

    A sample starts right after the previous one ends (the data end rounded up to a 512-byte block), so any
    extended headers (pax, GNU long names) in front of its members belong to it. The first starts at 0.
    """
    bounds = np.zeros(len(samples) + 1, dtype=np.int64)
    for i, members in enumerate(samples):
        end = max(offset + size for _, offset, size, _ in members)
        bounds[i + 1] = -(-end // TAR_BLOCK) * TAR_BLOCK
    return bounds
