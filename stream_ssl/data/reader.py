"""Read plan slices from shard sets through fsspec: ranged reads located by the `.idx`, retried, cached.

- Any fsspec URL: local paths, `s3://` (s3fs; endpoint and credentials from the AWS environment variables or
  storage options, see `shard_tools/storage.py`), `http(s)://`.
- A slice's bytes are one sequential ranged read, issued in sample-aligned requests of at most `chunk_bytes`.
  A transient failure (reset connection, timeout, truncated body, 5xx, throttling) is retried with
  exponential backoff, and the read resumes at the last complete sample: whole samples already received
  are kept, nothing is read twice into the output, nothing is lost.
- Samples are cut out of the bytes with the `.idx` offsets (no tar parsing). Each member's tar header is
  checked against the `.idx` (name and size): a sample whose bytes do not match is returned with an
  `__error__` and no members, so the loader skips and counts it.
- With a `DiskCache`, ranges of remote shards that later passes will read again are stored on local disk,
  and any range held there is served from it.
- `ReadAhead` keeps the next steps' reads in flight on background threads (bounded).
Only whitelisted member types are returned; nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import io
import random
import tarfile
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

from shard_tools.shardset import SAFE_EXTS, TAR_BLOCK, ShardSet, parse_idx, sample_boundaries
from shard_tools.storage import filesystem, fs_path, is_transient, protocol_of, redact
from stream_ssl.data.cache import DiskCache
from stream_ssl.data.plan import Plan, Slice

TRANSIENT = (ConnectionError, TimeoutError, OSError)  # kept for callers; classification is `is_transient`


@dataclass
class ReadStats:
    bytes_read: int = 0  # from storage (local or remote), not counting cache hits
    reads: int = 0  # ranged requests to storage
    cache_hits: int = 0  # ranges served from the local cache
    cache_bytes: int = 0
    cache_stores: int = 0
    retries: int = 0
    corrupt: int = 0  # samples whose bytes did not match the .idx
    wait_seconds: float = 0.0  # time a consumer waited for reads to finish

    def snapshot(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ReadError(OSError):
    """A read that kept failing after every retry."""


@dataclass(frozen=True)
class ShardIndex:
    bounds: np.ndarray  # n + 1 byte offsets
    members: list  # per sample [(ext, offset, size, name)]

    def key(self, i: int) -> str:
        return member_key(self.members[i][0][3])


def member_key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.partition(".")[0]


def parse_tar_bytes(data: bytes, where: str) -> list[dict]:
    """Group the members of a tar fragment into samples: [{'__key__': key, ext: bytes, ...}] in order.
    (For tars without an `.idx`; the reader itself cuts samples with the `.idx`.)"""
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
                key = m.name[: len(m.name) - len(base)] + key
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                if ext.lower() in SAFE_EXTS:
                    samples[-1][ext.lower()] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise OSError(f"{where}: corrupt tar data ({e})") from e
    return samples


def _header_mismatch(header: bytes, name: str, size: int) -> str | None:
    """Why a 512-byte tar header does not describe member `name` of `size` bytes (None if it does)."""
    if len(header) != TAR_BLOCK:
        return "missing header"
    raw = header[124:136]
    if raw[0] & 0x80:  # GNU base-256 size
        got = int.from_bytes(raw[1:], "big")
    else:
        try:
            got = int(raw.rstrip(b"\0 ").decode("ascii") or "0", 8)
        except (UnicodeDecodeError, ValueError):
            return "unreadable header"
    if got != size:
        return f"header size {got} != .idx size {size}"
    field = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
    full = f"{prefix}/{field}" if prefix else field
    if full != name and not (len(field) >= 99 and name.startswith(field)) and not name.endswith(full):
        return f"header name {full!r} != .idx name {name!r}"
    return None


class ShardReader:
    """Reads slices of shards. Holds a small LRU of parsed `.idx` files; safe to use from several threads.

    retries: attempts after the first for one request; backoff: first wait in seconds (doubled each time,
    with jitter, capped at `max_backoff`). chunk_bytes: largest single request (whole samples; a sample
    larger than that is one request). cache: a DiskCache (or None); `store` decisions come from the
    slices' pass and the plan (`repeats_after`), or store everything remote when no plan is given;
    cache_local: cache local paths too (shard sets on NFS/Lustre).
    """

    def __init__(self, sets: tuple[ShardSet, ...], storage_options: dict | None = None, retries: int = 8,
                 backoff: float = 0.2, idx_cache: int = 512, cache: DiskCache | None = None,
                 chunk_bytes: int = 16 << 20, max_backoff: float = 20.0, plan: Plan | None = None,
                 check_headers: bool = True, cache_local: bool = False):
        self.sets = tuple(sets)
        self.storage_options = storage_options or {}
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.chunk_bytes = chunk_bytes
        self.cache, self.plan, self.check_headers = cache, plan, check_headers
        self.cache_local = cache_local
        self.stats = ReadStats()
        self._index: OrderedDict[tuple[int, int], ShardIndex] = OrderedDict()
        self._idx_cache = idx_cache
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------------
    # Plumbing.

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _filesystem(self, url: str):
        """(fs, path) for url: this process's client for its protocol and options (see storage.filesystem)."""
        return filesystem(url, self.storage_options), fs_path(url)

    def _sleep_before_retry(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        time.sleep(delay * (0.5 + random.random() / 2))

    def _retrying(self, what: str, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                if attempt == self.retries:
                    raise ReadError(redact(f"{what}: failed after {self.retries} retries: "
                                           f"{type(e).__name__}: {e}")) from e
                self._count(retries=1)
                self._sleep_before_retry(attempt)
        raise AssertionError("unreachable")

    def _is_remote(self, url: str) -> bool:
        """Whether the cache applies: remote protocols, and local paths too with `cache_local` (shard sets on
        a network file system)."""
        return self.cache_local or protocol_of(url) not in ("file", "local", "memory")

    def _shard_key(self, source: int, shard: int) -> str:
        info = self.sets[source].shards[shard]
        return DiskCache.shard_key(self.sets[source].shard_url(shard), info.bytes, info.sha256)

    # ----------------------------------------------------------------------------------------------
    # Indexes.

    def index(self, source: int, shard: int) -> ShardIndex:
        key = (source, shard)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return self._index[key]
        url = self.sets[source].idx_url(shard)
        shard_url = self.sets[source].shard_url(shard)
        use_cache = self.cache is not None and self._is_remote(url)
        raw = self.cache.get_blob(self._shard_key(source, shard), "idx") if use_cache else None
        if raw is None:
            fs, path = self._filesystem(url)
            raw = self._retrying(url, lambda: fs.cat_file(path))
            if use_cache:
                self.cache.put_blob(self._shard_key(source, shard), "idx", raw)
        members = parse_idx(raw.decode(), redact(url))
        bounds = sample_boundaries(members)
        expected = self.sets[source].shards[shard].samples
        if len(bounds) - 1 != expected:
            raise ValueError(f"{redact(url)}: holds {len(bounds) - 1} samples, index.json says {expected} "
                             f"for {redact(shard_url)}")
        entry = ShardIndex(bounds, members)
        with self._lock:
            self._index[key] = entry
            while len(self._index) > self._idx_cache:
                self._index.popitem(last=False)
        return entry

    def boundaries(self, source: int, shard: int) -> np.ndarray:
        return self.index(source, shard).bounds

    def keys(self, piece: Slice) -> list[str]:
        idx = self.index(piece.source, piece.shard)
        return [idx.key(i) for i in range(piece.start, piece.stop)]

    def verify_headers(self, piece: Slice) -> None:
        """Fetch the tar header of every member of a slice (512-byte ranged reads) and compare it with the
        `.idx`; raise ValueError on the first mismatch. Reads headers only, never member data."""
        idx = self.index(piece.source, piece.shard)
        url = self.sets[piece.source].shard_url(piece.shard)
        fs, path = self._filesystem(url)
        for i in range(piece.start, piece.stop):
            for _, offset, size, name in idx.members[i]:
                header = self._retrying(url, lambda o=offset: fs.cat_file(path, start=o - TAR_BLOCK, end=o))
                self._count(reads=1, bytes_read=len(header))
                why = _header_mismatch(header, name, size)
                if why:
                    raise ValueError(f"{redact(url)} sample {i}: {why}")

    # ----------------------------------------------------------------------------------------------
    # Bytes.

    def fetch(self, url: str, bounds: np.ndarray, first: int, stop: int) -> bytes:
        """The bytes of samples [first, stop) of the shard at `url`, from storage, resuming at sample boundaries."""
        fs, path = self._filesystem(url)
        end = int(bounds[stop])
        pos_sample, out, attempt = first, [], 0
        while pos_sample < stop:
            pos = int(bounds[pos_sample])
            # The largest sample-aligned request within chunk_bytes (at least one sample).
            limit = int(np.searchsorted(bounds, pos + self.chunk_bytes, side="right")) - 1
            chunk_stop = min(stop, max(limit, pos_sample + 1))
            chunk_end = int(bounds[chunk_stop])
            error: Exception | None = None
            try:
                data = fs.cat_file(path, start=pos, end=chunk_end)
            except Exception as e:
                if not is_transient(e):
                    raise
                data, error = b"", e
            self._count(reads=1, bytes_read=len(data))
            if len(data) == chunk_end - pos:
                out.append(data)
                pos_sample, attempt = chunk_stop, 0
                continue
            if len(data) > chunk_end - pos:
                raise ReadError(f"{redact(url)}: asked bytes {pos}-{chunk_end}, got {len(data)} bytes "
                                "(server ignores range requests?)")
            # Short or failed: keep the whole samples that arrived, re-issue from the next one.
            done = int(np.searchsorted(bounds, pos + len(data), side="right")) - 1
            if done > pos_sample:
                out.append(data[: int(bounds[done]) - pos])
                pos_sample, attempt = done, 0
            if attempt >= self.retries:
                why = f"{type(error).__name__}: {error}" if error else f"short read ({len(data)} bytes)"
                raise ReadError(redact(f"{url}: bytes {int(bounds[pos_sample])}-{end} failed after "
                                       f"{self.retries} retries: {why}")) from error
            self._count(retries=1)
            self._sleep_before_retry(attempt)
            attempt += 1
        return b"".join(out)

    def read_range(self, source: int, shard: int, first: int, stop: int, store: bool | None = None) -> bytes:
        """Bytes of samples [first, stop) of a shard: from the cache where held, else storage (then cached if
        `store`; None: store remote ranges whenever a cache is set)."""
        idx = self.index(source, shard)
        bounds = idx.bounds
        url = self.sets[source].shard_url(shard)
        if self.cache is None or not self._is_remote(url):
            return self.fetch(url, bounds, first, stop)
        store = True if store is None else store
        key = self._shard_key(source, shard)
        entries = self.cache.entries(key, refresh=False)
        refreshed = False
        parts, pos = [], first
        while pos < stop:
            cover = max((e for e in entries if e[0] <= pos < e[1]), key=lambda e: e[1], default=None)
            if cover is None and not refreshed:  # another process may hold it: look on disk once
                entries, refreshed = self.cache.entries(key), True
                continue
            if cover is not None:
                e_first, e_stop, path = cover
                until = min(e_stop, stop)
                data = self.cache.read(path, int(bounds[pos] - bounds[e_first]), int(bounds[until] - bounds[pos]),
                                       int(bounds[e_stop] - bounds[e_first]))
                if data is not None:
                    parts.append(data)
                    self._count(cache_hits=1, cache_bytes=len(data))
                    pos = until
                    continue
                self.cache.forget(key)  # evicted or damaged: what this process knew is stale
                entries = [e for e in entries if e is not cover]
                continue
            until = min([e[0] for e in entries if e[0] > pos] + [stop])
            data = self.fetch(url, bounds, pos, until)
            if store and self.cache.put(key, pos, until, data):
                self._count(cache_stores=1)
            parts.append(data)
            pos = until
        return b"".join(parts)

    def split(self, data: bytes, source: int, shard: int, first: int, stop: int) -> list[dict]:
        """Cut the bytes of samples [first, stop) into sample dicts with the `.idx` offsets."""
        idx = self.index(source, shard)
        base = int(idx.bounds[first])
        url = self.sets[source].shard_url(shard)
        out = []
        for i in range(first, stop):
            members = idx.members[i]
            sample = {"__key__": member_key(members[0][3]), "__url__": url, "__source__": source,
                      "__shard__": shard, "__index__": i}
            for ext, offset, size, name in members:
                a = offset - base
                if self.check_headers:
                    why = _header_mismatch(data[a - TAR_BLOCK: a], name, size)
                    if why:
                        for e in [e for e in list(sample) if not e.startswith("__")]:
                            del sample[e]
                        sample["__error__"] = f"{redact(url)} sample {i}: {why}"
                        self._count(corrupt=1)
                        break
                ext = ext.lower()
                if ext in SAFE_EXTS:
                    sample[ext] = data[a: a + size]
            out.append(sample)
        return out

    def read(self, piece: Slice, store: bool | None = None) -> list[dict]:
        """The samples of one slice, in shard order."""
        if store is None and self.plan is not None:
            store = self.plan.repeats_after(piece.epoch)
        data = self.read_range(piece.source, piece.shard, piece.start, piece.stop, store)
        return self.split(data, piece.source, piece.shard, piece.start, piece.stop)

    def read_all(self, pieces: list[Slice]) -> list[dict]:
        return [s for piece in pieces for s in self.read(piece)]


def coalesce(pieces: list[Slice]) -> tuple[list[Slice], list[tuple[int, int]]]:
    """Merge slices that touch in the same shard into fewer reads.

    Returns (reads, where): slice i's samples are samples [where[i][1], where[i][1] + len(slice i)) of read
    where[i][0]. A merged read carries the smallest pass of its parts (it is worth caching if any part is)."""
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i].source, pieces[i].shard, pieces[i].start))
    reads: list[Slice] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(pieces)
    for i in order:
        p = pieces[i]
        last = reads[-1] if reads else None
        if last is not None and (last.source, last.shard) == (p.source, p.shard) and last.start <= p.start <= last.stop:
            where[i] = (len(reads) - 1, p.start - last.start)
            reads[-1] = Slice(p.source, p.shard, last.start, max(last.stop, p.stop), min(last.epoch, p.epoch))
        else:
            where[i] = (len(reads), 0)
            reads.append(p)
    return reads, where


