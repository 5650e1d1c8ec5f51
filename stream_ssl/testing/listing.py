"""A fake object store listing for the shard check (shard_tools/listing.py): an s3fs stand-in whose
ListObjectsV2 pages are generated, so a million-shard folder costs no storage. Used by tests/shard_tools/test_listing.py
and benchmarks/shard_check.py."""

from __future__ import annotations

from shard_tools.shardset import ShardInfo, ShardSet, idx_name

PAGE = 1000  # entries per ListObjectsV2 page, as S3 answers


def fake_set(shards: int, url: str = "s3://bucket/pool", size: int = 110_000) -> ShardSet:
    """A shard set of `shards` shards of `size` bytes (index.json as load_shard_set would give it)."""
    infos = tuple(ShardInfo(f"pool-{i:07d}.tar", 1, size, "") for i in range(shards))
    return ShardSet(url=url, name="pool", source="real", num_samples=shards, shards=infos, labels=(), meta={})


class FakeBucket:
    """What s3fs offers the shard check: `split_path`, `loop` and `_iterdir` (one page per request). The listing
    holds every shard of `shard_set` and its .idx, less `missing`, with `resized` shards at another size."""

    def __init__(self, shard_set: ShardSet, missing=(), resized=(), no_idx=()):
        from fsspec.asyn import get_loop

        self.loop = get_loop()
        self.set, self.missing, self.resized, self.no_idx = shard_set, set(missing), set(resized), set(no_idx)
        self.pages = 0  # list requests answered

    def split_path(self, url: str):
        bucket, _, key = url.split("://", 1)[-1].partition("/")
        return bucket, key, None

    def _entries(self, prefix: str):
        for i, info in enumerate(self.set.shards):
            if i not in self.missing:
                yield prefix + info.path, info.bytes + (512 if i in self.resized else 0)
            if i not in self.no_idx:
                yield prefix + idx_name(info.path), 40

    async def _iterdir(self, bucket: str, prefix: str = "", delimiter: str = "/"):
        page = 0
        for n, (key, size) in enumerate(self._entries(prefix)):
            if n // PAGE == page:
                self.pages += 1
                page += 1
            yield {"name": f"{bucket}/{key}", "size": size, "type": "file"}
