"""Bytes of shard samples from storage: streamed, resumed at sample boundaries, retried on lack of progress.

A request asks for samples [first, stop) of one shard; the `.idx` boundaries give their byte range. What it
guarantees, whatever the store does:
- The body is read as it arrives (the streamed GET of the protocol's registry entry, shard_tools/protocols:
  `s3://`, `gs://`, `az://`, `http(s)://`; other fsspec protocols answer whole). When the connection breaks,
  the complete samples already received are kept and the next request asks only for the rest: nothing is
  read twice into the output, nothing is lost.
- A request that keeps being cut is made smaller (halved, down to one sample), so a middlebox that cuts every
  connection after N bytes still lets the read advance N bytes at a time.
- Retries count failures *without progress*: a request that brought at least one whole sample resets the
  count. After `retries` failed attempts in a row the read fails with one line naming the shard and the bytes.
- Missing objects, denied access and other 4xx answers are not retried.
- Local files are memory-mapped (`local_reads="mmap"`, the default): a request is a view of the map, the
  kernel is told to start reading it (MADV_WILLNEED), and nothing is copied; the consumer's first touch maps
  the page cache in. `"pread"` reads each request into a new buffer instead (one copy), and is the choice
  where shard files may be truncated or rewritten in place while a run reads them: a mapped file that shrinks
  kills the process (SIGBUS), a short pread is a clear error. Shards we write are never changed in place.

Every source runs on fsspec's event loop (one thread per process, shared with s3fs): many requests are in
flight at once without a thread each. `Fetcher.submit(...)` returns a `concurrent.futures.Future`.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, fields

import numpy as np

from shard_tools.protocols import Body, Protocol, closed, protocol
from shard_tools.storage import filesystem, is_not_found, is_throttled, is_transient, protocol_of, redact

LOCAL_READS = ("mmap", "pread")  # how local files are read (see above)
PAGE = mmap.PAGESIZE


class ReadError(OSError):
    """A read that kept failing without progress after every retry (one line: shard, bytes, last error)."""


def gone(url: str) -> FileNotFoundError:
    """A shard or .idx that index.json lists but storage no longer has: one line naming it."""
    return FileNotFoundError(f"{redact(url)}: not found, though index.json lists it (deleted or moved after the "
                             "shard set was written; during this run, if the check before training passed)")


@dataclass
class ReadStats:
    """Counters of one reader (one process or loader worker); `snapshot()` for deltas."""

    requests: int = 0  # GETs sent to storage (shard ranges and index files; local reads not counted)
    bytes_read: int = 0  # sample bytes from storage, local files included (cache hits and .idx files are not)
    retries: int = 0  # failed attempts that were retried
    cut: int = 0  # responses that ended early (connection cut, truncated body, refused)
    throttled: int = 0  # 503 SlowDown / 429 answers
    ttfb_seconds: float = 0.0  # sum over requests of the time to the first byte
    request_seconds: float = 0.0  # sum over requests of their duration
    index_fetches: int = 0  # .idx files read from storage
    index_bytes: int = 0
    cache_hits: int = 0  # byte ranges served from the local cache
    cache_bytes: int = 0
    cache_stores: int = 0
    cache_rejected: int = 0  # ranges not kept or not used: a cache entry damaged, a whole shard not its sha256
    cache_waits: int = 0  # ranges waited for while another process of the node fetched them for the cache
    corrupt: int = 0  # samples whose bytes did not match the .idx
    wait_seconds: float = 0.0  # time a consumer waited for reads to finish

    def snapshot(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, **deltas) -> None:
        for k, v in deltas.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass(frozen=True)
class Policy:
    retries: int = 8  # failed attempts in a row without progress before giving up
    backoff: float = 0.2  # first wait in seconds, doubled per attempt without progress, with jitter
    max_backoff: float = 20.0
    request_bytes: int = 16 << 20  # largest single GET (whole samples; one sample is never split)
    chunk_bytes: int = 1 << 20  # read size of a streamed body

    def wait(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)


# ----------------------------------------------------------------------------------------------------------
# Sources: one GET of bytes [start, end) into a buffer, which keeps what arrived before an error.


class Partial(Exception):
    """A GET that ended early; `data` holds the bytes received before `error`."""

    def __init__(self, data: bytearray, error: BaseException):
        super().__init__(str(error))
        self.data, self.error = data, error


async def _get(entry: Protocol, fs, path: str, start: int, end: int, policy: Policy,
               t0: float) -> tuple[bytes | bytearray, float]:
    """Bytes [start, end) with the protocol's GET: a streamed body is read as it arrives (a break raises Partial
    with what arrived); (data, time to first byte)."""
    body = await entry.get(fs, path, start, end)
    if not isinstance(body, Body):  # (a protocol without a streamed GET: the bytes, all at once)
        return body, time.perf_counter() - t0
    return await _drain(body.read, body.close, end - start, policy, t0)


async def _drain(read, close, n: int, policy: Policy, t0: float) -> tuple[bytearray, float]:
    """Read a body of `n` bytes; (data, time to first byte). A break raises Partial with what arrived."""
    buf = bytearray()
    ttfb = None
    try:
        while len(buf) < n:
            chunk = await read(min(policy.chunk_bytes, n - len(buf)))
            if ttfb is None:
                ttfb = time.perf_counter() - t0
            if not chunk:
                raise ConnectionError(f"response body ended after {len(buf)} of {n} bytes")
            buf += chunk
    except Exception as e:  # noqa: BLE001 - classified by the caller
        raise Partial(buf, e) from e
    finally:
        await closed(close())
    return buf, ttfb if ttfb is not None else time.perf_counter() - t0



# ----------------------------------------------------------------------------------------------------------
# The fetcher.


class Fetcher:
    """Fetches sample ranges of shards, many at once, for one process. Thread-safe.

    `submit(url, bounds, first, stop)` -> Future of the bytes of samples [first, stop) (memoryview for local
    files, bytes-like otherwise). At most `concurrency` remote GETs run at once (adjustable while running:
    `set_concurrency`); the rest wait in submission order."""

    def __init__(self, storage_options: dict | None = None, policy: Policy = Policy(), concurrency: int = 8,
                 max_files: int = 64, stats: ReadStats | None = None, filesystems: dict | None = None,
                 direct_local: bool = True, local_reads: str = "mmap"):
        if local_reads not in LOCAL_READS:
            raise ValueError(f"local_reads: {local_reads!r}, not one of {', '.join(LOCAL_READS)}")
        self.storage_options = storage_options or {}
        self.local_reads = local_reads
        self.policy = policy
        self.stats = stats if stats is not None else ReadStats()
        self.filesystems = dict(filesystems or {})  # protocol -> filesystem, instead of storage.filesystem (tests)
        self.direct_local = direct_local  # local files by pread here, not through an fsspec filesystem
        self._lock = threading.Lock()
        self._concurrency = max(1, concurrency)
        self._running = 0
        self._waiting: deque[tuple[Future, tuple]] = deque()
        self._files: OrderedDict[str, int] = OrderedDict()  # open local shards (file descriptors, for pread)
        self._maps: OrderedDict[str, mmap.mmap | None] = OrderedDict()  # mapped local shards (None: empty)
        self._max_files = max_files

    # -- local files ------------------------------------------------------------------------------

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._files.get(path)
            if fd is not None:
                self._files.move_to_end(path)
                return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise gone(path) from None
        with self._lock:
            self._files[path] = fd
            while len(self._files) > self._max_files:
                os.close(self._files.popitem(last=False)[1])
        return fd

    def _map(self, path: str) -> mmap.mmap | None:
        """The read-only map of a local file, kept for the next requests (the oldest of more than `max_files`
        are dropped here; one stays alive while a view of it does)."""
        with self._lock:
            if path in self._maps:
                self._maps.move_to_end(path)
                return self._maps[path]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise gone(path) from None
        try:
            size = os.fstat(fd).st_size
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        with self._lock:
            self._maps[path] = mapped
            while len(self._maps) > self._max_files:
                self._maps.popitem(last=False)
        return mapped

    def read_local(self, path: str, bounds: np.ndarray, first: int, stop: int) -> memoryview:
        """The samples' bytes as a view: of the file's map (`mmap`), or of one pread into a new buffer."""
        start, end = int(bounds[first]), int(bounds[stop])
        if self.local_reads == "mmap":
            mapped = self._map(path)
            # (shorter than asked when the file is shorter than its .idx says: the error below)
            data = memoryview(mapped if mapped is not None else b"")[start:end]
            if len(data) == end - start > 0:  # the kernel reads the range ahead of the consumer's first touch
                mapped.madvise(mmap.MADV_WILLNEED, start - start % PAGE, end - start + start % PAGE)
        else:
            data = memoryview(os.pread(self._fd(path), end - start, start))
        if len(data) != end - start:
            raise ReadError(f"{path}: {len(data)} bytes at {start}, the .idx needs {end - start} (truncated or "
                            "replaced?)")
        with self._lock:
            self.stats.add(bytes_read=end - start)
        return data

    # -- remote ------------------------------------------------------------------------------------

    def set_concurrency(self, n: int) -> None:
        with self._lock:
            self._concurrency = max(1, int(n))
        self._start_waiting()

    @property
    def concurrency(self) -> int:
        return self._concurrency

    def queued(self) -> int:
        """GETs waiting for a free slot."""
        with self._lock:
            return len(self._waiting)

    def filesystem(self, url: str):
        fs = self.filesystems.get(protocol_of(url))
        return fs if fs is not None else filesystem(url, self.storage_options)  # one client per process

    def run(self, fs, coro) -> Future:
        """Run a coroutine on the loop of `fs` (fsspec's loop for synchronous filesystems)."""
        loop = fs.loop if getattr(fs, "async_impl", False) else _fsspec_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def submit(self, url: str, bounds: np.ndarray, first: int, stop: int) -> Future:
        fut: Future = Future()
        if protocol(url).local and self.direct_local:
            try:
                fut.set_result(self.read_local(url.split("://", 1)[-1], bounds, first, stop))
            except FileNotFoundError as e:
                fut.set_exception(gone(url).with_traceback(e.__traceback__))
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                fut.set_exception(e)
            return fut
        with self._lock:
            self._waiting.append((fut, (url, bounds, first, stop)))
        self._start_waiting()
        return fut

    def _start_waiting(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or self._running >= self._concurrency:
                    return
                fut, args = self._waiting.popleft()
                self._running += 1
            if not fut.set_running_or_notify_cancel():
                with self._lock:
                    self._running -= 1
                continue
            fs = self.filesystem(args[0])
            task = self.run(fs, self.fetch(fs, *args))
            task.add_done_callback(lambda t, f=fut: self._finish(t, f))

    def _finish(self, task, fut: Future) -> None:
        with self._lock:
            self._running -= 1
        try:
            fut.set_result(task.result())
        except BaseException as e:  # noqa: BLE001
            fut.set_exception(e)
        self._start_waiting()

    async def fetch(self, fs, url: str, bounds: np.ndarray, first: int, stop: int):
        """The bytes of samples [first, stop): GETs of at most `request_bytes`, each resumed after the last
        complete sample it delivered; halved after two cuts in a row; ReadError after `retries` attempts in a
        row without a complete sample."""
        entry, policy = protocol(url), self.policy
        path = entry.path(url, fs)
        parts: list = []
        pos, failures, cuts, size = first, 0, 0, policy.request_bytes
        while pos < stop:
            start = int(bounds[pos])
            upto = max(pos + 1, min(stop, int(np.searchsorted(bounds, start + size, side="right")) - 1))
            end = int(bounds[upto])
            try:
                data, error = await self._attempt(entry, fs, path, start, end)
            except Exception as e:
                if is_not_found(e):
                    raise gone(url) from e
                raise
            if len(data) > end - start:
                raise ReadError(f"{redact(url)}: asked bytes {start}-{end}, got {len(data)} (range ignored?)")
            whole = len(data) == end - start
            done = upto if whole else int(np.searchsorted(bounds, start + len(data), side="right")) - 1
            if done > pos:  # keep the complete samples, ask only for the rest
                parts.append(data if whole else memoryview(data)[: int(bounds[done]) - start])
                pos, failures = done, 0
            else:
                failures += 1
            if whole:
                cuts = 0
                continue
            cuts += 1
            if cuts >= 2:  # cut again: ask for less next time, down to one sample
                size = max(1, size // 2)
            if failures > policy.retries:
                why = f"{type(error).__name__}: {error}" if error else f"short read ({len(data)} of {end - start})"
                raise ReadError(redact(f"{url}: bytes {start}-{int(bounds[stop])} failed {failures} times in a "
                                       f"row without progress: {why}").replace("\n", " ")) from error
            with self._lock:
                self.stats.add(retries=1)
            await asyncio.sleep(policy.wait(failures))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_whole(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        """All bytes of a small object (an `.idx`, an index pack), or bytes [start, end) of it, retried on
        transient errors; no HEAD request."""
        if protocol(url).local and self.direct_local:
            try:
                with open(url.split("://", 1)[-1], "rb") as f:
                    f.seek(start or 0)
                    data = f.read() if start is None else f.read(end - start)
            except FileNotFoundError:
                raise gone(url) from None
            with self._lock:
                self.stats.add(index_bytes=len(data))
            return data
        fs = self.filesystem(url)
        return self.run(fs, self._whole(fs, url, start, end)).result()

    async def _whole(self, fs, url: str, start: int | None, end: int | None) -> bytes:
        entry = protocol(url)
        path = entry.path(url, fs)
        for attempt in range(self.policy.retries + 1):
            t0 = time.perf_counter()
            try:
                data = await entry.get_bytes(fs, path, start, end)
                if start is not None and len(data) != end - start:
                    raise ConnectionError(f"response body ended after {len(data)} of {end - start} bytes")
                with self._lock:
                    self.stats.add(requests=1, index_bytes=len(data), request_seconds=time.perf_counter() - t0)
                return data
            except Exception as e:  # noqa: BLE001 - classified here
                if is_not_found(e):
                    raise gone(url) from e
                if not is_transient(e):
                    raise
                if attempt == self.policy.retries:
                    raise ReadError(redact(f"{url}: failed {attempt + 1} times: {type(e).__name__}: {e}")) from e
                with self._lock:
                    self.stats.add(retries=1, cut=1, throttled=int(is_throttled(e)))
                await asyncio.sleep(self.policy.wait(attempt))
        raise AssertionError("unreachable")

    async def _attempt(self, entry: Protocol, fs, path: str, start: int, end: int):
        """One GET: (data, None) when whole, (partial data, error) when it broke in a transient way."""
        t0 = time.perf_counter()
        data, error, ttfb = b"", None, None
        try:
            data, ttfb = await _get(entry, fs, path, start, end, self.policy, t0)
        except Partial as p:
            data, error = p.data, p.error
        except Exception as e:  # noqa: BLE001 - classified below
            error = e
        if error is not None and not is_transient(error):
            raise error
        throttled = error is not None and is_throttled(error)
        with self._lock:
            self.stats.add(requests=1, bytes_read=len(data), request_seconds=time.perf_counter() - t0,
                           ttfb_seconds=ttfb or 0.0, cut=int(error is not None), throttled=int(throttled))
        return data, error


def _fsspec_loop():
    from fsspec.asyn import get_loop

    return get_loop()
