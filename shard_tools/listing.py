"""Are a shard set's shards there? One listing per folder says, before anything is read.

    check = check_shards(shard_set, shards=[0, 3, 7], storage_options=...)   # None: every shard
    check.ok, check.summary()      # missing shards, shards whose size changed, missing .idx files
    require_shards([(set_a, shards_a), (set_b, None)], storage_options)       # raises ShardsMissing (one line)

A folder is listed once, with sizes, the way its protocol's registry entry lists (shard_tools/protocols):
`os.scandir` for local folders; for `s3://` a paginated ListObjectsV2 of the prefix (one request per 1000
entries, each retried by s3fs); for `gs://` the objects list and for `az://` List Blobs, also by pages;
`fs.ls(detail=True)` for other fsspec filesystems. Nothing is asked per shard. A shard passes when it is
listed with the size index.json records and its `.idx` is listed too. `http(s)://` has no listing: such
sets are not checked (`listed` is False).
Only the shards asked about are compared, so the memory is O(shards checked), not O(entries listed).

The trainer runs this before training (`--check-shards`, on), `python -m stream_ssl.plan ... --check` on
its own, and `shard-tools verify` as its first step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from shard_tools.protocols import protocol
from shard_tools.shardset import ShardSet, idx_name
from shard_tools.storage import filesystem, is_transient, join, protocol_of, redact, storage_error

SHOWN = 3  # names given in a one-line message; the rest are counted


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
            error = storage_error(folder, e, storage_options)  # a missing bucket is not an empty folder
            if error is not None:
                raise error from e
            if isinstance(e, FileNotFoundError):
                return None
            if attempt == retries or not is_transient(e):
                raise
            time.sleep(backoff * 2**attempt)
    return None


def _list_once(folder: str, visit, storage_options, fs) -> None:
    entry = protocol(folder)
    if not entry.local:
        fs = fs if fs is not None else filesystem(folder, storage_options)
    entry.list(fs, entry.path(folder), visit)


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
    """List each folder holding shards of `shard_set` once and compare with index.json: every shard in `shards`
    (default: all) must be listed with its recorded size, and its `.idx` listed too."""
    t0 = time.perf_counter()
    n = len(shard_set.shards)
    wanted = np.arange(n) if shards is None else np.unique(np.fromiter(shards, dtype=np.int64))
    recorded = np.fromiter((shard_set.shards[i].bytes for i in wanted.tolist()), dtype=np.int64, count=len(wanted))
    check = ShardCheck(shard_set, wanted, recorded, np.full(len(wanted), -1, dtype=np.int64),
                       np.zeros(len(wanted), dtype=bool))
    if protocol(shard_set.url).list is None:
        check.listed = False
        return check
    for folder, names in _by_folder(shard_set, wanted).items():
        list_folder(join(shard_set.url, folder) if folder else shard_set.url,
                    _visitor(check, names, folder if shards is None else None), storage_options, fs)
        check.listings += 1
    check.seconds = time.perf_counter() - t0
    return check


def _by_folder(shard_set: ShardSet, wanted: np.ndarray) -> dict[str, dict[str, int]]:
    """folder (relative to the set) -> {file name of the shard: its position in `wanted`}."""
    out: dict[str, dict[str, int]] = {}
    for pos, i in enumerate(wanted.tolist()):
        folder, _, name = shard_set.shards[i].path.rpartition("/")
        out.setdefault(folder, {})[name] = pos
    return out


def _visitor(check: ShardCheck, names: dict[str, int], folder: str | None) -> Callable[[str, int], None]:
    """Record a listed file: a shard's size, that a shard's .idx (NAME.idx for NAME.tar or NAME) exists, or (with
    `folder`, for a whole-set check) a .tar that index.json does not name."""
    sizes, has_idx = check.sizes, check.has_idx

    def visit(name: str, size: int) -> None:
        pos = names.get(name)
        if pos is not None:
            sizes[pos] = size
        elif name.endswith(".idx"):
            stem = name[:-4]
            pos = names.get(stem + ".tar", names.get(stem))
            if pos is not None:
                has_idx[pos] = True
        elif folder is not None and name.endswith(".tar"):
            check.extra.append(f"{folder}/{name}" if folder else name)

    return visit


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
