"""Are a shard set's shards there? Listings of their folders say, before anything is read.

    check = check_shards(shard_set, shards=[0, 3, 7], storage_options=...)   # None: every shard
    check.ok, check.summary()      # missing shards, shards whose size changed, missing .idx files
    require_shards([(set_a, shards_a), (set_b, None)], storage_options)       # raises ShardsMissing (one line)

Folders are listed with sizes, the way their protocol's registry entry lists (shard_tools/protocols), never with
a request per shard. A local folder is one `os.scandir`. In an object store (`s3://`: ListObjectsV2, `gs://`:
the objects list, `az://`: List Blobs; 1000 entries a page, each page a request) the shards asked about are
listed by prefixes of their names, many at once: the shortest prefixes that hold at most PER_PREFIX (1000) of
the folder's shards each, only those holding a shard asked about, each as long as a shard's name without
`.tar` at most, so that a shard and its `.idx` are listed together (`shard_prefixes`); up to CONCURRENCY (64)
prefixes are listed at once on the filesystem's event loop (`list_prefixes`). A million shards are 1000
prefixes, about 2000 requests, 64 in flight, instead of 2000 one after another; a folder of at most 1000 shards
is one listing of the whole folder, as before (500 shards or fewer: one request). A transient error lists its prefix
again; a missing bucket or refused credentials stop the check with the same one line naming the folder. A
whole-set check (`shards` None: `shard-tools verify`), which also reports the `.tar` files index.json does not
name, lists each folder whole, page after page; so does any other fsspec filesystem (`fs.ls(detail=True)`).
A shard passes when it is listed with the size index.json records and its `.idx` is listed too.
`http(s)://` has no listing: such sets are not checked (`listed` is False).
Only the shards asked about are compared, so the memory is O(shards checked), not O(entries listed) (plus, for
the prefixes, a list of the set's shard names and an index array: 16 bytes a shard, while the check runs).

The trainer runs this before training (`--check-shards`, on), `python -m stream_ssl.plan ... --check` on
its own, and `shard-tools verify` as its first step.
"""

from __future__ import annotations

import asyncio
import operator
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from shard_tools.protocols import protocol
from shard_tools.protocols.base import blocking
from shard_tools.shardset import ShardSet, idx_name
from shard_tools.storage import filesystem, is_transient, join, protocol_of, redact, storage_error

SHOWN = 3  # names given in a one-line message; the rest are counted
PER_PREFIX = 1000  # shards (2000 entries with their .idx: two list pages) per listed prefix, at most where possible
CONCURRENCY = 64  # prefixes listed at once


class ShardsMissing(ValueError):
    """Shards (or their .idx) that are absent or have another size than index.json records: one line."""


# ----------------------------------------------------------------------------------------------------------
# One listing.


def list_folder(folder: str, visit: Callable[[str, int], None], storage_options: dict | None = None, fs=None,
                retries: int = 3, backoff: float = 0.5) -> None:
    """Call `visit(name, size)` for every file directly in `folder` (a local path or URL), from one listing. A
    folder that does not exist has no files (a bucket that does not exist raises storage.BucketNotFound, refused
    credentials StorageAccessDenied). Transient errors restart the listing (`visit` must be idempotent)."""
    for attempt in range(retries + 1):
        try:
            return _list_once(folder, visit, storage_options, fs)
        except Exception as e:  # noqa: BLE001 - fsspec back-ends raise many types
            wait = _after_failure(folder, e, storage_options, attempt, retries, backoff)
            if wait is None:
                return None
            time.sleep(wait)
    return None


def _after_failure(folder: str, e: Exception, storage_options, attempt: int, retries: int,
                   backoff: float) -> float | None:
    """What a failed listing of `folder` means: None when the folder has no files (it does not exist), else the
    seconds to wait before listing again; raises what cannot be retried (a missing bucket, refused credentials:
    one line naming the folder)."""
    error = storage_error(folder, e, storage_options)  # a missing bucket is not an empty folder
    if error is not None:
        raise error from e
    if isinstance(e, FileNotFoundError):
        return None
    if attempt == retries or not is_transient(e):
        raise e
    return backoff * 2**attempt


