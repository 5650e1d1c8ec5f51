"""Check a shard set against its index.

    shard-tools verify DIR [--decode] [--workers 4]

For every shard listed in `index.json` (DIR local or an fsspec URL): the file exists, its size and sha256
match the index, its `.idx` parses, holds the indexed number of samples and describes exactly the members
the tar holds (names, data offsets, sizes), and sample keys are unique across the set; each index pack has the
size and sha256 the index records and holds every shard's `.idx` byte for byte. With --decode,
every image is fully decoded, every json parsed and every .cls read as an integer.

Presence and sizes come from one listing of the folder (shard_tools/listing.py, as train.py checks them before
training); `--no-contents` stops there, without reading any shard.

Prints one line per bad shard (`BAD NAME-000003.tar: reason; reason`) and a summary; exits 1 when anything
is wrong, 0 when the set is sound.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shard_tools.cli import run_main, tool_prog
from shard_tools.listing import ShardCheck, check_shards
from shard_tools.outputs import Output, open_output
from shard_tools.quantities import plural
from shard_tools.scan import scan_shard
from shard_tools.shardset import (
    ShardInfo,
    ShardSet,
    idx_name,
    load_shard_set,
    parse_idx,
    sample_boundaries,
    split_member,
)
from shard_tools.storage import STORAGE_OPTIONS_HELP, storage_options_arg


@dataclass
class ShardReport:
    path: str
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0


def _first_difference(a: list, b: list) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def verify_shard(output: Output, info: ShardInfo, decode: bool = False, size: int | None = -1,
                 contents: bool = True) -> ShardReport:
    """The problems of one shard. `size`: its size from a listing (None: absent; -1: ask the store)."""
    r = ShardReport(info.path)
    size = output.size(info.path) if size == -1 else size
    if size is None:
        r.problems.append("missing")
        return r
    r.bytes = size
    if size != info.bytes:
        r.problems.append(f"size {size} bytes, index.json says {info.bytes}")
    if not contents:
        return r
    idx = None
    raw = output.read_bytes(idx_name(info.path))
    if raw is None:
        r.problems.append(f"no {idx_name(info.path)}")
    else:
        try:
            idx = parse_idx(raw.decode(), idx_name(info.path))
        except (ValueError, UnicodeDecodeError) as e:
            r.problems.append(f"unreadable .idx ({e})")
    if idx is not None:
        if len(idx) != info.samples:
            r.problems.append(f".idx holds {plural(len(idx), 'sample')}, index.json says {info.samples}")
        end = int(sample_boundaries(idx)[-1]) if idx else 0
        if end > size:
            r.problems.append(f".idx reaches byte {end}, the file has {size}")
    try:
        with output.open_read(info.path) as f:
            scan = scan_shard(f, info.path, checksum=bool(info.sha256), decode=decode)
    except (OSError, ValueError) as e:
        r.problems.append(str(e).removeprefix(f"{info.path}: "))
        return r
    if info.sha256 and scan.sha256 != info.sha256:
        r.problems.append(f"sha256 {scan.sha256[:12]}..., index.json says {info.sha256[:12]}...")
    if idx is not None and scan.samples != idx:
        i = _first_difference(scan.samples, idx)
        r.problems.append(f".idx disagrees with the tar's members from sample {i} "
                          f"(tar has {plural(len(scan.samples), 'sample')}, .idx {len(idx)})")
    if len(scan.samples) != info.samples and (idx is None or len(idx) == info.samples):
        r.problems.append(f"tar holds {plural(len(scan.samples), 'sample')}, index.json says {info.samples}")
    for bad in scan.bad_members[:5]:
        r.problems.append(bad)
    if len(scan.bad_members) > 5:
        r.problems.append(f"... {plural(len(scan.bad_members) - 5, 'more bad member')}")
    r.samples = len(scan.samples)
    r.keys = [split_member(members[0][3])[0] for members in scan.samples]
    return r


def verify_pack(output: Output, shard_set: ShardSet, k: int) -> ShardReport:
    """The problems of index pack `k`: missing, another size or sha256 than index.json records, or a shard's
    range of it that differs from the shard's `.idx` file."""
    pack = shard_set.packs[k]
    r = ShardReport(pack.path)
    data = output.read_bytes(pack.path)
    if data is None:
        r.problems.append("missing (index.json lists it in idx_packs)")
        return r
    if len(data) != pack.bytes or hashlib.sha256(data).hexdigest() != pack.sha256:
        r.problems.append(f"size {len(data)} bytes or its sha256 differ from index.json's ({pack.bytes} bytes)")
        return r
    differ = [shard_set.shards[i].path for i in range(pack.first, pack.stop)
              if data[pack.offsets[i - pack.first]:pack.offsets[i - pack.first + 1]]
              != output.read_bytes(idx_name(shard_set.shards[i].path))]
    if differ:
        r.problems.append(f"holds another .idx than the file of {plural(len(differ), 'shard')} (e.g. {differ[0]}); "
                          "rewrite the index with shard_tools/index.py")
    return r


