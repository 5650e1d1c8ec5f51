"""Packing throughput against plain sequential tar writing of the same files, measured in the same run.

    python -m benchmarks.pack [--images 2000] [--copies 3] [--size 384] [--shard-size 500] [--repeats 3]
    python -m benchmarks.pack --quick       # every variant once at toy sizes (seconds): does it still run?

Renders a labeled image set with shard_tools/synth.py (JPEG, ~35 KB each at 384 px) and a manifest listing
every image --copies times (longer runs without rendering more), then times, best of --repeats, alternating
so that every variant sees the same page cache and machine load:

  tar       the baseline: read each file and append it to a tarfile, a new tar every --shard-size files
  pack      shard_tools.pack, original bytes (header + structure checks, json, .cls, .idx, sha256, resume
            records): target ratio pack/tar >= 0.8 with one worker
  pack -w2  the same with --workers 2
  resize    --max-side 256 re-encoding, 1 and 2 workers

and prints images/s, CPU time per image (this process and its workers: on a busy machine, wall-clock
scaling is bounded by the cores the others leave, CPU per image is not) and the ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.quick import parse_quick
from shard_tools.pack import pack
from shard_tools.synth import synthesize


def tar_baseline(manifest: Path, out: Path, shard_size: int) -> int:
    """Plain sequential tar writing: what a few lines of tarfile do with the same files."""
    out.mkdir(parents=True)
    root = manifest.parent
    paths = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    tar = None
    for i, rel in enumerate(paths):
        if i % shard_size == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(out / f"plain-{i // shard_size:06d}.tar", "w")
        data = (root / rel).read_bytes()
        info = tarfile.TarInfo(f"{i:09d}.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tar.close()
    return len(paths)


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children) of fn()."""
    cpu, start = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - start, _cpu() - cpu


# --quick: a few seconds; images larger than the resize variants' --max-side 256, so those re-encode
QUICK = {"images": 16, "copies": 2, "size": 288, "shard_size": 8, "repeats": 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="distinct images rendered (default: 2000)")
    p.add_argument("--copies", type=int, default=3, help="times each image is listed in the manifest (default: 3)")
    p.add_argument("--size", type=int, default=384, help="side of the rendered images (default: 384)")
    p.add_argument("--shard-size", type=int, default=500, help="rows per shard (default: 500)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, the best kept (default: 3)")
    p.add_argument("--work", type=Path, help="folder for images and outputs (default: a temporary folder)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, every variant once, in seconds: checks that the benchmark runs, its figures "
                        f"mean nothing ({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; "
                        "default: off)")
    a = parse_quick(p, argv, QUICK)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-pack-"))
    images = work / f"images-{a.images}-{a.size}"
    manifest = images / "manifest.csv"
    if not manifest.exists():
        t, _ = timed(lambda: synthesize(images, a.images, classes=10, size=a.size, seed=0))
        print(f"rendered {a.images} images of {a.size}px in {t:.1f}s", file=sys.stderr)
    lines = (images / "manifest.csv").read_text().splitlines()
    manifest = work / f"manifest-x{a.copies}.csv"
    manifest.write_text("\n".join([lines[0]] + [f"{images.name}/{line}" for line in lines[1:]] * a.copies) + "\n")
    rows = (len(lines) - 1) * a.copies
    total_mb = sum(f.stat().st_size for f in images.rglob("*.jpg")) / 1e6 * a.copies
    for f in images.rglob("*.jpg"):  # warm the page cache for everyone
        f.read_bytes()

    def out_dir(tag: str) -> Path:
        path = work / f"out-{tag}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    variants = {
        "tar": lambda: tar_baseline(manifest, out_dir("tar"), a.shard_size),
        "pack": lambda: pack(manifest, out_dir("pack"), name="b", shard_size=a.shard_size),
        "pack -w2": lambda: pack(manifest, out_dir("pack2"), name="b", shard_size=a.shard_size, workers=2),
        "resize": lambda: pack(manifest, out_dir("resize"), name="b", shard_size=a.shard_size, max_side=256),
        "resize -w2": lambda: pack(manifest, out_dir("resize2"), name="b", shard_size=a.shard_size, max_side=256,
                                   workers=2),
    }
    best = {k: float("inf") for k in variants}
    cpu = {}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            wall, used = timed(fn)
            if wall < best[name]:
                best[name], cpu[name] = wall, used
    rate = {k: rows / v for k, v in best.items()}
    print(f"{rows} rows ({a.images} images x {a.copies}), {total_mb / rows * 1e3:.0f} KB each on average, shards of "
          f"{a.shard_size}; "
          f"best of {a.repeats}; {os.cpu_count()} CPUs")
    for name in variants:
        print(f"  {name:<11} {rate[name]:8.0f} images/s  {total_mb / best[name]:7.1f} MB/s  ({best[name]:.2f}s; "
              f"CPU {cpu[name] / rows * 1e3:.3f} ms/image)")
    print(f"ratio pack / tar (target >= 0.8):        {rate['pack'] / rate['tar']:.2f}")
    print(f"ratio pack -w2 / pack (scaling):         {rate['pack -w2'] / rate['pack']:.2f}")
    print(f"ratio resize / pack (re-encode cost):    {rate['resize'] / rate['pack']:.2f}")
    print(f"ratio resize -w2 / resize (scaling):     {rate['resize -w2'] / rate['resize']:.2f}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
