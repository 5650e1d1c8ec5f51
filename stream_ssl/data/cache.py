"""Repeat-aware local cache: byte ranges of shards kept on local disk, size-bounded, shared by a node's processes.

With passes E > 1 every sample is read again in a later pass. The reader stores the sample ranges it fetches
from remote storage and serves any later request for samples it holds from here, so repeats do not go back to
the object store. One folder serves every process of a node (ranks, DataLoader workers, the node filler of
`nodecache.py`), so a range is read from storage at most once per node.

Layout: `ROOT/<k[:2]>/<k>/<first>-<stop>-<crc>.bin` holds samples [first, stop) of one shard (its tar bytes from
the first sample's boundary to the stop sample's boundary, as the `.idx` gives them) and `<name>-<crc>.blob`
small whole objects (the shard's `.idx`). `k` hashes the shard URL (credentials stripped) with its size and
sha256 from `index.json`, so a re-packed shard never matches stale entries.

- Integrity: an entry's name carries the CRC-32 of its bytes, computed when it is written. An entry is read
  whole and checked (size, CRC) the first time a process uses it; an entry that fails is removed and reported
  as missing, so the caller fetches it again and never uses damaged bytes. Writes go to a temporary name and
  are renamed, so a reader never sees a partial entry.
- Single flight: a process that is about to fetch a range for the cache claims it first (`claim`: a small
  `.claim-...` file, made under an exclusive `flock` of the shard's `lock` file, and only where no entry or
  live claim overlaps). Others see the range as busy and `wait` for the entry instead of fetching it again.
  Writing the entry (or `release`) removes the claim. A claim whose process is gone (same host, pid not
  alive) or older than CLAIM_TTL seconds is dead and ignored.
- Bound: a hit refreshes the file's mtime, and eviction removes the oldest files until the total is under 90%
  of the limit. The total is re-measured from disk whenever this process's estimate passes the limit or it has
  written a tenth of it, so concurrent writers keep it near the bound.
- A full disk (ENOSPC, EDQUOT; or a folder that cannot be written) turns writing off for this process (`full`
  says why, with one warning): reads go on, training goes on from storage. Entries written by the cache
  format before checksums (`<first>-<stop>.bin`) are never used; eviction removes them in time.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import secrets
import socket
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from itertools import accumulate
from pathlib import Path

from shard_tools.storage import redact

HELD, BUSY, MISSING = "held", "busy", "missing"
CLAIM_TTL = 900.0  # seconds: a claim older than this is dead whatever its process does (pid reuse, other hosts)
LOCK = "lock"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


class DiskCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("cache size must be positive")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._total = self._measure()
        self._written = 0
        self.evicted = 0
        self.rejected = 0  # entries found damaged (size or checksum) and removed
        self.full = ""  # why writing stopped (disk full), empty while it goes on
        self.token = f"{_HOST}{secrets.token_hex(4)}"  # this instance's claims (one per reader)
        self._known: OrderedDict[str, list] = OrderedDict()  # entries seen per shard (refreshed on a miss)
        self._verified: set[tuple[str, int, int]] = set()  # (path, inode, size) checked by this process

    @staticmethod
    def shard_key(url: str, nbytes: int = 0, sha256: str = "") -> str:
        return hashlib.sha256(f"{redact(url)}\n{nbytes}\n{sha256}".encode()).hexdigest()[:40]

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    # ----------------------------------------------------------------------------------------------
    # Entries.

    def entries(self, key: str, refresh: bool = True) -> list[tuple[int, int, Path]]:
        """(first, stop, path) of the sample ranges held for a shard, sorted. Without `refresh`, what this
        process last saw (other processes' new entries show up on the next refresh)."""
        if not refresh:
            with self._lock:
                known = self._known.get(key)
                if known is not None:
                    self._known.move_to_end(key)
                    return known
        return self._remember(key, self._scan(key)[0])

    def _remember(self, key: str, found: list) -> list:
        with self._lock:
            self._known[key] = found
            self._known.move_to_end(key)
            while len(self._known) > 4096:
                self._known.popitem(last=False)
        return found

    def forget(self, key: str) -> None:
        with self._lock:
            self._known.pop(key, None)

    def _scan(self, key: str) -> tuple[list[tuple[int, int, Path]], list[tuple[int, int, Path]]]:
        """(entries, claims) of a shard, each as (first, stop, path)."""
        try:
            names = os.listdir(self._dir(key))
        except FileNotFoundError:
            return [], []
        entries, claims = [], []
        for name in names:
            if name.endswith(".bin"):
                parts = name[:-4].split("-")
                if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                    entries.append((int(parts[0]), int(parts[1]), self._dir(key) / name))
            elif name.startswith(".claim-"):
                parts = name.split("-")
                if len(parts) == 5 and parts[1].isdigit() and parts[2].isdigit():
                    claims.append((int(parts[1]), int(parts[2]), self._dir(key) / name))
        entries.sort()
        return entries, claims

    def read(self, path: Path, offset: int, length: int, expected_size: int | None = None) -> memoryview | None:
        """`length` bytes at `offset` of an entry, a view of the mapped file (entries are written whole and
        renamed into place, never changed after: a map of one is safe, and eviction only unlinks it); None if it
        vanished (evicted) or is damaged (then removed). This process's first read of an entry checks its size
        and checksum over the whole entry."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if expected_size is not None and st.st_size != expected_size:
                    raise ValueError("size mismatch")
                whole = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if st.st_size else \
                    memoryview(b"")
            seen = (str(path), st.st_ino, st.st_size)
            if seen not in self._verified:
                if crc(whole) != _crc_of(path.name):
                    raise ValueError("checksum mismatch")
                with self._lock:
                    self._verified.add(seen)
            data = whole[offset: offset + length]
            if len(data) != length:
                raise ValueError("short entry")
            os.utime(path)
            return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            with self._lock:
                self.rejected += 1
            self._remove(path)
            return None

    def put(self, key: str, first: int, stop: int, data) -> bool:
        """Store samples [first, stop); removes this instance's claim of that range, stored or not."""
        path = self._dir(key) / f"{first:010d}-{stop:010d}-{crc(data):08x}.bin"
        try:
            if not self._write(path, data, key):
                return False
        finally:
            self.release(key, first, stop)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known[key] = sorted(known + [(first, stop, path)])
        return True

    def get_blob(self, key: str, name: str) -> bytes | None:
        """A small whole object stored with `put_blob`, checked against its checksum (None if absent or
        damaged)."""
        try:
            found = [n for n in os.listdir(self._dir(key)) if n.startswith(f"{name}-") and n.endswith(".blob")]
        except FileNotFoundError:
            return None
        for n in found:
            path = self._dir(key) / n
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if crc(data) == _crc_of(n):
                os.utime(path)
                return data
            with self._lock:
                self.rejected += 1
            self._remove(path)
        return None

    def put_blob(self, key: str, name: str, data: bytes) -> bool:
        return self._write(self._dir(key) / f"{name}-{crc(data):08x}.blob", data)

    # ----------------------------------------------------------------------------------------------
    # Claims (single flight across the processes sharing the folder).

    def state(self, key: str, first: int, stop: int) -> list[tuple[int, int, str]]:
        """[first, stop) cut into runs held by an entry, busy (a live claim: a process, maybe this one, is
        fetching it) or missing, as on disk now."""
        entries, claims = self._scan(key)
        self._remember(key, entries)
        live = [(a, b) for a, b, path in claims if self._alive(path)]
        return _runs(first, stop, [(a, b) for a, b, _ in entries], live)

    def claim(self, key: str, ranges: list[tuple[int, int]]) -> list[bool]:
        """Claim each range for this instance where no entry and no live claim overlaps it (atomically across
        processes). A granted claim ends with `put` or `release` of the same range."""
        if self.full:
            return [False] * len(ranges)
        with self._locked(key) as folder:
            if folder is None:
                return [False] * len(ranges)
            entries, claims = self._scan(key)
            taken = [(a, b) for a, b, _ in entries]
            for a, b, path in claims:
                if self._alive(path):
                    taken.append((a, b))
                else:
                    self._remove(path)
            out = []
            for a, b in ranges:
                ok = not any(x < b and a < y for x, y in taken)
                if ok:
                    ok = self._touch(folder / f".claim-{a:010d}-{b:010d}-{os.getpid()}-{self.token}")
                    taken.append((a, b))
                out.append(ok)
        return out

    def release(self, key: str, first: int, stop: int) -> None:
        with self._locked(key):  # (renames and releases under the lock: `claim` sees an entry or its claim)
            self._remove(self._dir(key) / f".claim-{first:010d}-{stop:010d}-{os.getpid()}-{self.token}")

    def wait(self, key: str, first: int, stop: int, timeout: float = CLAIM_TTL) -> bool:
        """Wait until entries cover [first, stop), or no live claim of another covers what is missing (it
        failed, or gave up). True when covered."""
        delay, deadline = 0.005, time.monotonic() + timeout
        while True:
            runs = self.state(key, first, stop)
            if all(s == HELD for _, _, s in runs):
                return True
            if not any(s == BUSY for _, _, s in runs) or time.monotonic() > deadline:
                # A listing that ran while the entry was renamed into place and its claim removed can miss
                # both; one that starts after it cannot, so look once more before giving up.
                return all(s == HELD for _, _, s in self.state(key, first, stop))
            time.sleep(delay)
            delay = min(0.1, delay * 1.5)

    def _alive(self, path: Path) -> bool:
        parts = path.name.split("-")
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        if age > CLAIM_TTL:
            return False
        if parts[4][:8] != _HOST:
            return True  # another host's claim (a shared folder): trusted until it is old
        try:
            os.kill(int(parts[3]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    @contextmanager
    def _locked(self, key: str):
        """An exclusive flock of the shard's lock file (None when the folder cannot be made: disk full)."""
        folder = self._dir(key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._stop_writing(e)
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield folder
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _touch(self, path: Path) -> bool:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except OSError as e:
            self._stop_writing(e)
            return False

    # ----------------------------------------------------------------------------------------------
    # Writing and the bound.

    def _write(self, path: Path, data, key: str | None = None) -> bool:
        """Write under a temporary name, then rename (under the shard's lock when `key` is given)."""
        if self.full or len(data) > self.max_bytes // 2:
            return False  # one entry must not flush the cache
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            if key is None:
                os.replace(tmp, path)
            else:
                with self._locked(key):
                    os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._stop_writing(e)
            return False
        with self._lock:
            self._total += len(data)
            self._written += len(data)
            over = self._total > self.max_bytes or self._written > self.max_bytes // 10
        if over:
            self._evict()
        return True

    def _stop_writing(self, e: OSError) -> None:
        """A write that failed: a full disk (or a read-only or forbidden folder) turns writing off for good."""
        if e.errno == errno.ENOENT or self.full:
            return  # (a folder removed under a concurrent write: this entry only)
        self.full = f"{self.root}: {os.strerror(e.errno) if e.errno else e}"
        warnings.warn(f"cache: {self.full}; caching stops, training goes on reading from storage", stacklevel=2)

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for top in os.scandir(self.root):
            if not top.is_dir():
                continue
            for shard in os.scandir(top.path):
                if not shard.is_dir():
                    continue
                for e in os.scandir(shard.path):
                    if e.name == LOCK or e.name.startswith(".claim-"):
                        continue  # the lock must stay one inode; claims are cleared by `claim`
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    if e.name.startswith(".") and time.time() - st.st_mtime < 3600:
                        continue  # another process is writing it
                    out.append((st.st_mtime, st.st_size, Path(e.path)))
        return out

    def _measure(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _evict(self) -> None:
        with self._lock:
            files = sorted(self._files(), key=lambda f: f[0])
            total = sum(size for _, size, _ in files)
            target = int(self.max_bytes * 0.9)
            for _, size, path in files:
                if total <= target:
                    break
                if self._remove(path):
                    total -= size
                    self.evicted += 1
            self._total, self._written = total, 0
            self._known.clear()
            self._verified.clear()  # a removed entry's inode may come back under the same name

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def size(self) -> int:
        return self._measure()


def _crc_of(name: str) -> int:
    """The checksum a file name carries (`...-<crc>.bin` / `.blob`); -1 when it carries none."""
    stem = name.rsplit(".", 1)[0]
    try:
        return int(stem.rsplit("-", 1)[1], 16)
    except (IndexError, ValueError):
        return -1


def covers(entries: list[tuple[int, int, Path]], first: int, stop: int) -> bool:
    """Whether the entries together hold every sample of [first, stop)."""
    pos = first
    for a, b, _ in entries:  # sorted by first sample
        if a > pos:
            break
        pos = max(pos, b)
        if pos >= stop:
            return True
    return pos >= stop


Ranges = list[tuple[int, int]]


def _runs(first: int, stop: int, held: Ranges, busy: Ranges) -> list[tuple[int, int, str]]:
    """[first, stop) cut at the edges of `held` and `busy` ranges into (a, b, state) runs; held wins."""
    points = sorted({first, stop, *(x for r in held + busy for x in r if first < x < stop)})
    at = {x: i for i, x in enumerate(points)}

    def depth(ranges: Ranges) -> list[int]:  # how many ranges cover each elementary run
        d = [0] * len(points)
        for a, b in ranges:
            if a < stop and first < b:
                d[at[max(a, first)]] += 1
                d[at[min(b, stop)]] -= 1
        return list(accumulate(d))

    h, k = depth(held), depth(busy)
    out: list[tuple[int, int, str]] = []
    for i, (a, b) in enumerate(zip(points, points[1:])):
        s = HELD if h[i] else BUSY if k[i] else MISSING
        if out and out[-1][2] == s:
            out[-1] = (out[-1][0], b, s)
        else:
            out.append((a, b, s))
    return out