def listed_reports(check: ShardCheck) -> list[tuple[int | None, list[str]]]:
    """Per shard of a whole-set listing: (listed size or None, problems the listing shows: a missing .idx)."""
    info = check.shard_set.shards
    return [(None if size < 0 else int(size), [] if has or size < 0 else [f"no {idx_name(info[i].path)}"])
            for i, size, has in zip(check.shards.tolist(), check.sizes.tolist(), check.has_idx.tolist())]


def verify(url: str, decode: bool = False, workers: int = 4, storage_options: dict | None = None,
           out=sys.stdout, contents: bool = True) -> bool:
    """Print a report on the shard set at `url`; True when it is sound. Presence and sizes come from one listing
    (shard_tools/listing.py); `contents` (default) also reads every shard."""
    start = time.perf_counter()
    try:
        shard_set = load_shard_set(url, storage_options)
    except (FileNotFoundError, ValueError) as e:
        print(f"BAD {url}: {e}", file=out)
        return False
    check = check_shards(shard_set, storage_options=storage_options)
    listed = listed_reports(check) if check.listed else [(-1, [])] * len(shard_set.shards)
    output = open_output(url, storage_options, create=False)

    def one(i: int) -> ShardReport:
        size, problems = listed[i]
        report = verify_shard(output, shard_set.shards[i], decode, size, contents)
        if not contents:  # (reading the shard finds a missing .idx itself)
            report.problems += problems
        return report

    try:
        if contents:
            with ThreadPoolExecutor(max(1, workers)) as ex:
                reports = list(ex.map(one, range(len(shard_set.shards))))
        else:
            reports = [one(i) for i in range(len(shard_set.shards))]
        packs = [verify_pack(output, shard_set, k) for k in range(len(shard_set.packs))] if contents else []
    finally:
        output.close()
    seen: dict[str, str] = {}
    for r in reports:
        dups = [k for k in r.keys if k in seen]
        if dups:
            r.problems.append(f"{plural(len(dups), 'sample key')} also in {seen[dups[0]]} (e.g. {dups[0]})")
        for k in r.keys:
            seen.setdefault(k, r.path)
        if len(set(r.keys)) != len(r.keys):
            r.problems.append("repeated sample keys within the shard")
    bad = [r for r in reports + packs if r.problems]
    for r in bad:
        print(f"BAD {r.path}: {'; '.join(r.problems)}", file=out)
    for n in check.extra:
        print(f"note: {n} is in the folder but not in index.json", file=out)
    total = sum(r.samples for r in reports)
    mb = sum(r.bytes for r in reports) / 1e6
    verdict = f"{len(bad)} bad" if bad else "all good"
    shards = plural(len(reports), "shard")
    what = (f"verified {shards}, {plural(total, 'sample')}, {mb:.1f} MB{' (decoded)' if decode else ''}" if contents
            else f"listed {shards}, {mb:.1f} MB (presence, sizes and .idx files only)")
    print(f"{what} at {url} in {time.perf_counter() - start:.1f}s: {verdict}", file=out)
    return not bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=tool_prog("verify.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="shard set folder or URL")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=False,
                   help="also decode every image, parse every json and .cls (default: off)")
    p.add_argument("--contents", action=argparse.BooleanOptionalAction, default=True,
                   help="read every shard (checksums, .idx against the tar's members); --no-contents: only one "
                        "listing of the folder: every shard present with its recorded size, and its .idx "
                        "(what stream-ssl train checks before training; default: on)")
    p.add_argument("--workers", type=int, default=4, help="shards checked at once (threads; default 4)")
    p.add_argument("--storage-options", type=storage_options_arg, help=STORAGE_OPTIONS_HELP)
    a = p.parse_args(argv)
    return run_main("verify", lambda: 0 if verify(a.folder, a.decode, a.workers, a.storage_options,
                                                  contents=a.contents) else 1, log_folder=a.folder)


if __name__ == "__main__":
    sys.exit(main())
