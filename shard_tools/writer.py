"""Write samples into WebDataset tar shards with DALI `.idx` files; publish the index packs, then `index.json` last.

Every file is written under a temporary name and renamed (or, for object stores, uploaded) when complete,
so a crash never leaves a partial shard or index that looks finished. Tar headers carry no time, user or
host, so the same samples always give byte-identical shards. Shards are streamed to disk as samples
arrive: memory stays at one sample, whatever the shard size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

from shard_tools.errors import ToolError
from shard_tools.outputs import LocalOutput, Output
from shard_tools.quantities import format_bytes, plural
from shard_tools.shardset import (
    FORMAT,
    IDX_PACK_SHARDS,
    TAR_BLOCK,
    VERSION,
    ShardInfo,
    format_idx,
    idx_name,
    idx_pack_name,
    shard_name,
)

RECORD = tarfile.RECORDSIZE  # tarfile pads archives to whole 10 KiB records; we do the same
END_OF_ARCHIVE = 2 * TAR_BLOCK


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tarfile_header(name: str, size: int) -> bytes:
    return _member(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


# The parts of our USTAR headers that never change (mode 644, uid/gid 0, mtime 0, no user names, regular
# file), so a header is three concatenations and a small checksum instead of tarfile's field by field build.
_MODE_IDS = b"0000644\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_REST = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64 + b"\0" * 16 + b"\0" * 155 + b"\0" * 12  # no device numbers
_CONSTANT_SUM = sum(_MODE_IDS) + sum(_MTIME) + sum(_REST) + 8 * ord(" ")


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a member, byte for byte what tarfile writes for it. USTAR only: a name
    that does not fit raises instead of adding a pax header, which keeps every member's data exactly 512
    bytes after its header."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        return _tarfile_header(name, size)  # long names split into prefix/name (or raise); huge sizes raise
    size_field = b"%011o\0" % size
    chksum = _CONSTANT_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, b"\0" * (100 - len(raw)), _MODE_IDS, size_field, _MTIME, b"%06o\0 " % chksum, _REST))


def check_key(key: str) -> None:
    if not key or "." in key or "/" in key or any(c.isspace() for c in key):
        raise ValueError(f"sample key {key!r} must be non-empty without '.', '/' or whitespace")


def sample_tar_size(key: str, fields: dict[str, bytes]) -> int:
    """Bytes the sample takes in a tar: a header per member plus its data rounded up to a block."""
    return sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in fields.values())


def archive_size(data_bytes: int) -> int:
    """Final size of a tar whose members take `data_bytes`: end-of-archive blocks, padded to a record."""
    return -(-(data_bytes + END_OF_ARCHIVE) // RECORD) * RECORD


_ZEROS = bytes(TAR_BLOCK)
BATCH_BYTES = 1 << 20


class _Background:
    """Writes and hashes chunks in a thread: both release the GIL, so they overlap with the caller's work."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.room = threading.BoundedSemaphore(32)  # at most this many batches waiting: bounded memory
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tar-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            chunks = self.queue.get()
            if chunks is None:
                return
            try:
                if self.error is None:
                    for c in chunks:
                        self.digest.update(c)
                    self.f.write(b"".join(chunks))
            except BaseException as e:  # reported to the caller by put() or close()
                self.error = e
            finally:
                self.room.release()

    def put(self, chunks: list[bytes]) -> None:
        if self.error is not None:
            raise self.error
        self.room.acquire()
        self.queue.put(chunks)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class TarStream:
    """Writes a deterministic tar to a binary file, hashing it and recording the `.idx` as it goes.

    With `background`, writing and hashing happen in a thread; call `close()` before using the file."""

    def __init__(self, f, background: bool = False):
        self.f = f
        self.pos = 0
        self.hash = hashlib.sha256()
        self.index: list[list[tuple[str, int, int, str]]] = []
        self._bg = _Background(f, self.hash) if background else None
        self._batch: list[bytes] = []  # chunks handed to the background thread together (fewer switches)
        self._batch_bytes = 0

    def _emit(self, chunks: list[bytes], size: int, last: bool = False) -> None:
        if self._bg is None:
            for c in chunks:
                self.f.write(c)
                self.hash.update(c)
            return
        self._batch.extend(chunks)
        self._batch_bytes += size
        if last or self._batch_bytes >= BATCH_BYTES:
            self._bg.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        check_key(key)
        members = []
        chunks = []
        pos = self.pos
        for ext, data in fields.items():
            name = f"{key}.{ext}"
            n = len(data)
            chunks.append(member_header(name, n))
            pos += TAR_BLOCK
            members.append((ext, pos, n, name))
            chunks.append(data)
            pad = -n % TAR_BLOCK
            if pad:
                chunks.append(_ZEROS[:pad])
            pos += n + pad
        self._emit(chunks, pos - self.pos)
        self.pos = pos
        self.index.append(members)

    def close(self) -> None:
        end = archive_size(self.pos)
        self._emit([bytes(end - self.pos)], end - self.pos, last=True)
        self.pos = end
        if self._bg is not None:
            self._bg.close()

    def abort(self) -> None:
        if self._bg is not None:
            self._bg.queue.put(None)
            self._bg.thread.join()