class ReadAhead:
    """Yields (item, samples in yield order) for one rank, with the reads of the next `depth` items in flight
    on `threads` background threads. Items are steps, or (step, part) micro-batches of a batch split into
    `parts`. Iterate once; `close()` (or leaving the loop) stops it."""

    def __init__(self, reader: ShardReader, plan: Plan, rank: int, steps, depth: int = 2, threads: int = 4,
                 parts: int = 1):
        self.reader, self.plan, self.rank, self.parts = reader, plan, rank, parts
        self.steps = iter(steps)
        self.depth = max(0, depth)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="stream-ssl-read")
        self.pending: deque = deque()

    def _where(self, item) -> tuple[int, int]:
        return (item, 0) if isinstance(item, (int, np.integer)) else (int(item[0]), int(item[1]))

    def _submit(self) -> bool:
        item = next(self.steps, None)
        if item is None:
            return False
        step, part = self._where(item)
        pieces = self.plan.rank_slices(step, self.rank, part, self.parts)
        reads, where = coalesce(pieces)
        futures = [self.pool.submit(self.reader.read, r) for r in reads]
        self.pending.append((item, pieces, where, futures))
        return True

    def __iter__(self):
        try:
            while len(self.pending) <= self.depth and self._submit():
                pass
            while self.pending:
                item, pieces, where, futures = self.pending.popleft()
                t0 = time.perf_counter()
                done = [f.result() for f in futures]
                self.reader._count(wait_seconds=time.perf_counter() - t0)
                self._submit()
                samples = [s for p, (j, off) in zip(pieces, where) for s in done[j][off: off + len(p)]]
                step, part = self._where(item)
                order = self.plan.rank_order(step, self.rank, part, self.parts)
                if order is not None:
                    samples = [samples[int(k)] for k in order]
                yield item, samples
        finally:
            self.close()

    def close(self) -> None:
        for _, _, _, futures in self.pending:
            for f in futures:
                f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
