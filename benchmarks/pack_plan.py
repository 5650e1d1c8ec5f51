"""Assigning a large manifest's rows to shards and parts: memory and rows/s of `pack.py --plan-only`.

    python -m benchmarks.pack_plan [--rows 10M] [--parts 10,100] [--shard-size 1000] [--folder DIR] [--keep]
    python -m benchmarks.pack_plan --quick  # every measurement at toy sizes (seconds): does it still run?

Writes a CSV manifest of --rows rows (path, one of 1000 class names, a short caption; the image paths do not
exist) and then measures, each in a fresh process so that its peak resident memory (ru_maxrss) is its own:

  imports    python with numpy and shard_tools imported, nothing read: the floor under every figure below
  baseline   what pack.py held before parts existed, measured in the same run: read_manifest keeping every row,
             then numpy's permutation of them (the old global shuffle)
  whole      --plan-only for one run (part 1/1): the same read, each row given its shard by the keyed shuffle
  1/N        --plan-only --part 1/N for each N of --parts: a read that only counts rows and labels, then a second
             read keeping the rows of part 1 only

and prints seconds (first read + assignment), manifest rows/s over both, peak memory, memory above the imports
per manifest row, and the ratios rows/s and memory against the baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.quick import parse_quick
from shard_tools.quantities import format_bytes, format_count, parse_count  # noqa: E402


def write_manifest(path: Path, rows: int, chunk: int = 100_000) -> None:
    with open(path, "w") as f:
        f.write("path,label,caption\n")
        for start in range(0, rows, chunk):
            f.write("".join(f"images/{i // 10_000:05d}/{i:09d}.jpg,class_{i * 7919 % 1000:03d},"
                            f"a photo number {i} of class {i * 7919 % 1000}\n" for i in range(start,
                                                                                           min(rows, start + chunk))))


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def child(kind: str, manifest: str, shard_size: int) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    from shard_tools.manifest import read_manifest
    from shard_tools.pack import plan
    from shard_tools.parts import Part

    cpu = _cpu()
    if kind == "imports":
        return {"seconds": [0.0, 0.0], "rows": 0, "peak": _peak(), "cpu": 0.0}
    if kind == "baseline":
        t0 = time.perf_counter()
        m = read_manifest(manifest, caption_column="caption")
        t1 = time.perf_counter()
        order = np.random.default_rng(0).permutation(len(m.rows))
        t2 = time.perf_counter()
        return {"seconds": [t1 - t0, t2 - t1], "rows": m.total, "part_rows": len(order), "peak": _peak(),
                "cpu": max(_cpu() - cpu, 1e-6)}  # a toy manifest (--quick) can read in under a clock tick
    k, n = (int(x) for x in kind.split("/"))
    p = plan(manifest, "bench", shard_size=shard_size, caption_column="caption", part=Part(k, n))
    return {"seconds": list(p.seconds), "rows": p.rows, "part_rows": p.part_rows, "peak": p.peak_bytes,
            "cpu": max(_cpu() - cpu, 1e-6)}


def measure(kind: str, manifest: Path, shard_size: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pack_plan", "--child", kind, "--manifest", str(manifest),
                           "--shard-size", str(shard_size)], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], rows: int) -> None:
    floor, base = results["imports"]["peak"], results["baseline"]
    base_rate = rows / base["cpu"]
    print(f"{'run':<10} {'rows kept':>10} {'read s':>8} {'assign s':>9} {'rows/s':>10} {'cpu s':>7} "
          f"{'rows/cpu-s':>11} {'peak':>10} {'B/row':>7} {'x rows/cpu-s':>13} {'x memory':>9}")
    for kind, r in results.items():
        if kind == "imports":
            print(f"{kind:<10} {'':>10} {'':>8} {'':>9} {'':>10} {'':>7} {'':>11} {format_bytes(r['peak']):>10}")
            continue
        per_row = (r["peak"] - floor) / rows
        print(f"{kind:<10} {format_count(r['part_rows']):>10} {r['seconds'][0]:>8.1f} {r['seconds'][1]:>9.1f} "
              f"{rows / sum(r['seconds']):>10,.0f} {r['cpu']:>7.1f} {rows / r['cpu']:>11,.0f} "
              f"{format_bytes(r['peak']):>10} {per_row:>7.0f} {rows / r['cpu'] / base_rate:>13.2f} "
              f"{(r['peak'] - floor) / max(base['peak'] - floor, 1):>9.3f}")
    print("rows/s: manifest rows per wall-clock second over both steps; rows/cpu-s: per second of this process's "
          "CPU time (steadier on a busy machine); x: against the baseline")


QUICK = {"rows": "2K", "parts": "4", "shard_size": 100}  # --quick: a few seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10M", help="manifest rows (a count: 10M, 500K; default 10M)")
    p.add_argument("--parts", default="10,100", help="part counts N to measure part 1/N of (default 10,100)")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard (default 1000)")
    p.add_argument("--folder", help="where to write the manifest (default: a temporary folder)")
    p.add_argument("--keep", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the manifest afterwards (default: off)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in seconds: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; default: off)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    a = parse_quick(p, argv, QUICK)
    if a.child:
        print(json.dumps(child(a.child, a.manifest, a.shard_size)))
        return 0
    rows = parse_count(a.rows, what="--rows")
    folder = Path(a.folder or tempfile.mkdtemp(prefix="pack-plan-"))
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    try:
        t = time.perf_counter()
        write_manifest(manifest, rows)
        print(f"manifest: {format_count(rows)} rows, {format_bytes(manifest.stat().st_size)} written in "
              f"{time.perf_counter() - t:.1f}s; shard size {a.shard_size}", flush=True)
        kinds = ["imports", "baseline", "1/1"] + [f"1/{n}" for n in parse_parts(a.parts)]
        results = {}
        for kind in kinds:
            results[kind] = measure(kind, manifest, a.shard_size)
            print(f"  measured {kind}", file=sys.stderr, flush=True)
        report(results, rows)
    finally:
        if not a.keep and not a.folder:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def parse_parts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