class ShardWriteError(ToolError, OSError):
    """A shard that could not be written (a full disk, a failed upload): one line naming it. The shards before it
    are complete and kept, and the partial file is removed."""


class ShardWriter:
    """Streams samples into `NAME-%06d.tar` (+ `.idx`), starting a new shard every `shard_size` samples or
    before a sample that would take the shard past `shard_bytes` (a shard always holds at least one sample).

    `out` is a local folder or an `Output` (see storage.py). `shards` continues an earlier, verified run.
    `on_shard(info, idx_text)` is called after each shard is published. `names(i)` is the file name of the
    writer's shard i (default `NAME-%06d.tar`).
    """

    def __init__(self, out: Path | Output, name: str, shard_size: int = 1000, shard_bytes: int | None = None,
                 shards: list[ShardInfo] | None = None, on_shard=None, names: Callable[[int], str] | None = None):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if shard_bytes is not None and shard_bytes < RECORD:
            raise ValueError(f"shard_bytes must be >= {RECORD}")
        self.output = out if isinstance(out, Output) else LocalOutput(out)
        self.out = Path(self.output.url) if isinstance(self.output, LocalOutput) else self.output.url
        self.name, self.shard_size, self.shard_bytes = name, shard_size, shard_bytes
        self.shards: list[ShardInfo] = list(shards or [])
        self.on_shard = on_shard
        self.names = names or (lambda i: shard_name(name, i))
        self._file = None
        self._tmp: Path | None = None
        self._tar: TarStream | None = None

    @property
    def pending(self) -> int:
        return len(self._tar.index) if self._tar else 0

    @property
    def full(self) -> bool:
        return self.pending >= self.shard_size

    def fits(self, key: str, fields: dict[str, bytes]) -> bool:
        """Whether the sample can join the current shard without passing `shard_bytes`."""
        if self.shard_bytes is None or not self.pending:
            return True
        return archive_size(self._tar.pos + sample_tar_size(key, fields)) <= self.shard_bytes

    def add(self, key: str, fields: dict[str, bytes], flush: bool = True) -> None:
        """Append a sample. With `flush`, shards are closed automatically at the size limits."""
        if flush and not self.fits(key, fields):
            self.flush()
        try:
            if self._tar is None:
                self._tmp = self.output.staging(self.names(len(self.shards)))
                self._file = open(self._tmp, "wb", buffering=1 << 20)
                self._tar = TarStream(self._file, background=True)
            self._tar.add(key, fields)
        except OSError as e:
            raise self._failed(e) from e
        if flush and self.full:
            self.flush()

    def flush(self) -> ShardInfo | None:
        """Close and publish the current shard: `.idx` first, then the tar under its final name."""
        if self._tar is None:
            return None
        tar, tar_name = self._tar, self.names(len(self.shards))
        try:
            tar.close()
            self._file.close()  # no fsync: a resumed run re-verifies every kept shard's sha256 (index.json is synced)
            idx_text = format_idx(tar.index)
            self.output.write_bytes(idx_name(tar_name), idx_text.encode())
            self.output.publish(self._tmp, tar_name)
        except OSError as e:
            raise self._failed(e) from e
        self._tar = self._file = self._tmp = None
        info = ShardInfo(tar_name, len(tar.index), tar.pos, tar.hash.hexdigest())
        self.shards.append(info)
        if self.on_shard is not None:
            self.on_shard(info, idx_text)
        return info

    def abort(self) -> None:
        """Drop the shard being written (its temporary file)."""
        if self._file is not None:
            self._tar.abort()
            try:
                self._file.close()
            except OSError:  # what was left to flush cannot be written either (a full disk)
                pass
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None

    def _failed(self, error: OSError) -> ShardWriteError:
        """The one-line error for a shard that could not be written, after removing what it left."""
        name = self.names(len(self.shards))
        self.abort()
        self.output.remove(idx_name(name))
        free = ""
        if isinstance(self.output, LocalOutput):
            free = f" ({format_bytes(shutil.disk_usage(self.output.root).free)} free there)"
        n = len(self.shards)
        before = f"the {plural(n, 'shard')} before it {'is' if n == 1 else 'are'} complete and kept" if n else \
            "no shard was finished before it"
        return ShardWriteError(f"could not write shard {self.output.location(name)}: {error.strerror or error}{free}; "
                               f"{before}")

    def finish(self, **meta) -> dict:
        """Write the last shard, then `index.json`: the step that makes the folder a shard set."""
        self.flush()
        index = make_index(self.name, self.shards, **meta)
        write_index(self.output, index)
        return index


