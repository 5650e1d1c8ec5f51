"""The shard-set contract shared by `shard_tools` (writer) and `stream_ssl` (reader).

A shard set is a folder with `NAME-000000.tar` shards, one DALI-style `.idx` per shard (wds2idx v1.2)
and `index.json`, which is written last: a folder without it is not a shard set.

Index packs: `index-000000.idxpack`, `index-000001.idxpack`, ... hold the `.idx` texts of up to IDX_PACK_SHARDS
consecutive shards each, end to end, byte for byte; index.json's `idx_packs` lists them (path, first shard,
each shard's byte offset in the pack plus the end, size, sha256). A reader fetches one object for a thousand
shards instead of one `.idx` each, or, when it reads few of a pack's shards, one shard's range of it. The
per-shard `.idx` files stay (DALI reads them); a set without `idx_packs` (written before, or by other tools)
is read through them.
"""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass

import numpy as np

from shard_tools.storage import BucketNotFound, join, read_location, redact

FORMAT = "stream-ssl-shards"
VERSION = 1
IDX_VERSION = "v1.2"
TAR_BLOCK = 512
IDX_PACK_SHARDS = 1000  # shards per index pack: a set of S shards has ceil(S / 1000) packs
# Members the reader will ever decode. Anything else (notably .pyd/.pickle) is ignored, never unpickled.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAFE_EXTS = IMAGE_EXTS + ("cls", "json", "txt")


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the shard-set folder
    samples: int
    bytes: int
    sha256: str = ""


@dataclass(frozen=True)
class IdxPack:
    """One index pack: the `.idx` texts of shards [first, first + len(offsets) - 1), shard first + j's at bytes
    [offsets[j], offsets[j + 1])."""

    path: str  # relative to the shard-set folder
    first: int
    offsets: tuple[int, ...]
    bytes: int
    sha256: str

    @property
    def stop(self) -> int:
        return self.first + len(self.offsets) - 1


@dataclass(frozen=True)
class ShardSet:
    url: str  # folder URL: local path, s3://..., http(s)://...
    name: str
    source: str
    num_samples: int
    shards: tuple[ShardInfo, ...]
    labels: tuple[str, ...]
    meta: dict
    packs: tuple[IdxPack, ...] = ()  # index packs (empty: one `.idx` per shard only)

    def shard_url(self, i: int) -> str:
        return join(self.url, self.shards[i].path)

    def idx_url(self, i: int) -> str:
        return join(self.url, idx_name(self.shards[i].path))

    def pack_of(self, i: int) -> int | None:
        """The number of the index pack holding shard `i`'s `.idx` text, None when the set has no packs."""
        return i // IDX_PACK_SHARDS if self.packs else None

    def pack_url(self, k: int) -> str:
        return join(self.url, self.packs[k].path)


def idx_pack_name(k: int) -> str:
    return f"index-{k:06d}.idxpack"


def idx_name(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + ".idx" if tar_path.endswith(".tar") else tar_path + ".idx"


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off meanwhile: parsing a million shards makes millions of objects, and every
    collection on the way would walk them all again (three times slower at 1M shards)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_collector_paused()
def load_shard_set(url: str, storage_options: dict | None = None, retries: int = 3) -> ShardSet:
    """Read and check `index.json` of the shard set at `url` (local or any fsspec URL). `storage_options` are
    the run's options (flat or per protocol, see shard_tools.storage); transient errors are retried. A missing
    bucket and missing or refused credentials raise storage.BucketNotFound / StorageAccessDenied, saying so."""
    index_url = join(url, "index.json")
    where = redact(index_url)
    try:
        meta = json.loads(read_location(index_url, storage_options, retries))
    except BucketNotFound:
        raise  # (says so, naming the bucket: not "not a shard set")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{redact(url)}: not a shard set (no index.json). Pack a manifest with shard_tools/pack.py, "
            "or index existing tars with shard_tools/index.py"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise ValueError(f"{where}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        shards = tuple(
            ShardInfo(path=s["path"], samples=int(s["samples"]), bytes=int(s["bytes"]), sha256=s.get("sha256", ""))
            for s in meta["shards"]
        )
        total = int(meta["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed shard list or num_samples ({e!r})") from None
    if sum(s.samples for s in shards) != total:
        raise ValueError(f"{where}: num_samples={total} but shards hold {sum(s.samples for s in shards)}")
    packs = _packs(meta.get("idx_packs") or [], len(shards), where)
    return ShardSet(
        url=url.rstrip("/"),
        name=str(meta.get("name", "")),
        source=str(meta.get("source", "")),
        num_samples=total,
        shards=shards,
        labels=tuple(meta.get("labels", {}).get("names", []) or []),
        meta=meta,
        packs=packs,
    )


def _packs(entries: list, shards: int, where: str) -> tuple[IdxPack, ...]:
    """The `idx_packs` of index.json, checked: pack k holds shards [1000k, min(1000(k+1), shards)), its offsets
    rise from 0 to its size. ValueError (naming the field) otherwise."""
    packs = []
    try:
        for k, e in enumerate(entries):
            offsets = np.asarray(e["offsets"])
            if offsets.dtype.kind not in "iu" or offsets.ndim != 1:
                raise ValueError(f"pack {k}: offsets must be a list of integers")
            pack = IdxPack(str(e["path"]), int(e["first"]), tuple(offsets.tolist()), int(e["bytes"]),
                           str(e.get("sha256", "")))
            want = (k * IDX_PACK_SHARDS, min((k + 1) * IDX_PACK_SHARDS, shards))
            rising = bool(np.all(np.diff(offsets) > 0))
            if (pack.first, pack.stop) != want or pack.offsets[0] != 0 or pack.offsets[-1] != pack.bytes or not rising:
                raise ValueError(f"pack {k} does not hold shards {want[0]}-{want[1] - 1} end to end")
            packs.append(pack)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{where}: malformed idx_packs ({e})") from None
    if packs and packs[-1].stop != shards:
        raise ValueError(f"{where}: malformed idx_packs (they end at shard {packs[-1].stop}, the set has {shards})")
    return tuple(packs)


def format_idx(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """wds2idx v1.2 text: a header line, then one line per sample of `ext data_offset size member_name`."""
    lines = [f"{IDX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members))
    return "\n".join(lines) + "\n"


def parse_idx(text: str, where: str = ".idx") -> list[list[tuple[str, int, int, str]]]:
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{where}: empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] != IDX_VERSION:
        raise ValueError(f"{where}: first line must be '{IDX_VERSION} <count>', got {lines[0]!r}")
    count = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise ValueError(f"{where}: header says {count} samples, found {len(body)} lines")
    samples = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{where}:{n}: expected groups of 'ext offset size name'")
        samples.append(
            [(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)]
        )
    return samples


def sample_boundaries(samples: list[list[tuple[str, int, int, str]]]) -> np.ndarray:
    """Byte offsets where each sample's tar records start, plus the end of the last sample (n + 1 values).

    A sample starts right after the previous one ends (the data end rounded up to a 512-byte block), so any
    extended headers (pax, GNU long names) in front of its members belong to it. The first starts at 0.
    """
    first = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in samples], out=first[1:])
    ends = np.array([offset + size for members in samples for _, offset, size, _ in members], dtype=np.int64)
    return boundaries_of(ends, first)


def boundaries_of(ends: np.ndarray, first: np.ndarray) -> np.ndarray:
    """`sample_boundaries` from the members' data ends (offset + size, in member order) and where each sample's
    members start among them (`first`, n + 1 values)."""
    bounds = np.zeros(len(first), dtype=np.int64)
    if len(first) > 1:
        bounds[1:] = -(-np.maximum.reduceat(ends, first[:-1]) // TAR_BLOCK) * TAR_BLOCK
    return bounds


def shard_name(name: str, i: int) -> str:
    """File name of shard `i` of a packed set: `NAME-000000.tar`."""
    return f"{name}-{i:06d}.tar"


def parse_tar_bytes(data: bytes, where: str) -> list[dict]:
    """Group the members of a tar fragment into samples: [{'__key__': key, ext: bytes, ...}] in order.
    (For tars without an `.idx`; the reader itself cuts samples with the `.idx`.)"""
    import io
    import tarfile

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


def split_member(name: str) -> tuple[str, str] | None:
    """(key, ext) of a tar member the way readers group samples: the key is the folder plus the file name up
    to its first dot, the extension everything after it. None for members without an extension."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.partition(".")
    if not dot:
        return None
    return name[: len(name) - len(base)] + stem, ext


def group_members(members: list[tuple[str, int, int]], where: str = "tar") -> list[list[tuple[str, int, int, str]]]:
    """Group regular-file members `(name, data_offset, size)`, in archive order, into `.idx` samples.

    Consecutive members sharing a key form one sample, as the reader and DALI group them. Members without an
    extension are left out (the reader skips them too). Names with whitespace cannot be written to a `.idx`.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    for name, offset, size in members:
        parts = split_member(name)
        if parts is None:
            continue
        key, ext = parts
        if not ext or any(c.isspace() for c in name):
            raise ValueError(f"{where}: member name {name!r} has whitespace or an empty extension; "
                             "a .idx cannot describe it")
        if key != last_key:
            samples.append([])
            last_key = key
        samples[-1].append((ext, offset, size, name))
    return samples


def scan_tar(fileobj, size: int | None = None, where: str = "tar") -> list[list[tuple[str, int, int, str]]]:
    """Read the headers of a tar archive (seeking over member data when the file allows) and return its
    samples in `.idx` form. Raises ValueError when the archive is unreadable or truncated."""
    import tarfile

    members = []
    end = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for m in tar:
                end = m.offset_data + (-(-m.size // TAR_BLOCK) * TAR_BLOCK if m.isreg() else 0)
                if m.isreg():
                    members.append((m.name, m.offset_data, m.size))
    except tarfile.TarError as e:
        raise ValueError(f"{where}: not a readable tar archive ({e})") from None
    if size is not None:
        check_tar_end(members, end, size, where)
    return group_members(members, where)


def check_tar_end(members: list[tuple[str, int, int]], end: int, size: int, where: str) -> None:
    """Raise ValueError when the archive is cut short: a member's data, or the end-of-archive blocks
    (two zero blocks after the last member), lie beyond `size` bytes."""
    for name, offset, length in members:
        if offset + length > size:
            raise ValueError(f"{where}: truncated: member {name} ends at byte {offset + length}, file has {size}")
    if size < end + 2 * TAR_BLOCK:
        raise ValueError(f"{where}: truncated: no end-of-archive blocks after byte {end} (file has {size})")


def finished_index(output, section: str, digest: str, name: str | None = None, mine=None) -> dict | None:
    """The index.json of `output` (a shard_tools.storage.Output) when the run that wrote it had the settings
    hashing to `digest` (recorded as index[section]["config_sha256"]), the same `name` if given, and every
    shard (every shard whose path `mine(path)` accepts, if given) still has its recorded sha256 and size; else
    None. Lets a re-run of a finished job (or of one part of it) do nothing."""
    data = output.read_bytes("index.json")
    if not data:
        return None
    try:
        index = json.loads(data)
        if (index.get(section) or {}).get("config_sha256") != digest or name not in (None, index.get("name")):
            return None
        if not shards_intact(output, index, mine):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return index


def shards_intact(output, index: dict, mine=None) -> bool:
    """Every shard listed in `index` (that `mine(path)` accepts, if given) is in `output` with its recorded
    sha256 and size."""
    return all(output.sha256(s["path"]) == (s["sha256"], s["bytes"]) for s in index["shards"]
               if mine is None or mine(s["path"]))

