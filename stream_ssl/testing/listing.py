"""A fake object store listing for the shard check (shard_tools/listing.py): an s3fs stand-in whose
ListObjectsV2 pages are generated, so a million-shard folder costs no storage. Used by tests/shard_tools/test_listing.py
and benchmarks/shard_check.py (and benchmarks/startup.py, behind its fake store)."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable

from shard_tools.shardset import ShardInfo, ShardSet, idx_name

PAGE = 1000  # entries per ListObjectsV2 page, as S3 answers


def fake_set(shards: int, url: str = "s3://bucket/pool", size: int = 110_000) -> ShardSet:
    """A shard set of `shards` shards of `size` bytes (index.json as load_shard_set would give it)."""
    infos = tuple(ShardInfo(f"pool-{i:07d}.tar", 1, size, "") for i in range(shards))
    return ShardSet(url=url, name="pool", source="real", num_samples=shards, shards=infos, labels=(), meta={})


class FakeBucket:
    """What s3fs offers the shard check: `split_path`, `loop` and `_iterdir` (one request per page of PAGE
    entries, each taking `latency` seconds as an `asyncio.sleep`, so that requests in flight together overlap).
    The folder of `shard_set` holds every shard and its .idx, less `missing` (and the .idx of `no_idx`), with
    `resized` shards at another size; a listing with a prefix returns the entries of the shards whose names start
    with it (the prefixes the check asks for: never longer than a shard's name without `.tar`). `pages` counts the
    requests answered (a listing of nothing is one too), `listings` the listings, `most_in_flight` the most
    requests in flight at once."""

    def __init__(self, shard_set: ShardSet, missing=(), resized=(), no_idx=(), latency: float = 0.0):
        from fsspec.asyn import get_loop

        self.loop = get_loop()
        self.set, self.latency = shard_set, latency
        key = shard_set.url.split("://", 1)[-1].partition("/")[2].strip("/")
        self.folder = key + "/" if key else ""
        shards = shard_set.shards
        if hasattr(shards, "paths"):  # (generated shards, stream_ssl/testing/fakestore.py: in name order, lazy)
            self.order, self.paths, self.sizes = range(len(shards)), shards.paths, shards.sizes
        else:
            order = sorted(range(len(shards)), key=lambda i: shards[i].path)
            self.order, self.paths = order, [shards[i].path for i in order]
            self.sizes = [shards[i].bytes for i in order]
        self.missing, self.resized, self.no_idx = set(missing), set(resized), set(no_idx)
        self.pages = self.listings = self.in_flight = self.most_in_flight = 0
        self.fail: Callable[[str], None] | None = None

    def split_path(self, url: str):
        bucket, _, key = url.split("://", 1)[-1].partition("/")
        return bucket, key, None

    def _pages(self, bucket: str, prefix: str):
        """The pages (lists of s3fs's entries) of the objects whose keys start with `prefix`, in key order: each
        holds the .idx and .tar of PAGE / 2 shards (less the missing ones)."""
        if not prefix.startswith(self.folder):
            return
        start = prefix[len(self.folder):]
        lo = bisect_left(self.paths, start)
        hi = bisect_left(self.paths, start + "\U0010ffff")
        base, faults = f"{bucket}/{self.folder}", self.missing | self.no_idx | self.resized
        for first in range(lo, hi, PAGE // 2):
            stop = min(first + PAGE // 2, hi)
            order = self.order[first:stop]
            if not faults.isdisjoint(order):
                yield [e for pos in range(first, stop) for e in self._listed(order[pos - first], base, self.paths[pos])]
                continue
            yield [e for path, size in zip(self.paths[first:stop], self.sizes[first:stop])
                   for e in ({"name": base + (path[:-4] if path.endswith(".tar") else path) + ".idx", "size": 40,
                              "type": "file"},
                             {"name": base + path, "size": size, "type": "file"})]

    def _listed(self, i: int, base: str, path: str) -> list[dict]:
        """The entries of shard `i`: its .idx and itself, less the missing ones."""
        page = []
        if i not in self.no_idx:
            page.append({"name": base + idx_name(path), "size": 40, "type": "file"})
        if i not in self.missing:
            page.append({"name": base + path, "size": self.set.shards[i].bytes + 512 * (i in self.resized),
                         "type": "file"})
        return page

    async def _iterdir(self, bucket: str, prefix: str = "", delimiter: str = "/", max_items=None):
        self.listings += 1
        pages = self._pages(bucket, prefix)
        page = next(pages, [])
        while True:
            await self._request(prefix)
            following = next(pages, None)
            for entry in page:
                yield entry
            if following is None:
                return
            page = following

    async def _request(self, prefix: str) -> None:
        """One list request: `latency` seconds, during which others may be in flight; `fail(prefix)` (set by a
        test) may raise what the store answers instead."""
        self.pages += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.fail is not None:
                self.fail(prefix)
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
