"""Turn existing WebDataset tars (img2dataset output, LAION-style shards, any tar set) into a shard set.

    shard-tools index DIR [--name NAME] [--source S] [--workers 8] [--no-checksum] [--skip-bad]

Nothing is repacked: for every `*.tar` directly in DIR (local or an fsspec URL) this writes a DALI-style
`.idx` next to it and, last, `index.json` listing the shards with their sample counts, sizes and sha256,
so the set streams as-is. img2dataset's per-shard `*_stats.json` is used where present: when it exists
together with a `.idx` whose sample count equals the stats' `successes`, that `.idx` is reused without
reading the tar's headers (failed downloads leave gaps in the keys, so only the successes count); in
every other case the tar's headers are scanned. A stats count that disagrees with the scan marks the
shard bad. Shards that hold no sample are left out and reported.

The samples' own json is left untouched: `--source` is recorded in `index.json` only.
Bad shards (unreadable, truncated, member names a `.idx` cannot hold) are named on stderr; without
--skip-bad no `index.json` is written and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shard_tools.cli import run_main, tool_prog
from shard_tools.errors import ToolError
from shard_tools.outputs import Output, open_output, sha256_stream
from shard_tools.quantities import plural
from shard_tools.scan import scan_shard
from shard_tools.shardset import ShardInfo, format_idx, idx_name, parse_idx
from shard_tools.storage import STORAGE_OPTIONS_HELP, storage_options_arg
from shard_tools.writer import make_index, write_index

SOURCES = ("real", "yfcc", "crawled", "generated", "downstream")


class IndexingError(ToolError):
    """Indexing failed as a whole (no tars, bad shards, no folder)."""


@dataclass
class Indexed:
    info: ShardInfo | None
    exts: set[str]
    how: str  # "stats+idx" or "scanned"
    problem: str = ""


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _successes(output: Output, stem: str) -> int | None:
    data = output.read_bytes(f"{stem}_stats.json")
    if data is None:
        return None
    try:
        value = json.loads(data).get("successes")
        return int(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _headers_agree(output: Output, tar: str, samples: list) -> bool:
    """Whether an existing `.idx` still describes `tar`: the tar headers in front of the first and last
    samples' first members carry the sizes the `.idx` gives. A shard rewritten with the same number of
    samples (a re-run of img2dataset) fails this, and is scanned again instead of trusted."""
    if not samples:
        return False
    try:
        with output.open_read(tar) as f:
            for members in (samples[0], samples[-1]):
                _, offset, size, name = members[0]
                f.seek(offset - 512)
                header = f.read(512)
                if len(header) != 512 or header[257:262] != b"ustar":
                    return False
                if int(header[124:136].rstrip(b"\0 ").decode() or "0", 8) != size:
                    return False
                short = header[:100].rstrip(b"\0").decode("utf-8", "replace")
                if len(name) <= 100 and short != name:
                    return False
    except (OSError, ValueError):
        return False
    return True


def index_shard(output: Output, tar: str, checksum: bool = True) -> Indexed:
    stem = tar[: -len(".tar")]
    where = output.location(tar)
    successes = _successes(output, stem)
    old = output.read_bytes(idx_name(tar))
    samples = None
    how = "scanned"
    try:
        if successes is not None and old is not None:
            try:
                reused = parse_idx(old.decode(), output.location(idx_name(tar)))
            except (ValueError, UnicodeDecodeError):
                reused = None
            if reused is not None and len(reused) == successes and _headers_agree(output, tar, reused):
                samples, how = reused, "stats+idx"
        if samples is not None and checksum:  # .idx reused: only the checksum (and size) are needed
            with output.open_read(tar) as f:
                sha, size = sha256_stream(f)
        elif samples is not None:
            sha, size = None, output.size(tar)
            if size is None:
                raise FileNotFoundError(f"{where}: no such file")
        else:
            with output.open_read(tar) as f:
                scan = scan_shard(f, where, checksum=checksum)
            sha, size, samples = scan.sha256, scan.size, scan.samples
    except (OSError, ValueError) as e:
        return Indexed(None, set(), how, str(e))
    if how == "stats+idx":
        end = max((o + n for members in samples for _, o, n, _ in members), default=0)
        if end > size:
            return Indexed(None, set(), how, f"{where}: its .idx reaches byte {end}, the tar has {size}")
    elif successes is not None and successes != len(samples):
        return Indexed(None, set(), how, f"{where}: {stem}_stats.json says {plural(successes, 'success', 'successes')}"
                                         f", the tar holds {plural(len(samples), 'sample')}")
    text = format_idx(samples)
    if old is None or old.decode(errors="replace") != text:
        output.write_bytes(idx_name(tar), text.encode())
    exts = {ext.lower() for members in samples for ext, _, _, _ in members}
    return Indexed(ShardInfo(tar, len(samples), size, sha or ""), exts, how)


def index_folder(folder: str, name: str | None = None, source: str = "real", workers: int = 8,
                 checksum: bool = True, skip_bad: bool = False, storage_options: dict | None = None) -> dict:
    """Write `.idx` files and `index.json` for the tars in `folder`; return the index. Raises IndexingError."""
    try:
        output = open_output(folder, storage_options, create=False)
    except FileNotFoundError as e:
        raise IndexingError(str(e)) from None
    try:
        output.lock("index.py")
        tars = sorted((n for n in output.list() if n.endswith(".tar")), key=natural_key)
        if not tars:
            raise IndexingError(f"no .tar files in {folder}")
        with ThreadPoolExecutor(max(1, workers)) as ex:
            results = list(ex.map(lambda t: index_shard(output, t, checksum), tars))
        bad = [r.problem for r in results if r.problem]
        empty = [t for t, r in zip(tars, results) if r.info is not None and r.info.samples == 0]
        for t in empty:
            print(f"note: {output.location(t)} holds no samples; left out", file=sys.stderr)
        if bad:
            for problem in bad:
                print(f"BAD {problem}", file=sys.stderr)
            if not skip_bad:
                raise IndexingError(f"{len(bad)} of {plural(len(tars), 'shard')} {'is' if len(bad) == 1 else 'are'} "
                                    "bad (listed above); no index.json was written. Fix or remove them, or pass "
                                    "--skip-bad to leave them out")
        shards = [r.info for r in results if r.info is not None and r.info.samples > 0]
        if not shards:
            raise IndexingError(f"no usable shards in {folder}")
        exts = set().union(*(r.exts for r in results if r.info is not None))
        index = make_index(
            name or folder.rstrip("/").rsplit("/", 1)[-1],
            shards,
            source=source,
            seed=None,
            fields=sorted(exts),
            labels={"column": None, "names": []},
            indexed={
                "from": "existing tars",
                "reused_idx": sum(r.how == "stats+idx" for r in results if r.info is not None),
                "scanned": sum(r.how == "scanned" for r in results if r.info is not None),
                "left_out": sorted([t for t, r in zip(tars, results) if r.info is None] + empty, key=natural_key),
                "checksums": checksum,
            },
        )
        write_index(output, index)
        return index
    finally:
        output.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=tool_prog("index.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder (or URL) holding the .tar shards")
    p.add_argument("--name", help="shard set name (default: the folder's name)")
    p.add_argument("--source", default="real", choices=SOURCES, help="recorded in index.json (default real)")
    p.add_argument("--workers", type=int, default=8, help="shards indexed at once (threads; default 8)")
    p.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True,
                   help="sha256 of every tar (a full read); --no-checksum: shard-tools verify then checks sizes only "
                        "(default: on)")
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, default=False,
                   help="leave bad shards out instead of failing (default: off)")
    p.add_argument("--storage-options", type=storage_options_arg, help=STORAGE_OPTIONS_HELP)
    a = p.parse_args(argv)

    def run() -> int:
        start = time.perf_counter()
        index = index_folder(a.folder, a.name, a.source, a.workers, a.checksum, a.skip_bad, a.storage_options)
        info = index["indexed"]
        print(f"indexed {plural(index['num_samples'], 'sample')} in {plural(len(index['shards']), 'shard')} at "
              f"{a.folder} "
              f"({info['reused_idx']} .idx reused from stats, {info['scanned']} scanned"
              f"{', ' + str(len(info['left_out'])) + ' left out' if info['left_out'] else ''}) "
              f"in {time.perf_counter() - start:.1f}s")
        return 0

    return run_main("index", run, log_folder=a.folder)


if __name__ == "__main__":
    sys.exit(main())
