"""Where shard sets are written and images are read: local folders or any fsspec URL (s3://, http(s)://).

Outputs publish whole files only. A local output writes `NAME.tmp` and renames it; a remote output stages
the file in a local temporary folder and uploads it when complete (an object store PUT is atomic: the object
appears whole or not at all), so a reader never sees half a shard in either case.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import fsspec

from shard_tools.errors import ToolError

LOCK_NAME = ".writer.lock"  # in a local output folder: held (flock) by the tool writing it
PROTOCOL_KEYS = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "hf", "ftp", "sftp", "memory")
TRANSIENT = (ConnectionError, TimeoutError, OSError)


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def options_for(storage_options: dict | None, protocol: str) -> dict:
    """Storage options for `protocol`: either `{protocol: {...}, ...}` or one flat dict for every remote one."""
    if not storage_options:
        return {}
    if any(k in PROTOCOL_KEYS and isinstance(v, dict) for k, v in storage_options.items()):
        opts = storage_options.get(protocol, {})
        if protocol == "https" and not opts:
            opts = storage_options.get("http", {})
        return dict(opts)
    return {} if protocol == "file" else dict(storage_options)


_FS: dict[tuple, fsspec.AbstractFileSystem] = {}


# Environment that decides where an object store client connects and as whom: part of the cache key, so that
# a process whose endpoint or credentials change (a test server restarted, another profile) gets a new client.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID")


def filesystem(url: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    protocol = protocol_of(url)
    opts = options_for(storage_options, protocol)
    key = (os.getpid(), protocol, repr(sorted(opts.items())), tuple(os.environ.get(k) for k in _CLIENT_ENV))
    fs = _FS.get(key)
    if fs is None:  # our own cache: fsspec's would hand back a client made for another endpoint
        fs = _FS[key] = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
    return fs


def join(folder: str, name: str) -> str:
    if is_url(folder):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)


def parent(location: str) -> str:
    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).resolve().parent)


def resolve(location: str, root: str) -> str:
    """`location` as given when absolute or a URL, else relative to `root` (a folder or a URL)."""
    if is_url(location) or location.startswith("file://"):
        return location[len("file://"):] if location.startswith("file://") else location
    if os.path.isabs(location):
        return location
    return join(root, location)


def read_location(location: str, storage_options: dict | None = None, retries: int = 3,
                  backoff: float = 0.5) -> bytes:
    """All bytes of a local file or URL. Transient remote errors are retried; FileNotFoundError never is."""
    if not is_url(location):
        with open(location, "rb") as f:
            return f.read()
    fs = filesystem(location, storage_options)
    for attempt in range(retries + 1):
        try:
            return fs.cat_file(location)
        except FileNotFoundError:
            raise
        except Exception as e:  # fsspec backends raise many types (aiohttp, botocore, ...)
            if _is_not_found(e):
                raise FileNotFoundError(str(e)) from e
            if attempt == retries or not _is_transient(e):
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def _status(e: Exception) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    return None


def _is_not_found(e: Exception) -> bool:
    return _status(e) in (404, 410)


def _is_transient(e: Exception) -> bool:
    status = _status(e)
    if status is not None:
        return status in (408, 429) or status >= 500
    return isinstance(e, TRANSIENT) or "timeout" in type(e).__name__.lower()


def sha256_stream(f, chunk: int = 1 << 22) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while True:
        b = f.read(chunk)
        if not b:
            return h.hexdigest(), n
        h.update(b)
        n += len(b)


class Output:
    """A folder that receives whole files."""

    url: str

    def staging(self, name: str) -> Path:
        """A local path to write `name` to before `publish`."""
        raise NotImplementedError

    def publish(self, tmp: Path, name: str) -> None:
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes, durable: bool = False) -> None:
        """Publish `data` as `name` at once. `durable`: also survive a power cut (fsync), not only a crash."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes | None:
        raise NotImplementedError

    def sha256(self, name: str) -> tuple[str, int] | None:
        """(sha256, size) of a published file, None when it does not exist."""
        raise NotImplementedError

    def open_read(self, name: str):
        """A binary file object (seekable) of a published file."""
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files directly in the folder (or in `prefix`, a subfolder), relative to it."""
        raise NotImplementedError

    def location(self, name: str) -> str:
        return join(self.url, name)

    def lock(self, holder: str) -> None:
        """Be the only writer of this folder until `close`. Object stores have no locks: two writers of one
        remote prefix are not detected (local folders: see LocalOutput.lock)."""

    def close(self) -> None:
        pass


class LocalOutput(Output):
    def __init__(self, folder: str | Path, create: bool = True):
        self.root = Path(folder)
        self.url = str(self.root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")

    def staging(self, name: str) -> Path:
        path = self.root / (name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, tmp: Path, name: str) -> None:
        os.replace(tmp, self.root / name)

    def write_bytes(self, name: str, data: bytes, durable: bool = False) -> None:
        tmp = self.staging(name)
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.root / name)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def sha256(self, name: str) -> tuple[str, int] | None:
        try:
            with open(self.root / name, "rb") as f:
                return sha256_stream(f)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def open_read(self, name: str):
        return open(self.root / name, "rb")

    def size(self, name: str) -> int | None:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        path = self.root / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        folder = self.root / prefix if prefix else self.root
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != LOCK_NAME)

    _lock_fd: int | None = None

    def lock(self, holder: str) -> None:
        """An exclusive flock on FOLDER/.writer.lock until `close`, which removes the file; a second writer
        fails at once, naming the first. The kernel drops a flock when its process dies, so a killed run
        leaves no stale lock (only the file, which the next run takes over)."""
        path = self.root / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ToolError(f"{self.root} is being written by {who}; wait for it to finish, or use another "
                                "output folder") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its holder removed on release: take the one at the path now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            (self.root / LOCK_NAME).unlink(missing_ok=True)  # while still holding it
            os.close(self._lock_fd)
            self._lock_fd = None


class RemoteOutput(Output):
    """An fsspec folder (s3://bucket/prefix, ...): files are staged locally and uploaded when complete."""

    def __init__(self, url: str, storage_options: dict | None = None, tmp_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        self.fs = filesystem(self.url, storage_options)
        self.fs.invalidate_cache(self.url)  # listings cached by an earlier use may be stale
        self._stage = Path(tempfile.mkdtemp(prefix="shard-stage-", dir=tmp_dir))

    def staging(self, name: str) -> Path:
        path = self._stage / name.replace("/", "__")
        return path

    def publish(self, tmp: Path, name: str) -> None:
        self.fs.put_file(str(tmp), self.location(name))
        tmp.unlink(missing_ok=True)
        self.fs.invalidate_cache(self.url)

    def write_bytes(self, name: str, data: bytes, durable: bool = False) -> None:
        self.fs.pipe_file(self.location(name), data)
        self.fs.invalidate_cache(self.url)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.location(name))
        except FileNotFoundError:
            return None

    def sha256(self, name: str) -> tuple[str, int] | None:
        self.fs.invalidate_cache(self.location(name))
        try:
            with self.fs.open(self.location(name), "rb", block_size=1 << 22) as f:
                return sha256_stream(f)
        except FileNotFoundError:
            return None

    def open_read(self, name: str):
        self.fs.invalidate_cache(self.location(name))
        return self.fs.open(self.location(name), "rb", block_size=1 << 22)

    def size(self, name: str) -> int | None:
        self.fs.invalidate_cache(self.location(name))
        try:
            return int(self.fs.size(self.location(name)))
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        loc = self.location(name)
        try:
            if self.fs.isdir(loc):
                self.fs.rm(loc, recursive=True)
            else:
                self.fs.rm_file(loc)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.url)

    def list(self, prefix: str = "") -> list[str]:
        folder = self.location(prefix) if prefix else self.url
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")

    def close(self) -> None:
        shutil.rmtree(self._stage, ignore_errors=True)


def open_output(out: str | Path, storage_options: dict | None = None, tmp_dir: str | Path | None = None,
                create: bool = True) -> Output:
    """The output folder `out` (local or URL). Without `create`, a missing local folder raises."""
    out = str(out)
    if out.startswith("file://"):
        out = out[len("file://"):]
    if is_url(out):
        return RemoteOutput(out, storage_options, tmp_dir)
    return LocalOutput(out, create)
