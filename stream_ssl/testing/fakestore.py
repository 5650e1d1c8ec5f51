"""A generated shard set behind a fake S3 store, for start-up at scale (benchmarks/startup.py): nothing is stored,
every object is made from its name when asked.

    store = FakeStore(Layout(shards=1_000_000), latency=0.03, bandwidth=100e6)
    with serving(store):                      # s3:// is this store in this process (fsspec's registry)
        load_shard_set(store.url)             # index.json (the writer's format), 30 ms + its bytes at 100 MB/s
        ...                                   # listings (FakeBucket's pages), .idx and shard GETs, all of them

`FakeS3` is an s3fs stand-in: what the s3 registry entry (shard_tools/protocols/s3.py) and fsspec ask of a
client (`split_path`, `_iterdir`, `_call_s3("get_object", ...)`, `cat_file`). Every request waits `latency`
seconds and then its bytes at `bandwidth` bytes/s (an `asyncio.sleep` on fsspec's loop: requests in flight
together overlap, as on separate connections). The set: shards `NAME-000000.tar`, ... of `samples` samples, each
one `KEY.jpg` member of `sample_bytes` bytes (valid tar headers, filler bytes: nothing decodes them), the
`.idx` of any shard (`NAME-0001234.idx`, wds2idx v1.2) and index pack (`index-000012.idxpack`) made from its
name, and index.json as the writer writes it (its packs without a sha256). A name the layout cannot make is not
found. `store.log` records (kind, start, end) of every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from fsspec.asyn import AsyncFileSystem

from shard_tools.shardset import (
    FORMAT,
    IDX_PACK_SHARDS,
    IDX_VERSION,
    TAR_BLOCK,
    VERSION,
    ShardInfo,
    ShardSet,
    idx_pack_name,
    shard_name,
)
from stream_ssl.testing.listing import FakeBucket


@dataclass(frozen=True)
class Layout:
    """The generated set: `shards` shards of `samples` samples of one `sample_bytes` member each."""

    shards: int
    samples: int = 100
    sample_bytes: int = 110_000
    name: str = "pool"

    @property
    def record(self) -> int:
        """Bytes of one sample in a tar: its header and its data, padded to the block."""
        return TAR_BLOCK + -(-self.sample_bytes // TAR_BLOCK) * TAR_BLOCK

    @property
    def shard_bytes(self) -> int:
        return self.samples * self.record + 2 * TAR_BLOCK  # (the end-of-archive blocks)

    def path(self, i: int) -> str:
        return shard_name(self.name, i)

    def key(self, shard: int, sample: int) -> str:
        return f"{shard:09d}{sample:05d}"

    def shard_of(self, name: str) -> tuple[int, str] | None:
        """(shard, extension) of `NAME-000123.tar` or `.idx`; None for another name."""
        found = re.fullmatch(re.escape(self.name) + r"-(\d{6,})\.(tar|idx)", name)
        if found is None or int(found.group(1)) >= self.shards:
            return None
        return int(found.group(1)), found.group(2)

    def index_json(self) -> bytearray:
        """index.json as shard_tools/writer.py writes it (json.dumps(index, indent=1)), made by formatting, 10,000
        shards at a time (the text of a million is about 150 MB)."""
        sha = "0" * 64
        entry = (' {{\n   "path": "{}",\n   "samples": ' + str(self.samples) + ',\n   "bytes": '
                 + str(self.shard_bytes) + f',\n   "sha256": "{sha}"\n  }}}}')
        out = bytearray(f'{{\n "format": "{FORMAT}",\n "version": {VERSION},\n "name": "{self.name}",\n '
                        f'"num_samples": {self.shards * self.samples},\n "source": "real",\n "seed": 0,\n '
                        '"fields": [\n  "jpg"\n ],\n "labels": {\n  "names": []\n },\n "idx_packs": [\n  '.encode())
        out += ",\n  ".join(self.pack_entry(k) for k in range(-(-self.shards // IDX_PACK_SHARDS))).encode()
        out += b'\n ],\n "shards": [\n '

        for first in range(0, self.shards, 10_000):
            chunk = ",\n ".join(entry.format(self.path(i)) for i in range(first, min(first + 10_000, self.shards)))
            out += (",\n " if first else "").encode() + chunk.encode()
        out += b"\n ]\n}\n"
        return out

    @cached_property
    def idx_bytes(self) -> int:
        """Every shard's `.idx` has this length (keys of fixed width)."""
        return len(self.idx(0))

    def pack_entry(self, k: int) -> str:
        """Index pack k's entry in index.json, as the writer formats it (no sha256: the reader checks the size)."""
        first = k * IDX_PACK_SHARDS
        n = min(IDX_PACK_SHARDS, self.shards - first)
        offsets = ",\n    ".join(str(j * self.idx_bytes) for j in range(n + 1))
        return (f'{{\n   "path": "{idx_pack_name(k)}",\n   "first": {first},\n   "offsets": [\n    {offsets}\n   ],\n'
                f'   "bytes": {n * self.idx_bytes},\n   "sha256": ""\n  }}')

    def pack_range(self, k: int, start: int | None, end: int | None) -> bytes:
        """Bytes [start, end) of index pack k: the `.idx` texts of the shards they cross."""
        first = k * IDX_PACK_SHARDS
        size = min(IDX_PACK_SHARDS, self.shards - first) * self.idx_bytes
        start, end = start or 0, size if end is None else min(end, size)
        a, b = start // self.idx_bytes, -(-end // self.idx_bytes)
        blob = b"".join(self.idx(first + j) for j in range(a, b))
        return blob[start - a * self.idx_bytes:end - a * self.idx_bytes]

    def idx(self, shard: int) -> bytes:
        """The `.idx` of a shard: the same text for every shard but the shard number in the keys (a template,
        so that a pack of a thousand is made in milliseconds, as a store would serve it)."""
        return self._idx_template.replace(b"<shard##>", b"%09d" % shard)

    @cached_property
    def _idx_template(self) -> bytes:
        lines = [f"{IDX_VERSION} {self.samples}"]
        lines += [f"jpg {k * self.record + TAR_BLOCK} {self.sample_bytes} <shard##>{k:05d}.jpg"
                  for k in range(self.samples)]
        return ("\n".join(lines) + "\n").encode()

    def shard_range(self, shard: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of a shard: the records of the samples they cross (then the end blocks)."""
        end = min(end, self.shard_bytes)
        first, stop = start // self.record, min(self.samples, -(-end // self.record))
        filler = b"\xff" * (self.record - TAR_BLOCK)
        parts = []
        for k in range(first, stop):
            info = tarfile.TarInfo(f"{self.key(shard, k)}.jpg")
            info.size, info.mtime, info.mode = self.sample_bytes, 0, 0o644
            parts += [info.tobuf(format=tarfile.USTAR_FORMAT), filler]
        blob = b"".join(parts) + b"\0" * (2 * TAR_BLOCK)
        return blob[start - first * self.record:end - first * self.record]


class GeneratedShards(Sequence):
    """The ShardInfo of a Layout, made when asked (a million cost nothing until read); `paths` and `sizes` are
    as lazy, in name order (FakeBucket lists from them)."""

    def __init__(self, layout: Layout):
        self.layout, size = layout, layout.shard_bytes
        self.paths = _Lazy(layout.shards, layout.path)
        self.sizes = _Lazy(layout.shards, lambda i: size)

    def __len__(self) -> int:
        return self.layout.shards

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return ShardInfo(self.layout.path(i), self.layout.samples, self.layout.shard_bytes, "0" * 64)


class _Lazy(Sequence):
    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.make(j) for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(i)


class FakeStore:
    """The objects of one generated shard set at `s3://BUCKET/FOLDER`, and how fast they come."""

    def __init__(self, layout: Layout, latency: float = 0.03, bandwidth: float = 100e6, bucket: str = "bucket",
                 folder: str = "pool"):
        self.layout, self.latency, self.bandwidth = layout, latency, bandwidth
        self.bucket, self.folder = bucket, folder
        self.url = f"s3://{bucket}/{folder}"
        self.listing = FakeBucket(ShardSet(self.url, layout.name, "real", layout.shards * layout.samples,
                                           GeneratedShards(layout), (), {}), latency=latency)
        self.log: list[tuple[str, float, float]] = []  # (kind, start, end) of every request but the listings
        self._lock = threading.Lock()

    @cached_property
    def index(self) -> bytearray:
        return self.layout.index_json()

    def object(self, key: str, start: int | None, end: int | None) -> tuple[str, bytes]:
        """(kind, bytes) of object `key` (bytes [start, end) when a range is asked); FileNotFoundError if none."""
        folder, _, name = key.rpartition("/")
        if folder == self.folder and name == "index.json":
            return "index.json", bytes(self.index[start:end])  # (a copy: what a client receives)
        pack = re.fullmatch(r"index-(\d{6})\.idxpack", name) if folder == self.folder else None
        if pack is not None and int(pack.group(1)) * IDX_PACK_SHARDS < self.layout.shards:
            return "idx", self.layout.pack_range(int(pack.group(1)), start, end)
        found = self.layout.shard_of(name) if folder == self.folder else None
        if found is None:
            raise FileNotFoundError(f"s3://{self.bucket}/{key}")
        shard, ext = found
        if ext == "idx":
            return "idx", self.layout.idx(shard)[start:end]
        return "shard", self.layout.shard_range(shard, start or 0, self.layout.shard_bytes if end is None else end)

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        t0 = time.perf_counter()
        kind, data = self.object(key, start, end)
        await asyncio.sleep(self.latency + len(data) / self.bandwidth)
        with self._lock:
            self.log.append((kind, t0, time.perf_counter()))
        return data

    def requests(self, kind: str) -> int:
        return sum(1 for k, _, _ in self.log if k == kind)


class _Body:
    def __init__(self, data: bytes):
        self.view, self.pos = memoryview(data), 0

    async def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        out, self.pos = bytes(self.view[self.pos:end]), end
        return out

    def close(self) -> None:
        pass


class FakeS3(AsyncFileSystem):
    """An s3fs stand-in for the store being served (`serving`)."""

    protocol = ("s3", "s3a")
    store: FakeStore | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(asynchronous=False)

    @classmethod
    def _strip_protocol(cls, path):
        return path.split("://", 1)[-1].rstrip("/") if isinstance(path, str) else [cls._strip_protocol(p)
                                                                                     for p in path]

    def split_path(self, path: str):
        bucket, _, key = self._strip_protocol(path).partition("/")
        return bucket, key, None

    def _store(self, bucket: str) -> FakeStore:
        if self.store is None or bucket != self.store.bucket:
            raise FileNotFoundError(f"s3://{bucket}: no such bucket")
        return self.store

    def _iterdir(self, bucket: str, prefix: str = "", delimiter: str = "/", max_items=None):
        return self._store(bucket).listing._iterdir(bucket, prefix, delimiter, max_items)

    async def _call_s3(self, method: str, **kw):
        if method != "get_object":
            raise NotImplementedError(f"FakeS3: {method}")
        start = end = None
        if "Range" in kw:
            a, b = kw["Range"].removeprefix("bytes=").split("-")
            start, end = int(a), int(b) + 1
        return {"Body": _Body(await self._store(kw["Bucket"]).get(kw["Key"], start, end))}

    async def _cat_file(self, path: str, start=None, end=None, **kwargs):
        bucket, key, _ = self.split_path(path)
        return await self._store(bucket).get(key, start, end)


@contextlib.contextmanager
def serving(store: FakeStore):
    """Within: `s3://` (and `s3a://`) URLs in this process are `store` (fsspec's registry; clients made before are
    dropped on the way in and out)."""
    import importlib

    import fsspec

    from shard_tools import storage

    registry = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is a read-only view)
    before = {s: registry.get(s) for s in FakeS3.protocol}
    FakeS3.store = store
    for scheme in FakeS3.protocol:
        fsspec.register_implementation(scheme, FakeS3, clobber=True)
    storage._CLIENTS.clear()
    try:
        yield store
    finally:
        FakeS3.store = None
        for scheme, cls in before.items():
            if cls is None:
                registry.pop(scheme, None)
            else:
                fsspec.register_implementation(scheme, cls, clobber=True)
        storage._CLIENTS.clear()
