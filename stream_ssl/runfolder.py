"""A run folder on object storage: `--out s3://bucket/runs/NAME` (or gs://, az://, any fsspec URL).

On cloud nodes the local disk goes with the node, so a run can keep its folder in a bucket. It then works in a
local mirror (`--local-out`, default ~/.cache/stream-ssl/runs/NAME-HASH) and publishes to the URL:

- at every checkpoint: the run's small files (config, run.json, metrics.csv, keys, the trackers' files), then
  the checkpoint, then `checkpoints/latest`, the pointer a resumed run follows; older checkpoints are pruned as
  locally (`--keep-checkpoints`);
- at the end: the last checkpoint and its pointer as above, then backbone.safetensors, knn.csv, and last
  summary.json, the mark of a finished run.

An object store shows an object only once its upload is complete, and the pointer is written after the object
it names: a run killed during an upload leaves the previous checkpoint as the latest, and a partial upload is
never taken for a checkpoint. On start, the mirror is filled from the URL (the newest checkpoint and the small
files), so `--resume auto` continues the run on any machine, and a rerun of a finished run changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from shard_tools.outputs import RemoteOutput
from shard_tools.storage import is_url, redact
from stream_ssl.errors import RunError

LATEST = "checkpoints/latest"
MARKER = ".mirror-of"  # in a local mirror: the URL it mirrors (a mirror is emptied when its run starts)


def default_mirror(url: str) -> Path:
    """~/.cache/stream-ssl/runs/NAME-HASH ($XDG_CACHE_HOME): one folder per run URL."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = url.rstrip("/").rsplit("/", 1)[-1] or "run"
    return Path(cache) / "stream-ssl" / "runs" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def run_folder(out: str, local_out: str = "") -> Path:
    """The local folder a run works in: `out` itself, or, for a URL, its mirror."""
    if not is_url(out):
        return Path(out)
    return Path(local_out) if local_out else default_mirror(out)


class RemoteRunFolder:
    """The URL of a run folder and its local mirror (one per machine; the main process publishes)."""

    def __init__(self, url: str, local: Path, storage_options: dict | None = None):
        self.url, self.local = url.rstrip("/"), Path(local)
        self.out = RemoteOutput(self.url, storage_options)
        self._sent: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) as last uploaded

    def __str__(self) -> str:
        return redact(self.url)

    def pull(self) -> None:
        """Make the mirror what the URL holds: its small files and its newest checkpoint (an empty URL: an empty
        mirror). What the mirror held before is dropped (the URL is the run); a folder that is not empty and was
        not this URL's mirror is refused, never emptied."""
        marker = self.local / MARKER
        if self.local.exists() and any(self.local.iterdir()) and not (
                marker.is_file() and marker.read_text().strip() == self.url):
            raise RunError(f"--local-out {self.local}: a folder that is not empty and is not the mirror of {self}; "
                           "choose an empty or new folder")
        shutil.rmtree(self.local, ignore_errors=True)
        (self.local / "checkpoints").mkdir(parents=True)
        marker.write_text(self.url + "\n")
        fs, root = self.out.fs, self.out.fs._strip_protocol(self.url)
        fs.invalidate_cache(self.url)
        for path in fs.find(root):
            name = path[len(root):].lstrip("/")
            if name and not name.startswith("checkpoints/"):
                (self.local / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path, str(self.local / name))
        pointer = self.out.read_bytes(LATEST)
        if pointer:
            name = pointer.decode().strip()
            fs.get_file(self.out.location(f"checkpoints/{name}"), str(self.local / "checkpoints" / name))
            (self.local / LATEST).write_bytes(pointer)
        self._sent = {n: _stamp(p) for n, p in self._files()}

    def publish(self, checkpoint: Path | None = None, keep: int = 0, last: tuple[str, ...] = ()) -> None:
        """Upload what changed in the mirror, then `checkpoint` and the pointer to it, then the files of `last`
        (uploaded after everything else); prune the URL's checkpoints to the newest `keep` (0: all)."""
        for name, path in self._files():
            if name not in last and self._sent.get(name) != _stamp(path):
                self._put(path, name)
        if checkpoint is not None:
            self._put(checkpoint, f"checkpoints/{checkpoint.name}")
            self.out.write_bytes(LATEST, (checkpoint.name + "\n").encode())
            if keep > 0:
                for old in sorted(n for n in self.out.list("checkpoints") if n.endswith(".pt"))[:-keep]:
                    self.out.remove(f"checkpoints/{old}")
        for name in last:
            self._put(self.local / name, name)

    def _files(self):
        for path in sorted(self.local.rglob("*")):
            name = path.relative_to(self.local).as_posix()
            if path.is_file() and not name.startswith("checkpoints/") and not name.endswith(".tmp") and name != MARKER:
                yield name, path

    def _put(self, path: Path, name: str) -> None:
        self.out.fs.put_file(str(path), self.out.location(name))
        self._sent[name] = _stamp(path)


def open_remote(cfg, acc) -> RemoteRunFolder | None:
    """The remote run folder of `cfg.out` when it is a URL (None for a local folder), its mirror filled on every
    machine (by each machine's first process; the others wait)."""
    if not is_url(cfg.out):
        return None
    from shard_tools.storage import parse_storage_options

    remote = RemoteRunFolder(cfg.out, run_folder(cfg.out, cfg.local_out), parse_storage_options(cfg.storage_options))
    if acc.local_process_index == 0:
        remote.pull()
    acc.wait_for_everyone()
    return remote


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns
