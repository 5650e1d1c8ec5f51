"""Packing in parts: which shards part K of N writes, which rows they hold, and the records a pack run leaves.

The shuffled order of the usable rows (shard_tools.shuffle) is cut into blocks of --shard-size positions:
block k holds the rows at positions [k S, (k+1) S) that could be packed, in position order, and becomes the
shard `NAME-k.tar` (with --shard-bytes a block that would pass the size continues in `NAME-k_1.tar`, ...).
A block depends on its own rows only, so part K of N writes the contiguous blocks [(K-1) B // N, K B // N) of
the B blocks, and parts that together cover every block write exactly the files one run writes. Sample keys
are the positions: unique, in write order. A row that cannot be packed leaves its shard one sample short;
nothing moves up from later rows (that would make every shard depend on all the shards before it).

Records, in `OUT/.NAME-pack/`: one per finished block (`000012.json`: its shards with their checksums, the rows
it skipped, how many of its samples have no label and, with --dedup, the content hashes it kept), written after
the block's files, which is what lets a killed run keep its finished blocks; one per finished part
(`part-2-of-4.json`: the settings, the manifest's counts and label names, the part's shards, skipped rows and
samples without a label), written after its last block. The merge reads the
part records only: N small files, however many shards there are.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from shard_tools.manifest import Row
from shard_tools.outputs import Output
from shard_tools.shardset import ShardInfo, idx_name, shard_name
from shard_tools.shuffle import Shuffle

PART_RECORD = re.compile(r"^part-(\d+)-of-(\d+)\.json$")
BLOCK_RECORD = re.compile(r"^(\d{6,})\.json$")


@dataclass(frozen=True)
class Part:
    """Part `index` (1-based) of `count`; Part(1, 1) is the whole run."""

    index: int = 1
    count: int = 1

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise ValueError(f"--part {self.index}/{self.count}: K/N needs 1 <= K <= N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Part:
        """`K/N` (`3/16`): part K of N, counted from 1."""
        k, slash, n = str(text).partition("/")
        if not slash or not k.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"--part {text!r}: write K/N, e.g. 3/16 (part 3 of 16, counted from 1)")
        return cls(int(k), int(n))

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def scope(self) -> str:
        """Names this part's lock, record and errors file (empty for the whole run)."""
        return "" if self.whole else f"part-{self.index}-of-{self.count}"

    @property
    def last(self) -> bool:
        return self.index == self.count


def part_arg(text: str) -> Part:
    """argparse type of --part."""
    try:
        return Part.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--part {text!r}: ")) from None


@dataclass(frozen=True)
class Layout:
    """Blocks of `shard_size` shuffled positions over `rows` usable rows, and the blocks of `part`."""

    rows: int
    shard_size: int
    part: Part

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.shard_size)

    @property
    def first(self) -> int:
        return (self.part.index - 1) * self.blocks // self.part.count

    @property
    def stop(self) -> int:
        return self.part.index * self.blocks // self.part.count

    @property
    def span(self) -> tuple[int, int]:
        """The shuffled positions [lo, hi) the part packs."""
        return self.first * self.shard_size, min(self.stop * self.shard_size, self.rows)

    def writes(self, block: int | None) -> bool:
        return block is not None and self.first <= block < self.stop

    def owns_files_of(self, block: int) -> bool:
        """Whether the part writes (and so may clean up) the files of `block`; the last part also owns the
        blocks past the end, left by an earlier run with more rows or smaller shards."""
        return self.first <= block < self.stop or (self.part.last and block >= self.stop)


class Assigner:
    """A manifest row sink (see shard_tools.manifest.RowSink) that keeps the rows whose shuffled position lies
    in [lo, hi). The reader asks `wants(index)` for every usable row; positions are computed for a chunk of
    indices at a time, so memory is the kept rows plus one chunk, and rows it does not want are never built."""

    def __init__(self, shuffle: Shuffle, lo: int, hi: int, chunk: int = 1 << 16):
        self.shuffle, self.lo, self.hi, self.chunk = shuffle, lo, hi, chunk
        self._start, self._pos = 0, np.zeros(0, np.int64)
        self._next = -1  # position of the row wanted last, which the reader hands over next
        self.positions = array.array("q")  # 8 bytes a kept row
        self.rows: list[Row] = []

    def wants(self, index: int) -> bool:
        if not self._start <= index < self._start + len(self._pos):
            self._start = index - index % self.chunk
            stop = min(self._start + self.chunk, self.shuffle.n)
            self._pos = self.shuffle(np.arange(self._start, stop, dtype=np.uint64))
        self._next = int(self._pos[index - self._start])
        return self.lo <= self._next < self.hi

    def __call__(self, row: Row) -> None:
        if self._next < 0:
            raise RuntimeError("Assigner: a row handed over without wants(index) first")
        self.positions.append(self._next)
        self.rows.append(row)
        self._next = -1

    def extend(self, rows: list[Row]) -> None:
        """Offer rows held in memory (indices 0, 1, ...): the same rows kept as a reader offering them one by
        one would leave, a chunk at a time."""
        for start in range(0, len(rows), self.chunk):
            pos = self.shuffle(np.arange(start, min(start + self.chunk, len(rows)), dtype=np.uint64))
            keep = np.flatnonzero((pos >= self.lo) & (pos < self.hi))
            self.positions.frombytes(pos[keep].astype(np.int64).tobytes())
            if len(keep) == len(pos):  # the whole run keeps every row
                self.rows.extend(rows[start:start + len(pos)])
            else:
                self.rows.extend([rows[start + i] for i in keep.tolist()])

    def result(self) -> tuple[np.ndarray, list[Row]]:
        """(positions, rows) of the kept rows, in position order."""
        positions = np.frombuffer(self.positions, dtype=np.int64) if self.positions else np.zeros(0, np.int64)
        order = np.argsort(positions, kind="stable")
        return positions[order], [self.rows[i] for i in order]


