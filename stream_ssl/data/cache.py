"""Repeat-aware local cache: byte ranges of shards kept on local disk, size-bounded, least recently used out.

With passes E > 1 every sample is read again in a later pass. The reader stores the sample ranges it fetches
from remote storage (an `s3://` or `http(s)://` shard) while later passes will still need them, and serves
any later request for samples it holds from here, so repeats do not go back to the object store.

Layout: `ROOT/<k[:2]>/<k>/<first>-<stop>.bin` holds samples [first, stop) of one shard (its tar bytes from
the first sample's boundary to the stop sample's boundary, as the `.idx` gives them), and `ROOT/<k[:2]>/<k>/idx`
the shard's `.idx`. `k` hashes the shard URL (credentials stripped) with its size and sha256 from
`index.json`, so a re-packed shard never matches stale entries. Files are written under a temporary name and
renamed, so several processes (DataLoader workers, ranks on one node) can share one folder; a hit refreshes the
file's mtime, and eviction removes the oldest files until the total is under 90% of the limit. The total is
re-measured from disk whenever this process's estimate passes the limit or it has written a tenth of it, so
concurrent writers keep it near the bound.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from shard_tools.storage import redact


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
        self._known: OrderedDict[str, list] = OrderedDict()  # entries seen per shard (refreshed on a miss)

    @staticmethod
    def shard_key(url: str, nbytes: int = 0, sha256: str = "") -> str:
        return hashlib.sha256(f"{redact(url)}\n{nbytes}\n{sha256}".encode()).hexdigest()[:40]

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    # ----------------------------------------------------------------------------------------------

    def entries(self, key: str, refresh: bool = True) -> list[tuple[int, int, Path]]:
        """(first, stop, path) of the sample ranges held for a shard, sorted. Without `refresh`, what this
        process last saw (other processes' new entries show up on the next refresh)."""
        if not refresh:
            with self._lock:
                known = self._known.get(key)
                if known is not None:
                    self._known.move_to_end(key)
                    return known
        found = self._list(key)
        with self._lock:
            self._known[key] = found
            self._known.move_to_end(key)
            while len(self._known) > 4096:
                self._known.popitem(last=False)
        return found

    def forget(self, key: str) -> None:
        with self._lock:
            self._known.pop(key, None)

    def _list(self, key: str) -> list[tuple[int, int, Path]]:
        try:
            names = os.listdir(self._dir(key))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if not name.endswith(".bin"):
                continue
            first, _, stop = name[:-4].partition("-")
            if first.isdigit() and stop.isdigit():
                out.append((int(first), int(stop), self._dir(key) / name))
        out.sort()
        return out

    def read(self, path: Path, offset: int, length: int, expected_size: int | None = None) -> bytes | None:
        """`length` bytes at `offset` of an entry; None if it vanished (evicted) or is damaged."""
        try:
            with open(path, "rb") as f:
                if expected_size is not None and os.fstat(f.fileno()).st_size != expected_size:
                    raise ValueError("size mismatch")
                f.seek(offset)
                data = f.read(length)
            if len(data) != length:
                raise ValueError("short entry")
            os.utime(path)
            return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self._remove(path)
            return None

    def put(self, key: str, first: int, stop: int, data: bytes) -> bool:
        path = self._dir(key) / f"{first:010d}-{stop:010d}.bin"
        if not self._write(path, data):
            return False
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known[key] = sorted(known + [(first, stop, path)])
        return True

    def get_blob(self, key: str, name: str) -> bytes | None:
        path = self._dir(key) / name
        try:
            data = path.read_bytes()
            os.utime(path)
            return data
        except OSError:
            return None

    def put_blob(self, key: str, name: str, data: bytes) -> bool:
        return self._write(self._dir(key) / name, data)

    # ----------------------------------------------------------------------------------------------

    def _write(self, path: Path, data: bytes) -> bool:
        if len(data) > self.max_bytes // 2:
            return False  # one entry must not flush the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        with self._lock:
            self._total += len(data)
            self._written += len(data)
            over = self._total > self.max_bytes or self._written > self.max_bytes // 10
        if over:
            self._evict()
        return True

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for top in os.scandir(self.root):
            if not top.is_dir():
                continue
            for shard in os.scandir(top.path):
                if not shard.is_dir():
                    continue
                for e in os.scandir(shard.path):
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

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def size(self) -> int:
        return self._measure()
