"""Near-duplicates within shard sets and leakage into downstream sets, from perceptual hashes.

    shard-tools dedup shards/pool --against shards/down_train shards/down_test --report dedup.json
    shard-tools dedup shards/pool --against shards/down_test --report dedup.json \\
        --write-filtered shards/pool_dedup --workers 8

Every image of the SETs (the pretraining pool; several sets count as one pool) and of the --against sets
(downstream data) is hashed; two images are near-copies when their 64-bit pHashes differ in at most --threshold
bits and their 256-bit pHashes in at most --verify-threshold bits (the first finds them, the second confirms).
- groups: near-copies among the pool images (connected components: a ~ b ~ c is one group), listed by key with
  the first in set/shard order as the representative. `near_duplicates` counts the other members: how many of
  the pool's "unique" samples are copies.
- leaked: pool images that are near-copies of a downstream image, each with the downstream keys it matches.
- `--write-filtered OUT`: a new shard set per pool set with one representative per group and without leaked
  images (original member bytes kept, shards and index rebuilt, the same output for the same input), so that a
  plan's N counts distinct images. With several SETs, OUT holds one folder per set (named as the set).
  Samples whose image could not be hashed are left out too, and counted.

pHash (as in the imagehash library and the literature): the image in grayscale, resized to 32 x 32 (Lanczos,
after a JPEG draft-mode decode at >= 64 px, which does not change the hash beyond noise), 2-D DCT-II, the 8 x 8
lowest frequencies, one bit per coefficient: above their median or not (64 bits). The 256-bit pHash takes the
16 x 16 lowest frequencies of the same DCT: more detail, so fewer different images agree on it. Crops: the
central 92% and 85% of each image are hashed too, and matched against the other images' whole-image hashes,
so roughly centred crops of up to ~8% per side are found. The hashes survive resizing, re-encoding, colour
and contrast changes; they are not meant for heavy or off-centre crops, rotations or flips, and being
grayscale layouts they confuse images that differ mainly in colour or in small details on plain backgrounds
(see docs/data-measures.md).

Search: banded LSH that is exact for the threshold (multi-index hashing): the 64 bits are cut into 4 bands
of 16; two hashes within t bits agree within t // 4 bits on at least one band (pigeonhole), so every band
value and its neighbours within t // 4 flips are looked up in a table of band values. Candidates are checked
on all 64 bits, then on the 256-bit hashes. No pair within the threshold is missed. The work per image is
about 548 table probes plus n / 65536 x 548 candidate checks (random hashes, t = 10), so it grows slowly with
the number of images n: measured 58 us per image at 100K images and 440 us at 1M (with the 256-bit check),
against ~830 us of hashing per 500 x 375 photo per core. Images with identical signatures are one node of the search.

Hashing reads each shard once (one ranged read), in `--workers` processes, and keeps the hashes of each shard
in `--cache-dir` (keyed by the shard's sha256): an interrupted run resumes where it stopped, and a run with
another threshold or other --against sets hashes nothing again. Images that cannot be decoded are skipped,
counted and listed in the report. The measured hashing speed is in docs/data-measures.md.

Report (--report FILE.json): {"groups": [[key, ...], ...], "group_sets": [[set, ...], ...] (the set of each
member), "leaked": [{"key": pool_key, "set": pool_set, "matches": [downstream_key, ...], "match_sets": [...],
"distance": smallest 64-bit Hamming distance}], "near_duplicates", "leaked_images", "images", "skipped",
"threshold", "verify_threshold", "sets", "against", "seconds"}, keys as they appear in the shards.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from shard_tools.cli import progress_switch, run_main, tool_prog
from shard_tools.errors import ToolError, positive_int, remove_partial_shards
from shard_tools.images import MAX_PIXELS
from shard_tools.outputs import open_output
from shard_tools.quantities import plural
from shard_tools.shardset import IMAGE_EXTS, ShardSet, load_shard_set, parse_tar_bytes
from shard_tools.storage import STORAGE_OPTIONS_HELP, read_location, redact, storage_options_arg
from shard_tools.writer import ShardWriter

HASH_SIDE = 32  # the DCT of a 32 x 32 grayscale image
LOW, FINE = 8, 16  # its 8 x 8 lowest frequencies: the 64-bit pHash; 16 x 16: the 256-bit one that verifies
WORDS = 1 + FINE * FINE // 64  # a view's signature: the 64-bit hash, then the 256-bit one, as uint64 words
ZOOMS = (0.92, 0.85)  # central parts hashed too, matched against the others' whole images: crops
VIEWS = 1 + len(ZOOMS)
HASH_VERSION = f"phash64+256-dct32-zoom{'-'.join(f'{z:g}' for z in ZOOMS)}-v2"  # in cache file names
DRAFT_SIDE = 64  # JPEG draft-mode decode keeps at least this many pixels per side
BANDS, BAND_BITS = 4, 16
DEFAULT_THRESHOLD = 10  # bits of the 64-bit hash
MAX_THRESHOLD = 15  # probes per band grow as C(16, <= t // 4): 697 at t = 15
DEFAULT_VERIFY = 72  # bits of the 256-bit hash
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stream-ssl" / "phash"


class DedupError(ToolError):
    """The run failed as a whole (one line)."""


# ----------------------------------------------------------------------------------------------------------
# The hash.


@lru_cache(maxsize=4)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: (D @ x)[k] = sqrt((1 if k == 0 else 2) / n) sum_i x_i cos(pi (2i + 1) k / 2n)."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    d.setflags(write=False)
    return d


def dct_bits(gray: np.ndarray, low: int = LOW) -> np.ndarray:
    """pHashes of a stack of 32 x 32 grayscale images (k, 32, 32): the low x low lowest DCT frequencies, a bit
    set where the coefficient is above their median, coefficient (0, 0) first, row-major, packed into
    low * low / 64 uint64 words per image (k, words), the first bit the highest of the first word."""
    d = dct_matrix(HASH_SIDE)[:low]
    coef = (d @ np.asarray(gray, dtype=np.float64) @ d.T).reshape(len(gray), low * low)
    bits = coef > np.median(coef, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def hash_pixels(gray: np.ndarray) -> np.ndarray:
    """The 64-bit pHashes (uint64, (k,)) of a stack of 32 x 32 grayscale images."""
    return dct_bits(gray, LOW)[:, 0]


def signatures(gray: np.ndarray) -> np.ndarray:
    """(k, WORDS) uint64: per 32 x 32 image its 64-bit pHash, then its 256-bit one (16 x 16 frequencies)."""
    return np.concatenate([dct_bits(gray, LOW), dct_bits(gray, FINE)], axis=1)


def thumbnails(data: bytes, zooms: tuple[float, ...] = ZOOMS) -> np.ndarray:
    """The 32 x 32 grayscale inputs of the hashes (float32, (1 + len(zooms), 32, 32)): the whole image, then its
    central part of each zoom fraction per side. Raises ValueError on images we do not decode."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if w < 1 or h < 1 or w * h > MAX_PIXELS:
        raise ValueError(f"image size {w}x{h} outside what we decode (max {MAX_PIXELS} pixels)")
    if im.format == "JPEG":
        im.draft("L", (DRAFT_SIDE, DRAFT_SIDE))
    im = im.convert("L")
    w, h = im.size
    out = []
    for z in (1.0, *zooms):
        box = ((1 - z) / 2 * w, (1 - z) / 2 * h, (1 + z) / 2 * w, (1 + z) / 2 * h)
        out.append(np.asarray(im.resize((HASH_SIDE, HASH_SIDE), Image.LANCZOS, box=box), dtype=np.float32))
    return np.stack(out)