def make_index(name: str, shards: list[ShardInfo], **meta) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "num_samples": sum(s.samples for s in shards),
        **meta,
        "shards": [vars(s) for s in shards],
    }


def index_bytes(index: dict) -> bytes:
    return (json.dumps(index, indent=1) + "\n").encode()


def write_index(output: Output, index: dict) -> None:
    """Publish `index.json` of the shards that `index` lists, after their index packs (shard_tools/shardset.py),
    which are made from the `.idx` files in `output` and recorded in `index` as `idx_packs`. Packs of an
    earlier, larger set in the folder are removed."""
    shards = index.pop("shards")
    packs = write_idx_packs(output, [s["path"] for s in shards])
    if packs:
        index["idx_packs"] = packs
    index["shards"] = shards  # (last: index.json reads best with the long list at the end)
    old = {e for e in output.list() if e.startswith("index-") and e.endswith(".idxpack")}
    for stale in sorted(old - {p["path"] for p in packs}):
        output.remove(stale)
    output.write_bytes("index.json", index_bytes(index), durable=True)


def write_idx_packs(output: Output, paths: list[str], threads: int = 16) -> list[dict]:
    """Write the index packs of the shards `paths` (in set order) from their `.idx` files in `output`; return
    their `idx_packs` entries. A shard without a `.idx` (an empty set, an index.json of other tools) means no
    packs: []."""
    from concurrent.futures import ThreadPoolExecutor

    packs = []
    with ThreadPoolExecutor(threads) as pool:
        for k, first in enumerate(range(0, len(paths), IDX_PACK_SHARDS)):
            texts = list(pool.map(output.read_bytes, [idx_name(p) for p in paths[first:first + IDX_PACK_SHARDS]]))
            if any(t is None for t in texts):
                return []
            data = b"".join(texts)
            offsets = [0, *itertools.accumulate(len(t) for t in texts)]
            output.write_bytes(idx_pack_name(k), data, durable=True)
            packs.append({"path": idx_pack_name(k), "first": first, "offsets": offsets, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    return packs