def _list_once(folder: str, visit, storage_options, fs) -> None:
    entry = protocol(folder)
    if not entry.local:
        fs = fs if fs is not None else filesystem(folder, storage_options)
    entry.list(fs, entry.path(folder), visit)


def list_prefixes(folder: str, prefixes: list[str], visit: Callable[[str, int], None],
                  storage_options: dict | None = None, fs=None, concurrency: int = CONCURRENCY, retries: int = 3,
                  backoff: float = 0.5) -> None:
    """Call `visit(name, size)` for every file directly in `folder` whose name starts with one of `prefixes`,
    listing up to `concurrency` prefixes at once on the filesystem's event loop (the protocol's `list_prefix`;
    a protocol without one lists the whole folder once). Errors as `list_folder`'s, per prefix: a transient one
    lists that prefix again (`visit` must be idempotent), any other stops every listing."""
    entry = protocol(folder)
    if entry.list_prefix is None:
        return list_folder(folder, visit, storage_options, fs, retries, backoff)
    fs = fs if fs is not None else filesystem(folder, storage_options)
    path = entry.path(folder)

    async def one(prefix: str) -> None:
        for attempt in range(retries + 1):
            try:
                return await entry.list_prefix(fs, path, prefix, visit)
            except Exception as e:  # noqa: BLE001 - fsspec back-ends raise many types
                wait = _after_failure(folder, e, storage_options, attempt, retries, backoff)
                if wait is None:
                    return None
                await asyncio.sleep(wait)

    blocking(fs, _each, one, prefixes, concurrency)
    return None


