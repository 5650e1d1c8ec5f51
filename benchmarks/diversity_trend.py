"""The study's trend at a larger budget than the demo, with seeds: how much do more unique samples help, in the
pretraining domain and on a shifted domain?

    python -m benchmarks.diversity_trend                      # budget 256K, N = 1%/10%/100% of 4000, seeds 0,1
    python -m benchmarks.diversity_trend --budget 128K --seeds 0,1,2 --out bench_out/trend128k
    python -m benchmarks.diversity_trend --quick              # the same path at toy size: two tiny runs (< a minute)

Runs the demo's sweep (launch/demo.py settings: generated pool in domain a, downstream sets in domain a and in
the shifted domain b, SimCLR) with the given budget and seeds, then reports per downstream set:
- accuracy (kNN k=20 and linear probe) at the smallest and the largest N, mean ± std over seeds;
- the gain from the smallest to the largest N, computed per seed (same seed, same initialization) and given as
  mean ± std over seeds: the study's claim is a clear gain in domain and a smaller (or no) gain under shift;
- the Frechet distance between the pool's source and the downstream set (largest-N encoder), the shift proxy.
Not a test: about 30-45 minutes on 2 CPU cores with the defaults (6 runs of 2000 steps). Numbers come from the
runs. `--quick` checks that the script still runs: a toy pool, two runs of a few steps of a toy network, in a
temporary folder unless --out is given; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.quick import parse_quick

# --quick: the smallest sweep that has a smallest and a largest N (timm's toy network, no loader workers)
QUICK = {"pool": 64, "down_train": 60, "down_test": 60, "budget": "64", "unique": "50%,100%", "seeds": "0",
         "backbone": "test_byobnet", "backbone_options": "{}", "batch_size": 16, "workers": 0, "out": None}


def _ms(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)


def _f(pair: tuple[float, float], signed: bool = False, digits: int = 3) -> str:
    m, s = pair
    if math.isnan(m):
        return "-"
    return (f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}") + f" ± {s:.{digits}f}"


def trend_table(rows: list[dict]) -> str:
    """Gain table from the sweep's result rows (launch/sweep.py result_rows + baselines)."""
    cells = [r for r in rows if not r.get("baseline")]
    base = [r for r in rows if r.get("baseline")]
    lines = ["| downstream | metric | random init | N smallest | N largest | gain (largest - smallest) | "
             "Frechet (source vs downstream) |", "|---|---|---|---|---|---|---|"]
    for down in sorted({r["downstream"] for r in cells}):
        rs = [r for r in cells if r["downstream"] == down]
        n_lo, n_hi = min(r["N"] for r in rs), max(r["N"] for r in rs)
        seeds = sorted({r["seed"] for r in rs})
        fd = _ms([r["frechet"] for r in rs if r["N"] == n_hi])
        for key, name in (("knn_k20", "kNN k=20"), ("linear_top1", "linear top-1")):
            lo = {r["seed"]: r[key] for r in rs if r["N"] == n_lo}
            hi = {r["seed"]: r[key] for r in rs if r["N"] == n_hi}
            gains = [hi[s] - lo[s] for s in seeds if s in lo and s in hi and None not in (lo[s], hi[s])]
            rand = _ms([r[key] for r in base if r["downstream"] == down])
            lines.append(f"| {down} | {name} | {_f(rand)} | {_f(_ms(list(lo.values())))} (N={n_lo}) | "
                         f"{_f(_ms(list(hi.values())))} (N={n_hi}) | {_f(_ms(gains), signed=True)} "
                         f"({len(gains)} seed{'' if len(gains) == 1 else 's'}) | {_f(fd, digits=2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from launch.demo import parser

    p = parser()
    p.description = __doc__
    p.set_defaults(out=Path("bench_out/diversity_trend"), budget="256K", seeds="0,1")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in well under a minute: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items() if k != 'out').replace('%', '%%')}, "
                        "a temporary --out; options given win; default: off)")
    a = parse_quick(p, argv, QUICK)
    temporary = a.out is None
    if temporary:
        a.out = Path(tempfile.mkdtemp(prefix="diversity-trend-"))
    try:
        return trend(a, temporary)
    finally:
        if temporary:
            shutil.rmtree(a.out, ignore_errors=True)


def trend(a: argparse.Namespace, temporary: bool) -> int:
    from launch.demo import run_study

    t0 = time.perf_counter()
    result, failed = run_study(a)
    table = trend_table(result["rows"])
    print()
    print(result["table"])
    print()
    print(f"SimCLR, budget C = {a.budget}, pool {a.pool} generated images (domain a), seeds {a.seeds}; "
          f"mean ± std over seeds")
    print(table)
    (a.out / "trend.md").write_text(table + "\n")
    where = f"{a.out} (temporary, removed)" if temporary else f"{a.out / 'trend.md'}, {result['plot']}"
    print(f"\n[trend] {(time.perf_counter() - t0) / 60:.1f} min; {where}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
