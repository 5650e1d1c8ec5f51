"""Output folders that receive whole files: a local folder or any fsspec URL (s3://, http(s)://, ...).

Outputs publish whole files only. A local output writes `NAME.tmp` and renames it; a remote output stages
the file in a local temporary folder and uploads it when complete (an object store PUT is atomic: the object
appears whole or not at all), so a reader never sees half a shard in either case. Remote outputs use the
process's client from `shard_tools.storage.filesystem`, like every reader.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from shard_tools.errors import ToolError
from shard_tools.storage import check_access, filesystem, is_url, join

LOCK_NAME = ".writer.lock"  # in a local output folder: held (flock) by the tool writing it


def lock_name(scope: str = "") -> str:
    """The lock file of one writer of a folder: `.writer.lock` for the whole folder, `.writer.SCOPE.lock` for a
    writer that shares it with others writing other files (pack.py --part K/N: scope part-K-of-N)."""
    return f".writer.{scope}.lock" if scope else LOCK_NAME


def is_lock_file(name: str) -> bool:
    return name.startswith(".writer.") and name.endswith(".lock")


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

    def folders(self) -> list[str]:
        """Names of the subfolders directly in the folder (hidden ones included)."""
        raise NotImplementedError

    def location(self, name: str) -> str:
        return join(self.url, name)

    def lock(self, holder: str, scope: str = "") -> None:
        """Be the only writer of this folder (or, with `scope`, of that part of it) until `close`. Object stores
        have no locks: two writers of one remote prefix are not detected (local folders: see LocalOutput.lock)."""

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
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise

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
        return sorted(p.name for p in folder.iterdir() if p.is_file() and not is_lock_file(p.name))

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    _lock_fd: int | None = None
    _lock_path: Path | None = None

    def lock(self, holder: str, scope: str = "") -> None:
        """An exclusive flock on FOLDER/.writer.lock until `close`, which removes the file; a second writer
        fails at once, naming the first. The kernel drops a flock when its process dies, so a killed run
        leaves no stale lock (only the file, which the next run takes over). `scope`: see Output.lock."""
        path = self.root / lock_name(scope)
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
        self._lock_fd, self._lock_path = fd, path

    def close(self) -> None:
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)  # while still holding it
            os.close(self._lock_fd)
            self._lock_fd = None


class RemoteOutput(Output):
    """An fsspec folder (s3://bucket/prefix, ...): files are staged locally and uploaded when complete."""

    def __init__(self, url: str, storage_options: dict | None = None, tmp_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        self.fs = filesystem(self.url, storage_options)
        check_access(self.url, storage_options, self.fs)  # a missing bucket or refused credentials, before any work
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

    def folders(self) -> list[str]:
        self.fs.invalidate_cache(self.url)
        try:
            entries = self.fs.ls(self.url, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

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