async def _each(fn, items: list, concurrency: int) -> None:
    """`await fn(item)` for every item, at most `concurrency` at a time; the first error cancels the rest."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:
            await fn(item)

    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(concurrency, len(items))))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


# ----------------------------------------------------------------------------------------------------------
# Shards against a listing.


@dataclass
class ShardCheck:
    """What the listings say about shards `shards` of `shard_set`: listed size (-1: absent) and .idx presence."""

    shard_set: ShardSet
    shards: np.ndarray  # shard indices checked
    recorded: np.ndarray  # their sizes in index.json
    sizes: np.ndarray  # their listed sizes, -1 when absent
    has_idx: np.ndarray
    listings: int = 0
    seconds: float = 0.0
    listed: bool = True  # False: the storage cannot list (http(s)); nothing was checked
    extra: list[str] = field(default_factory=list)  # listed .tar files index.json does not name (whole-set checks)

    @property
    def missing(self) -> np.ndarray:
        return self.shards[self.sizes < 0]

    @property
    def changed(self) -> np.ndarray:
        return self.shards[(self.sizes >= 0) & (self.sizes != self.recorded)]

    @property
    def no_idx(self) -> np.ndarray:
        return self.shards[(self.sizes >= 0) & ~self.has_idx]

    @property
    def ok(self) -> bool:
        return not self.listed or (len(self.missing) == 0 and len(self.changed) == 0 and len(self.no_idx) == 0)

    def size_of(self, shard: int) -> int | None:
        pos = int(np.searchsorted(self.shards, shard))
        if pos == len(self.shards) or self.shards[pos] != shard or self.sizes[pos] < 0:
            return None
        return int(self.sizes[pos])

    def problems(self) -> list[str]:
        """Short phrases, each naming the first few shards and counting the rest."""
        info, out = self.shard_set.shards, []
        n = len(self.shards)
        if len(self.missing):
            out.append(f"{len(self.missing)} of {n} shards missing ({_names(info[int(i)].path for i in self.missing)})")
        if len(self.changed):
            sizes = dict(zip(self.shards.tolist(), self.sizes.tolist()))
            out.append(f"{len(self.changed)} changed size (" + _names(
                f"{info[int(i)].path}: {sizes[int(i)]} bytes, index.json says {info[int(i)].bytes}"
                for i in self.changed) + ")")
        if len(self.no_idx):
            names = _names(idx_name(info[int(i)].path) for i in self.no_idx)
            out.append(f"{len(self.no_idx)} without their .idx ({names})")
        return out

    def summary(self) -> str:
        where = redact(self.shard_set.url)
        if not self.listed:
            return f"{where}: not checked ({protocol_of(where)} cannot list a folder)"
        if self.ok:
            return (f"{where}: {len(self.shards)} shards and their .idx present with the sizes index.json records "
                    f"({self.listings} listing{'s' * (self.listings != 1)}, {self.seconds:.2f} s)")
        return f"{where}: " + "; ".join(self.problems())


def _names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_shards(shard_set: ShardSet, shards: Iterable[int] | None = None, storage_options: dict | None = None,
                 fs=None) -> ShardCheck:
    """Compare the listings of the folders holding shards of `shard_set` with index.json: every shard in
    `shards` (default: all) must be listed with its recorded size, and its `.idx` listed too. A folder is listed
    by prefixes of its shards' names, many at once (`shard_prefixes`, `list_prefixes`) where its protocol can;
    a whole-set check (`shards` None), which also reports the .tar files index.json does not name, lists each
    folder whole."""
    t0 = time.perf_counter()
    n = len(shard_set.shards)
    wanted = np.arange(n) if shards is None else _unique(shards)
    infos = shard_set.shards
    recorded = np.fromiter((infos[i].bytes for i in wanted), dtype=np.int64, count=len(wanted))
    check = ShardCheck(shard_set, wanted, recorded, np.full(len(wanted), -1, dtype=np.int64),
                       np.zeros(len(wanted), dtype=bool))
    entry = protocol(shard_set.url)
    if entry.list is None:
        check.listed = False
        return check
    for folder, (names, slot) in _by_folder(shard_set, wanted).items():
        url = join(shard_set.url, folder) if folder else shard_set.url
        found = slot >= 0
        visit, sizes, has_idx, extra = _visitor(names if found.all() else [names[i] for i in np.flatnonzero(found)],
                                                whole=shards is None)
        if shards is None or entry.list_prefix is None:
            list_folder(url, visit, storage_options, fs)
            check.listings += 1
        else:
            prefixes = shard_prefixes(names, slot >= 0, PER_PREFIX)
            list_prefixes(url, prefixes, visit, storage_options, fs)
            check.listings += len(prefixes)
        check.sizes[slot[found]] = np.frombuffer(sizes, dtype=np.int64)
        check.has_idx[slot[found]] = np.frombuffer(has_idx, dtype=np.uint8) > 0
        check.extra += [f"{folder}/{name}" if folder else name for name in extra]
    check.seconds = time.perf_counter() - t0
    return check


def _unique(shards: Iterable[int]) -> np.ndarray:
    """The sorted distinct shard indices (np.unique hashes: slower by far on a million)."""
    out = np.sort(shards if isinstance(shards, np.ndarray) else np.fromiter(shards, dtype=np.int64)).astype(np.int64)
    return out[np.concatenate([[True], out[1:] != out[:-1]])] if len(out) else out


def _by_folder(shard_set: ShardSet, wanted: np.ndarray) -> dict[str, tuple[list[str], np.ndarray]]:
    """folder (relative to the set) -> (the file names of the set's shards in it, sorted; per name, the position
    of its shard in `wanted`, -1 when it is not checked), for the folders holding a wanted shard."""
    paths = [info.path for info in shard_set.shards]
    if not any("/" in p for p in paths):  # (one folder, the usual case: no name is copied)
        folders: dict[str, tuple[list[str], list[int] | range]] = {"": (paths, range(len(paths)))}
    else:
        folders = {}
        for i, path in enumerate(paths):
            folder, _, name = path.rpartition("/")
            names, index = folders.setdefault(folder, ([], []))
            names.append(name)
            index.append(i)
    where = np.full(len(paths), -1, dtype=np.int64)
    where[wanted] = np.arange(len(wanted))
    out = {}
    for folder, (names, index) in folders.items():
        slot = where[np.asarray(index, dtype=np.int64)]
        if not (slot >= 0).any():
            continue
        if any(map(operator.ge, names, islice(names, 1, None))):  # (index.json's order is usually the sorted one)
            order = sorted(range(len(names)), key=names.__getitem__)
            names, slot = [names[i] for i in order], slot[order]
        out[folder] = (names, slot)
    return out


def shard_prefixes(names: list[str], wanted: np.ndarray, limit: int = PER_PREFIX) -> list[str]:
    """The name prefixes to list in a folder whose shards are `names` (sorted), for those where `wanted` is True:
    the shortest ones that hold at most `limit` shards each (where the names allow), each holding at least one
    wanted shard, and never longer than a shard's name without `.tar`, so a shard and its .idx are listed
    together. A folder of at most `limit` shards is one prefix, "" (the whole folder): one listing."""
    counts = np.concatenate([[0], np.cumsum(wanted)])
    out: list[str] = []
    stack = [(0, len(names), 0)]
    while stack:
        lo, hi, depth = stack.pop()
        if counts[hi] == counts[lo]:
            continue  # nothing wanted here
        if hi - lo <= limit or len(names[lo]) <= depth:  # (a name that is the prefix itself is not split off)
            out.append(_covering(names, lo, hi, depth))
            continue
        children, i = [], lo
        while i < hi:
            head = names[i][: depth + 1]
            last = ord(head[-1]) == 0x10FFFF
            j = hi if last else bisect_left(names, head[:-1] + chr(ord(head[-1]) + 1), i, hi)
            children.append((i, j, depth + 1))
            i = j
        stack.extend(reversed(children))
    return out


def _covering(names: list[str], lo: int, hi: int, depth: int) -> str:
    """The prefix names[lo][:depth] of names[lo:hi], shortened where it would be longer than one of their stems."""
    if depth > min(map(len, names[lo:hi])) - len(".tar"):
        depth = min(depth, *(len(n) - len(".tar") if n.endswith(".tar") else len(n) for n in names[lo:hi]))
    return names[lo][:depth]


def _visitor(names: list[str], whole: bool) -> tuple[Callable[[str, int], None], array, bytearray, list[str]]:
    """A `visit(name, size)` for listed files against the sorted shard file names `names`, and what it records
    per name: the listed size (-1: not listed), whether its .idx (NAME.idx for NAME.tar or NAME) is listed; and
    (`whole`, for a whole-set check) the listed .tar files that are not shards of the set."""
    n = len(names)
    sizes, has_idx, extra = array("q", [-1]) * n, bytearray(n), []  # (8 and 1 bytes a shard)
    bare = any(not name.endswith(".tar") for name in names)  # shards named without .tar (their .idx: NAME.idx)
    idx_named = any(name.endswith(".idx") for name in names)  # (a shard named like an .idx: never, but allowed)
    after = 0  # where the last name looked up was or would be: a listing comes in key order, so the next is there

    def find(name: str) -> int:
        """The position of `name` in `names`, -1 when it is not there."""
        nonlocal after
        if after < n and names[after] == name:
            return after
        if (after == n or name < names[after]) and (after == 0 or names[after - 1] < name):
            return -1  # (between two neighbours: not there)
        after = bisect_left(names, name)
        return after if after < n and names[after] == name else -1

    def visit(name: str, size: int) -> None:
        nonlocal after
        if name.endswith(".idx"):  # (NAME.idx comes just before NAME.tar)
            stem = name[:-4]
            j = find(stem + ".tar")
            if j < 0 and bare:
                j = find(stem)
            if j >= 0:
                has_idx[j] = 1
                return
            if not idx_named:
                return
        j = find(name)
        if j >= 0:
            sizes[j] = size
            after = j + 1
        elif whole and name.endswith(".tar"):
            extra.append(name)

    return visit, sizes, has_idx, extra


def require_shards(wanted: Iterable[tuple[ShardSet, Iterable[int] | None]], storage_options: dict | None = None,
                   fs=None) -> list[ShardCheck]:
    """`check_shards` for each (shard set, shards); raises ShardsMissing naming what is wrong, in one line."""
    checks = [check_shards(s, shards, storage_options, fs) for s, shards in wanted]
    bad = [c for c in checks if not c.ok]
    if bad:
        raise ShardsMissing("shards missing or changed since index.json was written: "
                            + "; ".join(c.summary() for c in bad)
                            + f". Restore the files, or repack or re-index the set (`shard-tools verify "
                            f"{redact(bad[0].shard_set.url)}` lists every problem)")
    return checks
