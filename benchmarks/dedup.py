"""Near-duplicate and leakage detection (shard_tools/dedup.py): precision, recall and speed, measured in one run.

    python -m benchmarks.dedup [--pool 1000] [--down 400] [--leaked 100] [--speed-images 300] [--search 1000000]
    python -m benchmarks.dedup --quick       # every step at toy sizes (seconds): does it still run?

1. Quality: a generated photo-like set (stream_ssl/testing/near_dups.py) with planted near-duplicates in the pool
   (re-encodes, resizes, 2-6% crops per side, colour changes, and mixes of them) and planted leakage (variants
   of downstream images hidden in the pool); dedup.py's report at several thresholds, scored as pairwise
   precision/recall of the groups, per-image precision/recall of the leakage, and recall per kind of variant.
2. Speed per core: hashing 500 x 375 JPEGs (q90, ~like the photos in REFERENCE.md's decode figures) in this
   process, CPU time per image, against the baseline of a full PIL decode of the same bytes (the ratio says
   what the hash costs beyond decoding), and dedup.py end to end on the pool shard set (--workers 1,
   --no-cache: read, hash, search, report), CPU time of the whole command per image.
3. Search: the exact banded search on --search random 64-bit signatures (3 per image, as dedup.py has) at
   the default threshold, and at a tenth of that, to show the cost per image stays about flat.
CPU times (not wall-clock) make the figures hold on a busy machine.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.quick import parse_quick
from shard_tools.dedup import DEFAULT_THRESHOLD, DEFAULT_VERIFY, VIEWS, WORDS, hash_graph, hash_samples  # noqa: E402
from stream_ssl.testing.near_dups import VARIANTS, jpeg, origin_of, photo, planted_sets, scores  # noqa: E402


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_dedup(args: list[str]) -> float:
    """CPU seconds of one dedup.py command (a child process)."""
    before = child_cpu()
    subprocess.run([sys.executable, "-m", "shard_tools.dedup", *args, "--no-progress"], check=True,
                   capture_output=True, text=True)
    return child_cpu() - before


def pool_keys(folder: Path) -> list[str]:
    from shard_tools.shardset import load_shard_set
    from stream_ssl.data.plan import Slice
    from stream_ssl.data.reader import ShardReader

    s = load_shard_set(str(folder))
    reader = ShardReader((s,))
    return [k for j, info in enumerate(s.shards) for k in reader.keys(Slice(0, j, 0, info.samples))]


def per_variant_recall(report: dict, keys: list[str], leaked_origins: set[str]) -> dict[str, float]:
    """Per kind of variant: the fraction found (in its original's group, or as a leak)."""
    group_of = {k: i for i, g in enumerate(report["groups"]) for k in g}
    leaked = {x["key"] for x in report["leaked"]}
    originals = {origin_of(k): k for k in keys if k.endswith("v0")}
    found: dict[str, list[bool]] = {v: [] for v in VARIANTS}
    for k in keys:
        if k.endswith("v0"):
            continue
        kind = VARIANTS[int(k.rsplit("v", 1)[1]) - 1]
        o = origin_of(k)
        if o in leaked_origins:
            found[kind].append(k in leaked)
        else:
            found[kind].append(k in group_of and group_of[k] == group_of.get(originals[o]))
    return {kind: float(np.mean(v)) if v else float("nan") for kind, v in found.items()}


def quality(a: argparse.Namespace, root: Path) -> tuple[Path, int]:
    t0 = time.perf_counter()
    planted = planted_sets(root, a.pool, a.down, copied=0.3, leaked=a.leaked, seed=1, shard_size=500)
    keys = pool_keys(planted.pool)
    print(f"planted set: pool {planted.pool_images} images ({len(planted.groups)} originals with 1-2 variants, "
          f"{a.leaked} leaked variants), downstream {planted.down_images}; made in {time.perf_counter() - t0:.0f} s")
    print("| threshold (of 64) | verify (of 256) | group precision | group recall | leak precision | leak recall | "
          + " | ".join(f"recall {v}" for v in VARIANTS) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(VARIANTS))
    settings = [(6, DEFAULT_VERIFY), (8, DEFAULT_VERIFY), (DEFAULT_THRESHOLD, 256), (DEFAULT_THRESHOLD, 64),
                (DEFAULT_THRESHOLD, DEFAULT_VERIFY), (12, DEFAULT_VERIFY)]
    for t, v in settings:
        path = root / f"report{t}-{v}.json"
        run_dedup([str(planted.pool), "--against", str(planted.down), "--report", str(path), "--threshold", str(t),
                   "--verify-threshold", str(v), "--cache-dir", str(root / "cache")])
        report = json.loads(path.read_text())
        s = scores(report, planted, keys)
        per = per_variant_recall(report, keys, planted.leaked_origins)
        print(f"| {t} | {v} | {s['group_precision']:.3f} ({s['found_pairs']} pairs) | {s['group_recall']:.3f} "
              f"({s['true_pairs']} planted) | {s['leak_precision']:.3f} | {s['leak_recall']:.3f} "
              f"({s['true_leaked']} planted) | " + " | ".join(f"{per[v]:.3f}" for v in VARIANTS) + " |")
    return planted.pool, planted.pool_images


def hashing_speed(n: int) -> None:
    images = [jpeg(photo(90_000 + i, size=(500, 375))) for i in range(n)]
    kb = sum(map(len, images)) / n / 1000
    samples = [{"__key__": f"k{i}", "jpg": b} for i, b in enumerate(images)]
    best = {}
    for _ in range(3):  # alternate, best of three: the same cache state and load for both
        c = time.process_time()
        for b in images:
            Image.open(io.BytesIO(b)).convert("RGB")
        best["decode"] = min(best.get("decode", 1e9), (time.process_time() - c) / n)
        c = time.process_time()
        hash_samples(samples)
        best["hash"] = min(best.get("hash", 1e9), (time.process_time() - c) / n)
    print(f"\nhashing 500x375 JPEGs (~{kb:.0f} KB, q90), {n} images, CPU time per image (best of 3):")
    print(f"  baseline: full PIL decode to RGB   {best['decode'] * 1e3:.2f} ms  "
          f"({1 / best['decode']:.0f} img/s per core)")
    print(f"  dedup: draft decode + {VIEWS} views x (64 + 256)-bit pHashes  {best['hash'] * 1e3:.2f} ms  "
          f"({1 / best['hash']:.0f} img/s per core)")
    print(f"  ratio hash / full decode (img/s): {best['decode'] / best['hash']:.2f}")


def search_speed(n: int) -> None:
    rng = np.random.default_rng(0)
    print(f"\nexact banded search, random signatures ({VIEWS} views an image), threshold {DEFAULT_THRESHOLD}:")
    for m in (n // 10, n):
        sig = rng.integers(0, 2**64 - 1, size=(m, VIEWS, WORDS), dtype=np.uint64)
        c = time.process_time()
        g = hash_graph(sig, DEFAULT_THRESHOLD)
        s = time.process_time() - c
        print(f"  {m} images: {s:.1f} s CPU ({s / m * 1e6:.1f} us per image), {len(g.a)} pairs")


QUICK = {"pool": 24, "down": 12, "leaked": 4, "speed_images": 4, "search": 5000}  # --quick: a few seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=1000, help="original images in the pool (default 1000)")
    p.add_argument("--down", type=int, default=400, help="images in the downstream set (default 400)")
    p.add_argument("--leaked", type=int, default=100,
                   help="downstream images with a variant in the pool (default 100)")
    p.add_argument("--speed-images", type=int, default=300, help="500x375 JPEGs for the speed test (default 300)")
    p.add_argument("--search", type=int, default=1_000_000,
                   help="images in the search test (and a tenth) (default 1000000)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    a = parse_quick(p, argv, QUICK)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool, n = quality(a, root)
        cpu = run_dedup([str(pool), "--report", str(root / "speed.json"), "--no-cache", "--workers", "1"])
        print(f"\ndedup.py end to end on the pool ({n} images of 96-256 px, --workers 1, --no-cache): "
              f"{cpu:.1f} s CPU, {n / cpu:.0f} img/s per core (process start-up and imports included)")
    hashing_speed(a.speed_images)
    search_speed(a.search)
    return 0


if __name__ == "__main__":
    sys.exit(main())