# ---------------------------------------------------------------------------------------------------
# Files and records in the output folder.


def state_dir(name: str) -> str:
    return f".{name}-pack"


def state_name(folder: str) -> str | None:
    """The shard name whose records a folder holds (`.pool-pack` -> pool), None for another folder."""
    m = re.fullmatch(r"\.(.+)-pack", folder)
    return m.group(1) if m else None


def part_record_names(output: Output) -> list[str]:
    """The shard names (--name) of the runs whose part records are in `output`, sorted."""
    return [name for folder in output.folders() if (name := state_name(folder)) is not None
            and any(PART_RECORD.match(n) for n in output.list(folder))]


def block_record_path(name: str, block: int) -> str:
    return f"{state_dir(name)}/{block:06d}.json"


def part_record_path(name: str, part: Part) -> str:
    return f"{state_dir(name)}/part-{part.index}-of-{part.count}.json"


def piece_name(name: str, block: int, piece: int) -> str:
    """The file of piece `piece` of block `block`: `NAME-000012.tar`, then `NAME-000012_1.tar`, ..."""
    return shard_name(name, block) if piece == 0 else f"{name}-{block:06d}_{piece}.tar"


def _shard_file(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}-(\d{{6,}})(?:_\d+)?\.(?:tar|idx)(\.tmp)?$")


def errors_stem(name: str, part: Part) -> str:
    """`write_errors`'s name for the rows a run skipped: NAME (NAME-errors.csv) for the whole run; a part that
    stops on --max-error-rate lists its own in NAME.part-K-of-N-errors.csv (the merge writes NAME-errors.csv)."""
    return name if part.whole else f"{name}.{part.scope}"


def block_of(name: str, path: str) -> int | None:
    """The block a shard file (`NAME-000012.tar`, `NAME-000012_1.tar`, their .idx) belongs to."""
    m = _shard_file(name).match(path)
    return int(m.group(1)) if m else None


def part_errors_file(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}\.part-\d+-of-\d+-errors\.csv$")


def read_record(output: Output, path: str) -> dict | None:
    data = output.read_bytes(path)
    try:
        record = json.loads(data) if data else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write_record(output: Output, path: str, record: dict) -> None:
    output.write_bytes(path, json.dumps(record, separators=(",", ":")).encode())


def block_record(output: Output, name: str, digest: str, block: int) -> dict | None:
    """The record of a finished block made with the settings `digest` whose files are intact, else None."""
    record = read_record(output, block_record_path(name, block))
    try:
        if record is None or record["config"] != digest or record["block"] != block:
            return None
        for shard, idx_sha in zip(record["shards"], record["idx_sha256"], strict=True):
            info = ShardInfo(**shard)
            idx = output.read_bytes(idx_name(info.path))
            if idx is None or hashlib.sha256(idx).hexdigest() != idx_sha:
                return None
            if output.sha256(info.path) != (info.sha256, info.bytes):
                return None
    except (KeyError, TypeError, ValueError):
        return None
    return record


def kept_blocks(output: Output, name: str, digest: str, layout: Layout, prefix_only: bool = False) -> dict[int, dict]:
    """The part's finished, intact blocks by number. `prefix_only`: only those before the first block to redo
    (--dedup: a block's duplicates are judged against every block before it)."""
    present = {int(m.group(1)) for n in output.list(state_dir(name)) if (m := BLOCK_RECORD.match(n))}
    kept = {}
    for block in range(layout.first, layout.stop):
        record = block_record(output, name, digest, block) if block in present else None
        if record is None and prefix_only:
            break
        if record is not None:
            kept[block] = record
    return kept


def clean_part(output: Output, name: str, digest: str, layout: Layout, kept: dict[int, dict]) -> None:
    """Remove what an interrupted or different earlier run left in the part's share of the folder: temporary
    files, shards and block records of blocks it will write again, the records of parts of other runs."""
    keep = {s["path"] for record in kept.values() for s in record["shards"]}
    keep |= {idx_name(p) for p in keep}
    pattern = _shard_file(name)
    for entry in output.list():
        m = pattern.match(entry)
        if m and layout.owns_files_of(int(m.group(1))) and (m.group(2) or entry not in keep):
            output.remove(entry)
    state = state_dir(name)
    for entry in output.list(state):
        b, p = BLOCK_RECORD.match(entry), PART_RECORD.match(entry)
        if b and layout.owns_files_of(int(b.group(1))) and int(b.group(1)) not in kept:
            output.remove(f"{state}/{entry}")
        elif p and (int(p.group(2)) != layout.part.count or int(p.group(1)) == layout.part.index
                    or _other_run(read_record(output, f"{state}/{entry}"), digest)):
            output.remove(f"{state}/{entry}")
    if not layout.part.whole:
        output.remove(f"{errors_stem(name, layout.part)}-errors.csv")


def _other_run(record: dict | None, digest: str) -> bool:
    """A readable part record of a run with other settings (one that cannot be read is left alone: it may be
    another part's, being written right now on an object store that lists it first)."""
    return record is not None and record.get("config") != digest
