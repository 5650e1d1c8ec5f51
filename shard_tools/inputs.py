"""What `--data` (and the Python API's `data=`) accepts, turned into shard sets.

    sets = open_shard_sets("/d/pool,/d/more-{000000..000009}.tar,s3://b/set")

`data` is a comma-separated string (commas inside `{...}` belong to a brace pattern) or a list. Each location is:
- a shard-set folder or URL with `index.json`: read as it is (shardset.load_shard_set);
- local WebDataset tars without an index: a folder of `.tar` files, one `.tar`, or a pattern of them
  (webdataset's braces, `/d/pool-{000000..000099}.tar`, and `*`/`?`/`[...]` globs). Tars in a shard-set
  folder whose `index.json` lists them all are taken from that index. Others are indexed on the fly (tar headers
  only) into a cache folder, `$XDG_CACHE_HOME/stream-ssl/indexes/NAME-HASH` (`cache_dir`), HASH of the tars'
  paths, sizes and mtimes: links to the tars, their `.idx` files and `index.json`, built in a temporary folder
  and published with one rename. Readers use it like any shard set (the links are followed), a later or
  concurrent run reuses it, a changed tar gets a new entry, and nothing is written next to the user's tars;
- tars at a URL (`s3://b/pool/pool-{000000..000009}.tar`, one tar, a `*` glob): the shards with those names in
  their folder's `index.json`; object stores are not indexed on the fly, the error names the command that does.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from braceexpand import braceexpand

from shard_tools.outputs import LocalOutput
from shard_tools.quantities import plural
from shard_tools.shardset import ShardSet, load_shard_set
from shard_tools.storage import is_url, join, redact

CACHE_VERSION = 1  # in every cache entry's hash: a new layout never reuses an old entry
INDEX_HINT = "write one with `shard-tools index {folder}`"


def open_shard_sets(data: str | os.PathLike | Sequence[str | os.PathLike], storage_options: dict | None = None,
                    cache_dir: str | Path | None = None) -> list[ShardSet]:
    """The shard sets `data` names (see the module docstring), in order; a URL pattern spanning several folders
    gives one set per folder. `storage_options` apply to URLs; `cache_dir` holds the indexes made for local
    tars (default ~/.cache/stream-ssl/indexes). Raises FileNotFoundError or ValueError with one line.

    Example: `open_shard_sets("/data/laion/{00000..00099}.tar")` -> [ShardSet] over those 100 tars."""
    if isinstance(data, (str, os.PathLike)):
        locations = split_locations(data) if isinstance(data, str) else [os.fspath(data)]
    else:
        locations = [os.fspath(x).strip() for x in data if os.fspath(x).strip()]
    if not locations:
        raise ValueError("--data: no shard set given")
    sets: list[ShardSet] = []
    for location in locations:
        sets += open_location(location, storage_options, cache_dir)
    return sets


def split_locations(text: str) -> list[str]:
    """`--data`'s comma-separated locations; a comma inside `{...}` belongs to a brace pattern."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth <= 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def open_location(location: str, storage_options: dict | None = None,
                  cache_dir: str | Path | None = None) -> list[ShardSet]:
    """The shard set(s) of one `--data` location."""
    if is_url(location):
        return url_sets(location, storage_options)
    path = location[len("file://"):] if location.startswith("file://") else location
    if os.path.isfile(os.path.join(path, "index.json")) and not _is_pattern(path):
        return [load_shard_set(location, storage_options)]
    tars = local_tars(path)
    return [indexed_subset(tars) or cached_set(tars, set_name(path), cache_dir)]


def _is_pattern(location: str) -> bool:
    return any(c in location for c in "{*?[")