def phash(data: bytes) -> int:
    """The pHash of one encoded image (the whole image), as an int."""
    return int(hash_pixels(thumbnails(data, ())[:1])[0])


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1).reshape(x.shape).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Exact banded search for pairs within the threshold.


@lru_cache(maxsize=8)
def flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-bit value with at most `radius` bits set (the probes of one band)."""
    values = np.arange(1 << bits, dtype=np.uint64)
    return values[popcount(values) <= radius].astype(np.int64)


def _probe(band: np.ndarray, order: np.ndarray, start: np.ndarray, mask: int, rows: np.ndarray):
    """(row, candidate) pairs: the items of `rows` and the items whose band value is theirs xor `mask`."""
    probe = band[rows] ^ mask
    lo, count = start[probe], start[probe + 1] - start[probe]
    total = int(count.sum())
    first = np.repeat(np.cumsum(count) - count, count)
    cand = order[np.repeat(lo, count) + np.arange(total) - first]
    return np.repeat(rows, count), cand


def _band(h: np.ndarray, b: int) -> np.ndarray:
    return ((h >> np.uint64(BAND_BITS * b)) & np.uint64((1 << BAND_BITS) - 1)).astype(np.int64)


def near_pairs(queries: np.ndarray, table: np.ndarray, threshold: int,
               block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (i, j) with queries[i] and table[j] (uint64) within `threshold` bits: (i, j, distance), each pair
    once, sorted. Exact: a pair within t bits agrees within t // 4 bits on one of the 4 bands, and every band
    value within t // 4 flips of a query's is looked up in the table's buckets."""
    q, t = np.asarray(queries, dtype=np.uint64), np.asarray(table, dtype=np.uint64)
    masks = flip_masks(BAND_BITS, threshold // BANDS)
    found = []
    for b in range(BANDS):
        qband, tband = _band(q, b), _band(t, b)
        order = np.argsort(tband, kind="stable")
        start = np.concatenate([[0], np.cumsum(np.bincount(tband, minlength=1 << BAND_BITS))])
        for lo in range(0, len(q), block):
            rows = np.arange(lo, min(lo + block, len(q)))
            for mask in masks:
                i, j = _probe(qband, order, start, int(mask), rows)
                close = popcount(q[i] ^ t[j]) <= threshold
                found.append(i[close] * len(t) + j[close])
    pair = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    i, j = pair // max(len(t), 1), pair % max(len(t), 1)
    return i, j, popcount(q[i] ^ t[j])


# ----------------------------------------------------------------------------------------------------------
# Hashing shard sets: per shard, in worker processes, cached.


@dataclass
class ShardHashes:
    keys: list[str]
    hashes: np.ndarray  # uint64 (n, VIEWS, WORDS): per key, the signatures of the whole image and its central parts
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


@dataclass
class SetHashes:
    url: str
    shard_set: ShardSet
    keys: list[str]
    hashes: np.ndarray
    skipped: list[tuple[str, str]]


def image_of(sample: dict) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def hash_samples(samples: list[dict]) -> ShardHashes:
    """Hashes of the samples' images; samples without a decodable image are skipped with the reason."""
    keys, thumbs, skipped = [], [], []
    for s in samples:
        data = image_of(s)
        if data is None:
            skipped.append((s["__key__"], s.get("__error__") or "no image member"))
            continue
        try:
            thumbs.append(thumbnails(data))
            keys.append(s["__key__"])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append((s["__key__"], f"undecodable image ({type(e).__name__}: {e})"))
    if not thumbs:
        return ShardHashes(keys, np.zeros((0, VIEWS, WORDS), np.uint64), skipped)
    return ShardHashes(keys, signatures(np.concatenate(thumbs)).reshape(len(keys), VIEWS, WORDS), skipped)


@lru_cache(maxsize=16)
def _set(url: str, options_json: str) -> ShardSet:
    return open_set(url, json.loads(options_json))


def open_set(url: str, storage_options: dict | None = None) -> ShardSet:
    try:
        return load_shard_set(url, storage_options)
    except (FileNotFoundError, ValueError) as e:
        raise DedupError(str(e)) from None


def read_shard(url: str, shard: int, storage_options: dict | None) -> list[dict]:
    """The samples of one shard: the whole tar in one read, its members grouped by key (whitelisted types)."""
    shard_url = _set(url, json.dumps(storage_options or {}, sort_keys=True)).shard_url(shard)
    samples = parse_tar_bytes(read_location(shard_url, storage_options), redact(shard_url))
    return [dict(s, __url__=shard_url) for s in samples]


def cache_file(cache_dir: Path, shard_set: ShardSet, shard: int) -> Path:
    info = shard_set.shards[shard]
    ident = info.sha256 or hashlib.sha256(f"{shard_set.shard_url(shard)}\n{info.bytes}".encode()).hexdigest()
    return cache_dir / f"{ident}-{info.samples}-{HASH_VERSION}.json"


def _load_cached(path: Path | None) -> ShardHashes | None:
    if path is None or not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        words = [[int(view[16 * w:16 * (w + 1)], 16) for view in row for w in range(WORDS)] for row in d["hashes"]]
        hashes = np.array(words, dtype=np.uint64).reshape(len(d["keys"]), VIEWS, WORDS)
        return ShardHashes(list(d["keys"]), hashes, [tuple(s) for s in d["skipped"]])
    except (ValueError, KeyError, TypeError):
        return None  # a damaged cache file is recomputed


def _save_cached(path: Path | None, r: ShardHashes) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    hashes = [["".join(f"{w:016x}" for w in view) for view in row] for row in r.hashes.tolist()]
    tmp.write_text(json.dumps({"version": HASH_VERSION, "keys": r.keys, "hashes": hashes, "skipped": r.skipped}))
    os.replace(tmp, path)


def hash_shard(url: str, shard: int, cache_dir: str | None, storage_options: dict | None) -> ShardHashes:
    """Hashes of one shard: from the cache, or read, hashed and cached."""
    path = cache_file(Path(cache_dir), _set(url, json.dumps(storage_options or {}, sort_keys=True)),
                      shard) if cache_dir else None
    cached = _load_cached(path)
    if cached is not None:
        return cached
    result = hash_samples(read_shard(url, shard, storage_options))
    _save_cached(path, result)
    return result


def _hash_task(task: tuple) -> ShardHashes:
    return hash_shard(*task)


def hash_sets(urls: list[str], workers: int = 1, cache_dir: Path | None = CACHE_DIR,
              storage_options: dict | None = None, progress: bool = False) -> list[SetHashes]:
    """Hashes of every image of the shard sets, shard by shard (in `workers` processes when > 1)."""
    from tqdm import tqdm

    sets = [open_set(u, storage_options) for u in urls]
    tasks = [(u, j, str(cache_dir) if cache_dir else None, storage_options)
             for u, s in zip(urls, sets) for j in range(len(s.shards))]
    sizes = [s.shards[j].samples for s in sets for j in range(len(s.shards))]
    bar = tqdm(total=sum(sizes), unit="img", desc="hashing", file=sys.stderr, disable=not progress, mininterval=1)
    results = []
    try:
        if workers <= 1:
            for t, n in zip(tasks, sizes):
                results.append(_hash_task(t))
                bar.update(n)
        else:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
                for r, n in zip(ex.map(_hash_task, tasks, chunksize=1), sizes):
                    results.append(r)
                    bar.update(n)
    finally:
        bar.close()
    return _by_set(urls, sets, results)


def _by_set(urls: list[str], sets: list[ShardSet], results: list[ShardHashes]) -> list[SetHashes]:
    out, k = [], 0
    for url, s in zip(urls, sets):
        part = results[k:k + len(s.shards)]
        k += len(s.shards)
        hashes = np.concatenate([r.hashes for r in part]) if part else np.zeros((0, VIEWS, WORDS), np.uint64)
        out.append(SetHashes(url, s, [key for r in part for key in r.keys], hashes.astype(np.uint64),
                             [sk for r in part for sk in r.skipped]))
    return out


# ----------------------------------------------------------------------------------------------------------
# Groups and leakage.


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Graph:
    """Near-copy edges between the distinct images (identical whole-image signatures are one node)."""

    inverse: np.ndarray  # item -> its node
    a: np.ndarray  # edges a < b between nodes, with the 64-bit and 256-bit distances of their closest views
    b: np.ndarray
    d: np.ndarray
    fine: np.ndarray
    size: int  # number of nodes


def hash_graph(sig: np.ndarray, threshold: int = DEFAULT_THRESHOLD, verify: int = DEFAULT_VERIFY) -> Graph:
    """Near-copies among images with signatures `sig` (n, VIEWS, WORDS): a view of one (the whole image or a
    central part) within `threshold` bits of the other's whole image on the 64-bit pHash (found by the exact
    banded search), confirmed by at most `verify` bits on the 256-bit pHash of the same two views."""
    _, rep, inverse = np.unique(sig[:, 0, :], axis=0, return_index=True, return_inverse=True)
    nodes = sig[rep]
    i, j, d = near_pairs(nodes[:, :, 0].ravel(), nodes[:, 0, 0], threshold)
    u, view = i // VIEWS, i % VIEWS
    fine = popcount(nodes[u, view, 1:] ^ nodes[j, 0, 1:]).sum(1)
    keep = (u != j) & (fine <= verify)
    u, j, d, fine = u[keep], j[keep], d[keep], fine[keep]
    a, b = np.minimum(u, j), np.maximum(u, j)
    order = np.lexsort((fine, d, b, a))  # per edge, its closest pair of views first
    a, b, d, fine = a[order], b[order], d[order], fine[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return Graph(inverse.ravel(), a[first], b[first], d[first], fine[first], len(rep))


def _items(sets: list[SetHashes]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """All hash signatures of the sets' images in order, and (set index, key) of each."""
    rows = [s.hashes for s in sets if len(s.hashes)]
    hashes = np.concatenate(rows) if rows else np.zeros((0, VIEWS, WORDS), np.uint64)
    return hashes.astype(np.uint64), [(i, k) for i, s in enumerate(sets) for k in s.keys]


def pool_groups(g: Graph, n_pool: int) -> list[list[int]]:
    """Groups (pool item indices, representative first) of near-copies among the first `n_pool` items, >= 2
    items each; edges through downstream-only hashes do not join pool images."""
    in_pool = np.zeros(g.size, bool)
    in_pool[g.inverse[:n_pool]] = True
    uf = UnionFind(g.size)
    for a, b in zip(g.a.tolist(), g.b.tolist()):
        if in_pool[a] and in_pool[b]:
            uf.union(a, b)
    members: dict[int, list[int]] = {}
    for item, u in enumerate(g.inverse[:n_pool].tolist()):
        members.setdefault(uf.find(u), []).append(item)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


def leaks(g: Graph, n_pool: int) -> dict[int, list[tuple[int, int]]]:
    """Pool item -> [(downstream item, distance)] of the downstream images within the threshold; downstream
    items are numbered from 0 after the `n_pool` pool items."""
    down_items: dict[int, list[int]] = {}
    for item, u in enumerate(g.inverse[n_pool:].tolist()):
        down_items.setdefault(u, []).append(item)
    close: dict[int, list[tuple[int, int]]] = {u: [(u, 0)] for u in down_items}
    for a, b, d in zip(g.a.tolist(), g.b.tolist(), g.d.tolist()):
        for x, y in ((a, b), (b, a)):
            if y in down_items:
                close.setdefault(x, []).append((y, d))
    out = {}
    for item, u in enumerate(g.inverse[:n_pool].tolist()):
        if u in close:
            out[item] = sorted((j, d) for v, d in close[u] for j in down_items[v])
    return out


def build_report(pool: list[SetHashes], down: list[SetHashes], threshold: int = DEFAULT_THRESHOLD,
                 verify: int = DEFAULT_VERIFY) -> dict:
    """The JSON report (see the module docstring)."""
    sig, who = _items(pool + down)
    n_pool = sum(len(s.keys) for s in pool)
    who, dwho = who[:n_pool], [(i - len(pool), k) for i, k in who[n_pool:]]
    g = hash_graph(sig, threshold, verify)
    groups = pool_groups(g, n_pool)
    leaked = leaks(g, n_pool)
    return {
        "groups": [[who[i][1] for i in g] for g in groups],
        "group_sets": [[pool[who[i][0]].url for i in g] for g in groups],
        "leaked": [{"key": who[i][1], "set": pool[who[i][0]].url, "matches": [dwho[j][1] for j, _ in m],
                    "match_sets": [down[dwho[j][0]].url for j, _ in m], "distance": min(d for _, d in m)}
                   for i, m in sorted(leaked.items())],
        "near_duplicates": sum(len(g) - 1 for g in groups),
        "leaked_images": len(leaked),
        "threshold": threshold,
        "verify_threshold": verify,
        "hash": HASH_VERSION,
        "sets": [s.url for s in pool],
        "against": [s.url for s in down],
        "images": {s.url: len(s.keys) for s in pool + down},
        "skipped": [{"set": s.url, "key": k, "reason": r} for s in pool + down for k, r in s.skipped],
    }


def dropped_keys(pool: list[SetHashes], report: dict) -> list[set[str]]:
    """Per pool set, the keys --write-filtered leaves out: group members but the first, leaked images, and
    samples that could not be hashed."""
    index = {s.url: i for i, s in enumerate(pool)}
    drop: list[set[str]] = [set() for _ in pool]
    for keys, sets in zip(report["groups"], report["group_sets"]):
        for k, s in list(zip(keys, sets))[1:]:
            drop[index[s]].add(k)
    for leak in report["leaked"]:
        drop[index[leak["set"]]].add(leak["key"])
    for sk in report["skipped"]:
        if sk["set"] in index:
            drop[index[sk["set"]]].add(sk["key"])
    return drop


# ----------------------------------------------------------------------------------------------------------
# The filtered shard set.


def write_filtered(source: SetHashes, out: str, drop: set[str], shard_size: int = 1000, name: str | None = None,
                   storage_options: dict | None = None, provenance: dict | None = None) -> dict:
    """Copy the samples of `source` not in `drop`, in order and byte for byte, into a new shard set at `out`
    (index.json written last). Returns the new index."""
    meta = source.shard_set.meta
    name = name or out.rstrip("/").rsplit("/", 1)[-1]
    output = open_output(out, storage_options)
    try:
        output.lock(f"dedup.py --write-filtered {name}")
        output.remove("index.json")  # not a shard set until finished
        remove_partial_shards(output, name, keep=0)
        writer = ShardWriter(output, name, shard_size)
        unlabeled = 0  # copied samples without a label, for labels.unlabeled (pack.py's count)
        try:
            for shard in range(len(source.shard_set.shards)):
                for s in read_shard(source.url, shard, storage_options):
                    if s["__key__"] not in drop and "__error__" not in s:
                        writer.add(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                        unlabeled += "cls" not in s
            kept = {k: meta[k] for k in ("source", "seed", "fields", "labels") if k in meta}
            if "unlabeled" in kept.get("labels", {}):
                kept["labels"] = {**kept["labels"], "unlabeled": unlabeled}
            return writer.finish(**kept, filtered={"from": source.url, "removed": len(drop), **(provenance or {})})
        finally:
            writer.abort()
    finally:
        output.close()


def filtered_outputs(pool: list[SetHashes], out: str) -> list[tuple[str, str]]:
    """(folder, name) of the filtered copy of each pool set: OUT itself for one set, OUT/NAME for several."""
    if len(pool) == 1:
        return [(out, out.rstrip("/").rsplit("/", 1)[-1])]
    names = [s.shard_set.name or s.url.rstrip("/").rsplit("/", 1)[-1] for s in pool]
    if len(set(names)) != len(names):
        raise DedupError(f"--write-filtered: the sets' names {names} repeat; filter them one at a time")
    return [(out.rstrip("/") + "/" + n, n) for n in names]


# ----------------------------------------------------------------------------------------------------------
# Command line.


def _bits(top: int, of: int):
    def parse(text: str) -> int:
        try:
            t = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not 0 <= t <= top:
            raise argparse.ArgumentTypeError(f"must be in 0..{top} bits of {of}, got {t}")
        return t

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=tool_prog("dedup.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", metavar="SET", help="pool shard sets (folders or URLs), checked together")
    p.add_argument("--against", nargs="+", default=[], metavar="DOWNSTREAM",
                   help="downstream shard sets: pool images that are near-copies of theirs are leaked")
    p.add_argument("--report", type=Path, required=True, help="write the JSON report here")
    p.add_argument("--threshold", type=_bits(MAX_THRESHOLD, 64), default=DEFAULT_THRESHOLD,
                   help=f"largest Hamming distance between near-copies on the 64-bit pHash, which finds them "
                        f"(default {DEFAULT_THRESHOLD}; at most {MAX_THRESHOLD})")
    p.add_argument("--verify-threshold", type=_bits(256, 256), default=DEFAULT_VERIFY,
                   help=f"largest Hamming distance on the 256-bit pHash, which confirms them (default "
                        f"{DEFAULT_VERIFY}; 256 confirms everything)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes hashing shards (default 1)")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                   help=f"per-shard hashes kept here, so a re-run resumes (default {CACHE_DIR})")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="read and write --cache-dir (default on)")
    p.add_argument("--write-filtered", metavar="OUT",
                   help="write the pool without near-copies (one per group kept) and without leaked images")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per filtered shard (default 1000)")
    p.add_argument("--storage-options", type=storage_options_arg, default={}, help=STORAGE_OPTIONS_HELP)
    progress_switch(p, default=True)
    return p


def summary(report: dict) -> str:
    n = sum(report["images"][u] for u in report["sets"])
    copies, leaked = report["near_duplicates"], report["leaked_images"]
    lines = [f"hashed {plural(sum(report['images'].values()), 'image')} ({n} in the pool) in "
             f"{report['seconds']:.1f} s ({report['images_per_second']:.0f} img/s with "
             f"{plural(report['workers'], 'worker')}); thresholds {report['threshold']} of 64 bits, "
             f"{report['verify_threshold']} of 256",
             f"near-duplicates: {plural(len(report['groups']), 'group')}, {plural(copies, 'pool image')} "
             f"{'is a copy' if copies == 1 else 'are copies'} of another ({copies / max(n, 1):.2%})",
             f"leaked: {plural(leaked, 'pool image')} {'is a near-copy' if leaked == 1 else 'are near-copies'} of "
             "downstream images"]
    if report["skipped"]:
        lines.append(f"skipped: {plural(len(report['skipped']), 'sample')} without a decodable image (listed in the "
                     "report)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    return run_main("dedup", lambda: _run(a), usage_errors=(DedupError,))


def _run(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    so = a.storage_options
    hashed = hash_sets(a.sets + a.against, a.workers, a.cache_dir if a.cache else None, so, a.progress)
    pool, down = hashed[:len(a.sets)], hashed[len(a.sets):]
    report = build_report(pool, down, a.threshold, a.verify_threshold)
    seconds = time.perf_counter() - t0
    report.update(seconds=seconds, workers=a.workers, images_per_second=sum(report["images"].values()) / seconds)
    if a.write_filtered:
        drops = dropped_keys(pool, report)
        provenance = {"threshold": a.threshold, "verify_threshold": a.verify_threshold, "against": a.against,
                      "hash": HASH_VERSION}
        report["filtered"] = []
        for s, drop, (out, name) in zip(pool, drops, filtered_outputs(pool, a.write_filtered)):
            index = write_filtered(s, out, drop, a.shard_size, name, so, provenance)
            report["filtered"].append({"set": s.url, "out": out, "samples": index["num_samples"],
                                       "removed": len(drop)})
    a.report.parent.mkdir(parents=True, exist_ok=True)
    a.report.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    for f in report.get("filtered", []):
        print(f"filtered: {f['out']}: {plural(f['samples'], 'sample')} ({f['removed']} left out of {f['set']})")
    print(f"report: {a.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
