"""Read plan slices from shard sets: the `.idx` says where every sample's bytes are; `fetch.py` brings them.

- Any fsspec URL: local paths (one pread per request), `s3://` (s3fs; endpoint and credentials from the AWS
  environment variables or storage options, see `storage.py`), `http(s)://`, other fsspec protocols.
- A slice's bytes come from one or more ranged GETs (fetch.py: streamed, resumed after the last complete
  sample on a break, retried on lack of progress).
- Samples are cut out of the bytes with the `.idx` offsets (no tar parsing). Each member's tar header is
  checked against the `.idx` (name and size), which catches a shard replaced under its index: the name and size
  bytes of every header of a fetched range are compared with the expected bytes at once (one numpy gather,
  once per range), and only a header that differs is parsed (a valid one written another way, such as a ustar
  prefix or a GNU long name, passes). A sample whose bytes do not match is returned with an `__error__` and no
  members, so the loader skips and counts it.
- A shard's `.idx` is fetched once however many threads ask (single flight) and kept in a small LRU: from the
  set's index pack (shard_tools/shardset.py: one object for a thousand shards, fetched whole when the run reads
  enough of them, else the shard's range of it), or, for sets without packs, from the shard's `.idx` file.
- With a `DiskCache` (one folder per node), ranges of remote shards that the run reads again are stored on
  local disk, and any range held there is served from it (`obtain`): a range another process of the node is
  fetching is waited for, not fetched again; fetched ranges are stored as soon as they arrive.
- `ReadAhead` (readahead.py) plans the reads of the coming steps together: fewer, larger requests, enough
  of them in flight.
Only whitelisted member types are returned; nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shard_tools.protocols import protocol
from shard_tools.shardset import IDX_PACK_SHARDS, IMAGE_EXTS, SAFE_EXTS, TAR_BLOCK, ShardSet, boundaries_of, parse_idx
from shard_tools.storage import protocol_of, redact
from stream_ssl.data.cache import BUSY, HELD, MISSING, DiskCache, covers
from stream_ssl.data.fetch import Fetcher, Policy, ReadError, ReadStats
from stream_ssl.data.plan import Plan, Slice

__all__ = ["ReadError", "ReadStats", "ShardIndex", "ShardReader", "member_key"]

WHOLE_PACK_BYTES = 4 << 20  # without a plan, an index pack this small is fetched whole (at 20 MB/s, 0.2 s)
PACKS_HELD = 4  # index packs a reader keeps in memory (a thousand shards' offsets each)


# Where the bytes that the check compares lie in a member's 512-byte tar header: its name field, its size field.
NAME_FIELD, SIZE_FIELD = 0, 124


@dataclass(frozen=True)
class ShardIndex:
    """A shard's `.idx`, as the reader uses it: sample boundaries and keys, the members it returns, and what the
    tar header of every member must hold (its name, up to 100 bytes, and its size as 11 octal digits), laid out
    so that the headers of a whole range are compared in a few numpy operations (`suspects`)."""

    bounds: np.ndarray  # n + 1 byte offsets
    members: list  # per sample [(ext, offset, size, name)]
    keys: list[str]  # per sample
    parts: list  # per sample, the members the reader returns (SAFE_EXTS): [(ext, offset, size, whether an image)]
    first: np.ndarray  # n + 1: the members of sample i are [first[i], first[i + 1]) below
    heads: np.ndarray  # per member: where its tar header starts in the shard
    checked: np.ndarray  # members + 1: member m's checked bytes are where/want[checked[m]:checked[m + 1]]
    counts: np.ndarray  # per member: checked[m + 1] - checked[m]
    where: np.ndarray  # uint8 per checked byte: its place in the header
    want: np.ndarray  # uint8 per checked byte: what the header holds there
    ascending: bool  # whether the headers lie in member order (as in any tar)

    @classmethod
    def of(cls, members: list) -> ShardIndex:
        """The index of a shard from its `.idx` entries (`parse_idx`: per sample [(ext, offset, size, name)])."""
        exts, offsets, sizes, names = zip(*[m for ms in members for m in ms]) if members else ((),) * 4
        first = np.zeros(len(members) + 1, dtype=np.int64)
        np.cumsum([len(m) for m in members], out=first[1:])
        offsets, sizes = np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)
        bounds = boundaries_of(offsets + sizes, first)
        kinds = {e: (e.lower(), e.lower() in SAFE_EXTS, e.lower() in IMAGE_EXTS) for e in set(exts)}
        parts = [[(kinds[e][0], o, z, kinds[e][2]) for e, o, z, _ in m if kinds[e][1]] for m in members]
        checked, where, want = _expected_fields(names, sizes)
        return cls(bounds, members, [member_key(m[0][3]) for m in members], parts, first, offsets - TAR_BLOCK,
                   checked, np.diff(checked), where, want, bool((np.diff(offsets) > 0).all()))

    def key(self, i: int) -> str:
        return self.keys[i]

    def suspects(self, data, first: int, stop: int, base: int) -> np.ndarray:
        """The members of samples [first, stop) whose tar header in `data` (the shard's bytes from `base` on)
        does not hold exactly the expected name and size bytes, in shard order: one gather and one comparison
        for the whole range. A suspect may still be a valid header (`_header_mismatch` decides)."""
        m0, m1 = int(self.first[first]), int(self.first[stop])
        c0, c1 = int(self.checked[m0]), int(self.checked[m1])
        if c0 == c1:
            return np.zeros(0, dtype=np.int64)
        heads = self.heads[m0:m1]
        lo, hi = (int(heads[0]), int(heads[-1])) if self.ascending else (int(heads.min()), int(heads.max()))
        if lo < base or hi + SIZE_FIELD + 12 > base + len(data):  # a header outside the bytes (a wrong .idx)
            return np.arange(m0, m1)
        pos = np.repeat(heads - base, self.counts[m0:m1]) + self.where[c0:c1]
        same = np.frombuffer(data, dtype=np.uint8)[pos] == self.want[c0:c1]
        if same.all():
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.searchsorted(self.checked, np.flatnonzero(~same) + c0, side="right") - 1)


def _expected_fields(names, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(checked, where, want) of ShardIndex: per member, the bytes its tar header holds in the name field (the
    name's first 100 bytes) and the size field (11 octal digits and a NUL); a size that field cannot hold (8 GiB
    or more, or negative) expects twelve 0x80 bytes, which no such header holds, so that its header is always
    parsed."""
    joined = "".join(names).encode()
    lens = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
    if len(joined) != lens.sum() or (lens > 100).any():  # (names not all ASCII, or longer than the field)
        encoded = [n.encode()[:100] for n in names]
        joined, lens = b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    counts = lens + 12
    checked = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(counts, out=checked[1:])
    k = np.arange(checked[-1]) - np.repeat(checked[:-1], counts)  # place among the member's checked bytes
    name_len = np.repeat(lens, counts)
    in_name = k < name_len
    where = np.where(in_name, NAME_FIELD + k, SIZE_FIELD + k - name_len).astype(np.uint8)
    digits = (sizes[:, None] >> (3 * np.arange(10, -1, -1))) & 7
    size_field = np.zeros((len(sizes), 12), dtype=np.uint8)
    size_field[:, :11] = digits + ord("0")
    size_field[(sizes >= 8**11) | (sizes < 0)] = 0x80
    want = np.empty(checked[-1], dtype=np.uint8)
    want[in_name] = np.frombuffer(joined, dtype=np.uint8)
    want[~in_name] = size_field.ravel()
    return checked, where, want


def member_key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.partition(".")[0]


def _header_mismatch(header, name: str, size: int) -> str | None:
    """Why a 512-byte tar header does not describe member `name` of `size` bytes (None if it does)."""
    if len(header) != TAR_BLOCK:
        return "missing header"
    header = bytes(header)
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
    """Reads slices of shards; safe to use from several threads.

    retries/backoff/max_backoff: the fetch policy (failed attempts in a row without progress before a read
    fails; first wait, doubled). request_bytes: largest single GET. cache: a DiskCache (or None), shared with
    the node's other processes; what is stored follows `keeps`; share: (source, shard) -> whether the cache
    keeps that shard (nodecache.CacheShare when the pool does not fit; None: every shard); cache_local: cache
    local paths too (shard sets on NFS/Lustre). local_reads: "mmap" or "pread" (fetch.py). fetcher: share one
    Fetcher (its concurrency, its statistics) between readers, or inject filesystems (tests). `close()` ends
    its threads.
    """

    def __init__(self, sets: tuple[ShardSet, ...], storage_options: dict | None = None, retries: int = 8,
                 backoff: float = 0.2, idx_cache: int = 512, cache: DiskCache | None = None,
                 request_bytes: int = 16 << 20, max_backoff: float = 20.0, plan: Plan | None = None,
                 check_headers: bool = True, cache_local: bool = False, fetcher: Fetcher | None = None,
                 concurrency: int = 8, share: Callable[[int, int], bool] | None = None, local_reads: str = "mmap"):
        self.sets = tuple(sets)
        self.storage_options = storage_options or {}
        self.fetcher = fetcher or Fetcher(self.storage_options, Policy(retries, backoff, max_backoff, request_bytes),
                                          concurrency, local_reads=local_reads)
        self.stats = self.fetcher.stats
        self.cache, self.plan, self.check_headers = cache, plan, check_headers
        self.cache_local, self.share = cache_local, share
        self._executors: dict[str, ThreadPoolExecutor] = {}  # cache reads and waits, stores
        self._index: OrderedDict[tuple[int, int], ShardIndex] = OrderedDict()
        self._packs: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # index packs held whole
        self._pool_packs: dict[int, np.ndarray] = {}  # per source: how many of each pack's shards the plan reads
        self._loading: dict[tuple, Future] = {}
        self._idx_cache = idx_cache
        self._lock = threading.Lock()

    def _count(self, **deltas) -> None:
        with self._lock:
            self.stats.add(**deltas)

    def is_cached(self, url: str) -> bool:
        """Whether the cache applies to `url`: remote protocols, and local paths too with `cache_local` (shard
        sets on a network file system)."""
        return self.cache is not None and (self.cache_local or protocol_of(url) not in ("file", "local", "memory"))

    def caches(self, source: int, shard: int) -> bool:
        """Whether a shard's ranges go through the cache: it applies to the URL and the cache share (what the
        node keeps when the pool does not fit; everything without one) holds the shard."""
        return self.is_cached(self.sets[source].shard_url(shard)) and (self.share is None
                                                                        or self.share(source, shard))

    def keeps(self, source: int, shard: int) -> bool:
        """Whether fetched ranges of a shard are stored: the cache applies, is still writing (not full), and the
        run reads samples again (more than one pass; always when no plan is given). Ranges read in the last pass
        are stored too, so that every fetch of a kept shard goes through a claim (node-wide single flight)."""
        return self.caches(source, shard) and not self.cache.full and (self.plan is None or self.plan.last_pass > 0)

    def shard_key(self, source: int, shard: int) -> str:
        info = self.sets[source].shards[shard]
        return DiskCache.shard_key(self.sets[source].shard_url(shard), info.bytes, info.sha256)

    # ----------------------------------------------------------------------------------------------
    # Indexes.

    def index(self, source: int, shard: int) -> ShardIndex:
        """The parsed `.idx` of a shard, fetched once however many threads ask at the same time."""
        return self._once(self._index, (source, shard), lambda: self._load_index(source, shard), self._idx_cache)

    def _once(self, table: OrderedDict, key, load: Callable, limit: int):
        """`table[key]`, made by `load()` once however many threads ask at the same time; `table` keeps the
        `limit` most recently used."""
        with self._lock:
            if key in table:
                table.move_to_end(key)
                return table[key]
            fut = self._loading.get((id(table), key))
            mine = fut is None
            if mine:
                fut = self._loading[(id(table), key)] = Future()
        if not mine:
            return fut.result()
        try:
            value = load()
            with self._lock:
                table[key] = value
                while len(table) > limit:
                    table.popitem(last=False)
            fut.set_result(value)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop((id(table), key), None)
        return value

    def load_indexes(self, keys) -> None:
        """Fetch the `.idx` of many shards at once (the start of a run reads dozens; one at a time, each
        would cost a round trip); those of local sets one after another."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._index]
        local = {s for s in {k[0] for k in missing} if protocol(self.sets[s].url).local}
        remote = [k for k in missing if k[0] not in local]
        if len(remote) > 1:  # (local files have no round trip to hide: threads would only cost CPU)
            list(self._pools("idx", 16).map(lambda k: self.index(*k), remote))
            missing = [k for k in missing if k[0] in local]
        for k in missing:
            self.index(*k)

    def _load_index(self, source: int, shard: int) -> ShardIndex:
        url, shard_url = self.sets[source].idx_url(shard), self.sets[source].shard_url(shard)
        raw = self.cache.get_blob(self.shard_key(source, shard), "idx") if self.is_cached(url) else None
        if raw is None:
            raw, url = self._idx_text(source, shard)
            if self.is_cached(url):
                self.cache.put_blob(self.shard_key(source, shard), "idx", raw)
        entry = ShardIndex.of(parse_idx(raw.decode(), redact(url)))
        expected = self.sets[source].shards[shard].samples
        if len(entry.keys) != expected:
            raise ValueError(f"{redact(url)}: holds {len(entry.keys)} samples, index.json says {expected} "
                             f"for {redact(shard_url)}")
        return entry

    def _idx_text(self, source: int, shard: int) -> tuple[bytes, str]:
        """A shard's `.idx` text and where it came from: its `.idx` file, or its slice of the set's index pack,
        which is fetched whole (once) when `_whole_pack` says so, else as that one range."""
        s = self.sets[source]
        k = s.pack_of(shard)
        if k is None:
            self._count(index_fetches=1)
            return self.fetcher.read_whole(s.idx_url(shard)), s.idx_url(shard)
        pack, url = s.packs[k], s.pack_url(k)
        start, end = pack.offsets[shard - pack.first], pack.offsets[shard - pack.first + 1]
        if not self._whole_pack(source, k):
            self._count(index_fetches=1)
            return self.fetcher.read_whole(url, start, end), url
        data = self._once(self._packs, (source, k), lambda: self._fetch_pack(source, k), PACKS_HELD)
        return data[start:end], url

    def _fetch_pack(self, source: int, k: int) -> bytes:
        """Index pack `k` of a set, whole: from the node's cache when it holds it, else from storage (and then
        stored there for the node's other processes); checked against index.json's size and sha256."""
        pack, url = self.sets[source].packs[k], self.sets[source].pack_url(k)
        key = DiskCache.shard_key(url, pack.bytes, pack.sha256) if self.is_cached(url) else None
        data = self.cache.get_blob(key, "pack") if key else None
        if data is None:
            data = self.fetcher.read_whole(url)
            self._count(index_fetches=1)
            if key and len(data) == pack.bytes:
                self.cache.put_blob(key, "pack", data)
        if len(data) != pack.bytes or (pack.sha256 and hashlib.sha256(data).hexdigest() != pack.sha256):
            raise ValueError(f"{redact(url)}: not the index pack that index.json lists ({len(data)} bytes, "
                             f"expected {pack.bytes} and its sha256): rewrite the index with shard_tools/index.py")
        return data

    def _whole_pack(self, source: int, k: int) -> bool:
        """Whether to fetch index pack `k` of a set whole: the plan reads at least a quarter of its shards (a pass
        over a whole set costs one GET per thousand shards), or, without a plan, it is small (WHOLE_PACK_BYTES).
        Otherwise (a pool scattered over a large set: a 1% pool of a million shards touches 10,000 packs) each
        shard's range of it is fetched: no GET brings much that is not used."""
        pack = self.sets[source].packs[k]
        if self.plan is None:
            return pack.bytes <= WHOLE_PACK_BYTES
        with self._lock:
            counts = self._pool_packs.get(source)
            if counts is None:
                shards = np.unique(self.plan.unit_shard[self.plan.unit_source == source])
                counts = self._pool_packs[source] = np.bincount(shards // IDX_PACK_SHARDS,
                                                                minlength=len(self.sets[source].packs))
        return 4 * int(counts[k]) >= pack.stop - pack.first

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
        for i in range(piece.start, piece.stop):
            for _, offset, size, name in idx.members[i]:
                header = self.fetcher.submit(url, np.array([offset - TAR_BLOCK, offset]), 0, 1).result()
                why = _header_mismatch(header, name, size)
                if why:
                    raise ValueError(f"{redact(url)} sample {i}: {why}")

    # ----------------------------------------------------------------------------------------------
    # Bytes.

    def fetch(self, url: str, bounds: np.ndarray, first: int, stop: int):
        """The bytes of samples [first, stop) of the shard at `url`, from storage."""
        return self.fetcher.submit(url, bounds, first, stop).result()

    def read_range(self, source: int, shard: int, first: int, stop: int, store: bool | None = None):
        """Bytes of samples [first, stop) of a shard: through the cache where it applies (`obtain`; stored when
        `store`, None: when `keeps` says so), else from storage."""
        if not self.caches(source, shard):
            return self.fetch(self.sets[source].shard_url(shard), self.index(source, shard).bounds, first, stop)
        return self.obtain(source, shard, first, stop, self.keeps(source, shard) if store is None else store)

    def cache_cover(self, source: int, shard: int, first: int, stop: int) -> list[tuple[int, int, str]]:
        """[first, stop) cut into (a, b, state) runs: HELD by the cache, BUSY (a process of this node is
        fetching it for the cache) or MISSING; from what this process last saw when that holds it all, else
        as on disk now."""
        key = self.shard_key(source, shard)
        if covers(self.cache.entries(key, refresh=False), first, stop):
            return [(first, stop, HELD)]
        return self.cache.state(key, first, stop)

    def obtain(self, source: int, shard: int, first: int, stop: int, store: bool, looks: int = 8):
        """Samples [first, stop) through the node's cache: read where held (checked), waited for where another
        process (or thread) is fetching them, else fetched, and then stored when `store`, under a claim so that
        no other process of the node fetches them as well. After `looks` rounds of finding a range gone or
        taken again (eviction racing with reads), it is fetched without the cache."""
        key = self.shard_key(source, shard)
        parts = []
        for a, b, state in self.cache_cover(source, shard, first, stop):
            data = self.read_held(source, shard, a, b) if state == HELD else None
            keep = store and not self.cache.full and looks > 0
            if data is None and state == MISSING and not keep:
                data = self.fetch(self.sets[source].shard_url(shard), self.index(source, shard).bounds, a, b)
            elif data is None and state == MISSING and self.cache.claim(key, [(a, b)])[0]:
                data = self.fetch_claimed(source, shard, a, b)
            elif data is None:  # evicted or damaged since listed, busy, or claimed by another just now
                if state == BUSY and looks > 0:
                    self._count(cache_waits=1)
                    self.cache.wait(key, a, b)
                data = self.obtain(source, shard, a, b, store, looks - 1) if looks > 0 else \
                    self.fetch(self.sets[source].shard_url(shard), self.index(source, shard).bounds, a, b)
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fetch_claimed(self, source: int, shard: int, first: int, stop: int):
        """Fetch a range this reader claimed and store it (which ends the claim; so does a failed fetch)."""
        try:
            data = self.fetch(self.sets[source].shard_url(shard), self.index(source, shard).bounds, first, stop)
        except BaseException:
            self.cache.release(self.shard_key(source, shard), first, stop)
            raise
        self.store(source, shard, first, stop, data)
        return data

    def read_held(self, source: int, shard: int, first: int, stop: int):
        """Samples [first, stop) from the cache entries that hold them (checked on first use); None when one
        vanished (evicted) or was damaged (removed)."""
        bounds = self.index(source, shard).bounds
        key = self.shard_key(source, shard)
        entries = self.cache.entries(key, refresh=False)
        parts, pos = [], first
        while pos < stop:
            e = max((e for e in entries if e[0] <= pos < e[1]), key=lambda e: e[1], default=None)
            if e is None:
                entries = self.cache.entries(key)
                e = max((e for e in entries if e[0] <= pos < e[1]), key=lambda e: e[1], default=None)
            end = min(stop, e[1]) if e else pos
            data = e and self.cache.read(e[2], int(bounds[pos] - bounds[e[0]]), int(bounds[end] - bounds[pos]),
                                         int(bounds[e[1]] - bounds[e[0]]))
            if data is None:
                self.cache.forget(key)  # what this process knew is stale
                return None
            parts.append(data)
            pos = end
        self._count(cache_hits=1, cache_bytes=sum(len(p) for p in parts))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def store(self, source: int, shard: int, first: int, stop: int, data) -> bool:
        """Keep samples [first, stop) in the cache; a range that covers a whole shard is first checked against
        the sha256 in index.json. Ends this reader's claim of the range, stored or not."""
        key = self.shard_key(source, shard)
        if not self._intact(source, shard, first, stop, data):
            self._count(cache_rejected=1)
            self.cache.release(key, first, stop)
            return False
        if self.cache.put(key, first, stop, data):
            self._count(cache_stores=1)
            return True
        return False

    def store_when_fetched(self, future: Future, source: int, shard: int, first: int, stop: int) -> Future:
        """Store what a claimed fetch brings as soon as it arrives (on a writer thread, not when the consumer
        gets to it), so that other processes waiting for the range wait no longer than the fetch. The returned
        future is done once the store is (or the claim ended without one)."""
        stored: Future = Future()

        def arrived(f: Future) -> None:
            try:
                task = self._pools("writer", 1).submit(self._store_result, f, source, shard, first, stop)
                task.add_done_callback(lambda _: stored.set_result(None))
            except RuntimeError:  # closed: the claim ends here
                self.cache.release(self.shard_key(source, shard), first, stop)
                stored.set_result(None)

        future.add_done_callback(arrived)
        return stored

    def _store_result(self, f: Future, source: int, shard: int, first: int, stop: int) -> None:
        if f.cancelled() or f.exception() is not None:
            self.cache.release(self.shard_key(source, shard), first, stop)
        else:
            self.store(source, shard, first, stop, f.result())

    def submit_cached(self, source: int, shard: int, first: int, stop: int, store: bool) -> Future:
        """`obtain` on a thread of this reader (reads from disk, waits for other processes' fetches)."""
        return self._pools("cache", 4).submit(self.obtain, source, shard, first, stop, store)

    def _intact(self, source: int, shard: int, first: int, stop: int, data) -> bool:
        info = self.sets[source].shards[shard]
        if first != 0 or stop != info.samples or not info.sha256:
            return True
        pad = info.bytes - int(self.index(source, shard).bounds[stop])  # the end-of-archive blocks: zeros
        if pad < 0:
            return False
        digest = hashlib.sha256(data)
        digest.update(bytes(pad))
        return digest.hexdigest() == info.sha256

    def _pools(self, name: str, threads: int) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._executors.get(name)
            if pool is None:
                pool = self._executors[name] = ThreadPoolExecutor(threads, thread_name_prefix=f"stream-ssl-{name}")
            return pool

    def close(self) -> None:
        """Stop this reader's threads once their work is done (queued stores finish: their claims end)."""
        with self._lock:
            pools, self._executors = dict(self._executors), {}
        for name, pool in pools.items():
            pool.shutdown(wait=True, cancel_futures=name != "writer")

    def mismatches(self, data, source: int, shard: int, first: int, stop: int,
                   data_first: int | None = None) -> dict[int, str]:
        """{sample: why} for the samples of [first, stop) in `data` (the bytes of samples [data_first (default
        first), ...)) with a member whose tar header does not match the `.idx` (name and size): the headers of
        the whole range are compared at once (`ShardIndex.suspects`), and only those that differ from the
        expected bytes are parsed (`_header_mismatch`: a valid header written another way passes). Nothing is
        checked when the reader's `check_headers` is off."""
        if not self.check_headers:
            return {}
        idx = self.index(source, shard)
        base = int(idx.bounds[first if data_first is None else data_first])
        out: dict[int, str] = {}
        flat = None
        for m in idx.suspects(data, first, stop, base).tolist():
            i = int(np.searchsorted(idx.first, m, side="right")) - 1
            if i in out:
                continue
            if flat is None:
                flat = [t for ms in idx.members[first:stop] for t in ms]
            _, offset, size, name = flat[m - int(idx.first[first])]
            a = offset - base
            why = _header_mismatch(data[a - TAR_BLOCK: a] if a >= TAR_BLOCK else b"", name, size)
            if why:
                out[i] = f"{redact(self.sets[source].shard_url(shard))} sample {i}: {why}"
        return out

    def split(self, data, source: int, shard: int, first: int, stop: int, data_first: int | None = None,
              bad: dict[int, str] | None = None) -> list[dict]:
        """Cut samples [first, stop) out of `data`, the bytes of samples [data_first (default first), ...), with
        the `.idx` offsets. Images are zero-copy views when `data` is a memoryview (a local read of ours);
        other members, and everything from remote reads, are `bytes`. `bad`: what `mismatches` found for a
        range that holds [first, stop) (checked here when not given); those samples
        come back with an `__error__` and no members."""
        idx = self.index(source, shard)
        base = int(idx.bounds[first if data_first is None else data_first])
        if bad is None:
            bad = self.mismatches(data, source, shard, first, stop, data_first)
        url = self.sets[source].shard_url(shard)
        view = isinstance(data, memoryview)
        out = []
        for i, key, parts in zip(range(first, stop), idx.keys[first:stop], idx.parts[first:stop]):
            sample = {"__key__": key, "__url__": url, "__source__": source, "__shard__": shard, "__index__": i}
            if bad and i in bad:
                out.append(self._corrupt(sample, bad[i]))
                continue
            for ext, offset, size, image in parts:
                a = offset - base
                sample[ext] = data[a: a + size] if view and image else bytes(data[a: a + size])
            out.append(sample)
        return out

    def _corrupt(self, sample: dict, why: str) -> dict:
        self._count(corrupt=1)
        return {**{k: v for k, v in sample.items() if k.startswith("__")}, "__error__": why}

    def read(self, piece: Slice, store: bool | None = None) -> list[dict]:
        """The samples of one slice, in shard order."""
        data = self.read_range(piece.source, piece.shard, piece.start, piece.stop, store)
        return self.split(data, piece.source, piece.shard, piece.start, piece.stop)

    def read_all(self, pieces: list[Slice]) -> list[dict]:
        return [s for piece in pieces for s in self.read(piece)]