def local_tars(path: str) -> list[str]:
    """Absolute paths of the tars that `path` (a folder, a `.tar`, a brace/glob pattern) names, sorted naturally.
    Raises FileNotFoundError naming a missing path or a pattern part that matches nothing."""
    if _is_pattern(path):
        tars = []
        for item in braceexpand(path):
            magic = any(c in item for c in "*?[")
            found = glob.glob(item) if magic else [item] if os.path.exists(item) else []
            if not found:
                where = f" (from {path})" if item != path else ""
                raise FileNotFoundError(f"{item}: {'no file matches' if magic else 'no such file'}{where}")
            tars += found
    elif os.path.isdir(path):
        tars = [os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tar")]
        if not tars:
            raise FileNotFoundError(f"{path}: not a shard set (no index.json) and no .tar files in it")
    elif os.path.exists(path):
        tars = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    for t in tars:
        if not (t.endswith(".tar") and os.path.isfile(t)):
            raise ValueError(f"{t}: not a .tar file (--data takes shard-set folders, folders of .tar files, "
                             ".tar files and brace patterns of them)")
    from shard_tools.index import natural_key  # (the tar indexer, and PIL behind it, only where tars are given)

    return sorted({os.path.abspath(t) for t in tars}, key=natural_key)


def set_name(path: str) -> str:
    """The name of a set made from tars: the folder's name, or a tar's or pattern's file name up to its first
    digit, brace or glob (`pool` for `pool-{000000..000099}.tar`), else the name of the folder holding them."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if not os.path.isdir(path):
        name = re.split(r"[{*?\[\d]", name)[0].removesuffix(".tar").strip("-_.")
        name = name or os.path.basename(os.path.dirname(path))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("_") or "tars"


def restrict(shard_set: ShardSet, paths: Iterable[str]) -> ShardSet:
    """`shard_set` with only the shards whose paths are in `paths`, in the set's own order. Its shards' `.idx`
    are read from their files: the index packs number the whole set's shards."""
    wanted = set(paths)
    shards = tuple(s for s in shard_set.shards if s.path in wanted)
    total = sum(s.samples for s in shards)
    meta = {**shard_set.meta, "num_samples": total, "idx_packs": [],
            "shards": [s for s in shard_set.meta.get("shards", []) if s.get("path") in wanted]}
    return dataclasses.replace(shard_set, shards=shards, num_samples=total, meta=meta, packs=())


def indexed_subset(tars: list[str]) -> ShardSet | None:
    """The tars as shards of the shard set they already belong to: all in one folder whose `index.json` lists
    every one of them. None otherwise (they are then indexed on the fly)."""
    folder = os.path.dirname(tars[0])
    if any(os.path.dirname(t) != folder for t in tars) or not os.path.isfile(os.path.join(folder, "index.json")):
        return None
    full = load_shard_set(folder)
    names = [os.path.basename(t) for t in tars]
    if not set(names) <= {s.path for s in full.shards}:
        return None
    return restrict(full, names)


def url_sets(location: str, storage_options: dict | None = None) -> list[ShardSet]:
    """A shard-set URL, or tars at a URL (one, a brace pattern, a `*` glob of file names) taken from their
    folder's `index.json`: one set per folder."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    if not (location.endswith(".tar") or "{" in location or "*" in name):
        try:
            return [load_shard_set(location, storage_options)]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}: `shard-tools index {redact(location.rstrip('/'))}`") from None
    folders: dict[str, list[str]] = {}
    for item in braceexpand(location):
        folder, _, name = item.rpartition("/")
        folders.setdefault(folder, []).append(name)
    return [url_subset(folder, names, location, storage_options) for folder, names in folders.items()]


def url_subset(folder: str, names: list[str], location: str, storage_options: dict | None = None) -> ShardSet:
    """The shards of the shard set at `folder` whose paths match `names` (file names or `*` globs)."""
    hint = INDEX_HINT.format(folder=redact(folder))
    try:
        full = load_shard_set(folder, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{redact(location)}: no index for these tars; {hint}") from None
    listed = [s.path for s in full.shards]
    chosen: list[str] = []
    for name in names:
        found = fnmatch.filter(listed, name)
        if not found:
            raise FileNotFoundError(f"{redact(join(folder, name))}: not listed in {redact(join(folder, 'index.json'))}"
                                    f"; {hint}")
        chosen += found
    return restrict(full, chosen)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where indexes of local tars live: `cache_dir`, else $XDG_CACHE_HOME (~/.cache)/stream-ssl/indexes."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stream-ssl" / "indexes"


def cache_entry(tars: list[str], name: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of `tars` as they are now: NAME-HASH, HASH of their paths, sizes and mtimes."""
    stats = [os.stat(t) for t in tars]
    ident = json.dumps([CACHE_VERSION, [[t, s.st_size, s.st_mtime_ns] for t, s in zip(tars, stats)]])
    return cache_root(cache_dir) / f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def cached_set(tars: list[str], name: str, cache_dir: str | Path | None = None) -> ShardSet:
    """A shard set over local tars through the cache: built (in a temporary folder, renamed into place whole) on
    the first use, read back unchanged later. A concurrent builder's entry wins; both are the same."""
    entry = cache_entry(tars, name, cache_dir)
    if not (entry / "index.json").is_file():
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            build_set(tmp, tars, name)
            try:
                os.rename(tmp, entry)
            except OSError:
                if not (entry / "index.json").is_file():
                    raise OSError(f"{entry}: cannot publish the index of {tars[0]} there (a folder without "
                                  "index.json is in the way: remove it)") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # (gone after the rename; links are removed, not followed)
    return load_shard_set(str(entry))


def index_shard(output, tar: str, **kw):
    """shard_tools.index.index_shard, imported when tars are indexed (it brings the tar scanner and PIL)."""
    from shard_tools.index import index_shard as index

    return index(output, tar, **kw)


def build_set(folder: Path, tars: list[str], name: str, workers: int = 8) -> dict:
    """Links to `tars`, their `.idx` files and, last, `index.json` in `folder`; returns the index. Tars without
    samples are left out. Raises ValueError naming the first bad tar (unreadable, truncated)."""
    from shard_tools.writer import make_index, write_index

    links = [os.path.basename(t) for t in tars]
    if len(set(links)) < len(links):  # the same file name in several folders
        links = [f"{i:06d}-{link}" for i, link in enumerate(links)]
    for link, tar in zip(links, tars):
        os.symlink(tar, folder / link)
    output = LocalOutput(folder, create=False)
    with ThreadPoolExecutor(max(1, min(workers, len(tars)))) as ex:
        results = list(ex.map(lambda link: index_shard(output, link, checksum=False), links))
    bad = [r.problem.replace(output.location(link), tar) for tar, link, r in zip(tars, links, results) if r.problem]
    if bad:
        more = f" (and {plural(len(bad) - 1, 'more bad tar')})" if len(bad) > 1 else ""
        raise ValueError(bad[0] + more)
    shards = [r.info for r in results if r.info.samples > 0]
    if not shards:
        raise ValueError(f"{tars[0]}{' ...' if len(tars) > 1 else ''}: the tars hold no samples")
    index = make_index(name, shards, source="real", seed=None,
                       fields=sorted(set().union(*(r.exts for r in results))),
                       labels={"column": None, "names": []},
                       indexed={"from": "existing tars", "tars": tars, "checksums": False,
                                "left_out": [t for t, r in zip(tars, results) if r.info.samples == 0]})
    write_index(output, index)
    return index
