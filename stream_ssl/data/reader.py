"""Read plan slices from shard sets through fsspec: one ranged read per slice, located by the `.idx`.

Works for any fsspec URL (local paths, s3:// through s3fs, http(s)://). Only whitelisted member types are
returned; nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import fsspec
import numpy as np

from shard_tools.shardset import SAFE_EXTS, ShardSet, parse_idx, sample_boundaries
from stream_ssl.data.plan import Slice

TRANSIENT = (ConnectionError, TimeoutError, OSError)


@dataclass
class ReadStats:
    bytes_read: int = 0
    reads: int = 0
    retries: int = 0


def parse_tar_bytes(data: bytes, where: str) -> list[dict]:
    """Group the members of a tar fragment into samples: [{'__key__': key, ext: bytes, ...}] in order."""
    samples: list[dict] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, dot, ext = base.partition(".")
                if not dot:
                    continue
                directory = m.name[: len(m.name) - len(base)]
                key = directory + key
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                if ext.lower() in SAFE_EXTS:
                    samples[-1][ext.lower()] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise OSError(f"{where}: corrupt tar data ({e})") from e
    return samples


class ShardReader:
    """Reads slices of shards. Holds a small LRU of parsed `.idx` files; safe to use from several threads."""

    def __init__(self, sets: tuple[ShardSet, ...], storage_options: dict | None = None, retries: int = 5,
                 backoff: float = 0.5, idx_cache: int = 512):
        self.sets = sets
        self.storage_options = storage_options or {}
        self.retries, self.backoff = retries, backoff
        self.stats = ReadStats()
        self._bounds: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._idx_cache = idx_cache
        self._lock = threading.Lock()
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def _filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        fs = self._fs.get(protocol)
        if fs is None:
            fs = self._fs[protocol] = fsspec.filesystem(protocol, **self.storage_options.get(protocol, {}))
        return fs, url

    def _retrying(self, what: str, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except TRANSIENT as e:
                if attempt == self.retries:
                    raise OSError(f"{what}: failed after {self.retries} retries: {e}") from e
                self.stats.retries += 1
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def boundaries(self, source: int, shard: int) -> np.ndarray:
        key = (source, shard)
        with self._lock:
            if key in self._bounds:
                self._bounds.move_to_end(key)
                return self._bounds[key]
        url = self.sets[source].idx_url(shard)
        fs, path = self._filesystem(url)
        text = self._retrying(url, lambda: fs.cat_file(path)).decode()
        bounds = sample_boundaries(parse_idx(text, url))
        expected = self.sets[source].shards[shard].samples
        if len(bounds) - 1 != expected:
            raise ValueError(f"{url}: holds {len(bounds) - 1} samples, index.json says {expected}")
        with self._lock:
            self._bounds[key] = bounds
            while len(self._bounds) > self._idx_cache:
                self._bounds.popitem(last=False)
        return bounds

    def read(self, piece: Slice) -> list[dict]:
        """The samples of one slice, in shard order."""
        bounds = self.boundaries(piece.source, piece.shard)
        begin, end = int(bounds[piece.start]), int(bounds[piece.stop])
        url = self.sets[piece.source].shard_url(piece.shard)
        fs, path = self._filesystem(url)
        data = self._retrying(url, lambda: fs.cat_file(path, start=begin, end=end))
        if len(data) != end - begin:
            raise OSError(f"{url}: short read ({len(data)} of {end - begin} bytes at {begin})")
        self.stats.bytes_read += len(data)
        self.stats.reads += 1
        samples = parse_tar_bytes(data, f"{url}@{begin}")
        if len(samples) != len(piece):
            raise ValueError(f"{url}: bytes {begin}-{end} hold {len(samples)} samples, the .idx says {len(piece)}")
        for s in samples:
            s["__url__"] = url
        return samples

    def read_all(self, pieces: list[Slice]) -> list[dict]:
        return [s for piece in pieces for s in self.read(piece)]
