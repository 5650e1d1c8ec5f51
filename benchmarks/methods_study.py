"""The seven-method study: does every SSL method learn on the demo's data, and does each gain from more unique
samples at a fixed budget?

    python -m benchmarks.methods_study                        # 7 methods x N = 1%, 100% x seeds 0, 1 at C = 128K
    python -m benchmarks.methods_study --methods byol --unique 100% --seeds 0 --out bench_out/tune_byol
    python -m benchmarks.methods_study --quick                # the same path at toy size: one tiny run (seconds)

Data, budget and network are the demo's (launch/demo.py: a pool of 4000 procedural images in domain a,
downstream sets in domain a and in the shifted domain b; a narrow ResNet-10 at 24 px, batch 128, budget
C = 128K samples seen = 1000 steps). Each method's own settings (method_options, optimizer and its options, lr,
weight decay, warm-up) come from configs/methods/NAME.yaml, the small-image recipes for ResNet-18; backbone,
image size, batch and precision are the study's, and the heads are scaled with the backbone: the YAMLs' hidden
widths (and Barlow Twins' and VICReg's embedding width) are divided by `--head-scale` (4: ResNet-18's 512
features over the narrow ResNet-10's 128), so 2048 -> 512 and 4096 -> 1024. The cells run through
launch/sweep.py, so finished cells are kept and an interrupted study resumes where it stopped (change a
method's settings, and delete its cells: the sweep does not compare method settings).

Writes OUT/methods.md and OUT/methods.png, and prints per method and downstream set: kNN (k=20) and linear
top-1 at the smallest and the largest N (mean ± std over seeds), the random initialization, and the collapse
monitor's final std of the L2-normalized embeddings (also x sqrt(d): 1 healthy, 0 collapsed); then the two
checks of the study: at the largest N every seed beats random init by >= 10 kNN points in domain a, and the
largest N beats the smallest. Not a test: about 1-2 hours on 2 shared CPU cores with the defaults. `--quick` checks
that the script still runs: BYOL, one run of a few steps of a toy network on a toy pool, in a temporary folder
unless --out / --data-root are given; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.quick import parse_quick

REPO = Path(__file__).resolve().parent.parent
METHODS = ("simclr", "mocov3", "byol", "barlow", "vicreg", "swav", "dino")
# What a method's YAML contributes; the rest (backbone, size, batch, data) is the study's.
METHOD_KEYS = ("method_options", "optimizer", "optimizer_options", "lr", "weight_decay", "weight_decay_end",
               "warmup_fraction", "momentum", "clip_grad")
# Head widths scaled with the backbone (--head-scale); output sizes (projections, prototypes) are kept, except
# for Barlow Twins and VICReg, whose embedding is the space they decorrelate.
WIDTHS = {"proj_hidden", "pred_hidden", "head_hidden"}
EMBEDDING_WIDTH = {"barlow": "proj_dim", "vicreg": "proj_dim"}
DOMAIN = "a"  # the pretraining domain's downstream set: where the checks apply
MARGIN = 0.10  # kNN points over random init the checks ask for
# The demo's settings a study may change (None: the demo's default), as the demo's option names.
DEMO_OPTIONS = ("pool", "down_train", "down_test", "backbone", "backbone_options", "batch_size")
# --quick: BYOL (its YAML, heads scaled, a predictor and a momentum encoder), one run of 4 steps of timm's toy
# network on a toy pool, no loader workers
QUICK = {"methods": "byol", "unique": "100%", "seeds": "0", "budget": "64", "pool": 64, "down_train": 60,
         "down_test": 60, "backbone": "test_byobnet", "backbone_options": "{}", "batch_size": 16, "workers": 0,
         "out": None, "data_root": None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/methods_study"), help="the sweep's folder")
    p.add_argument("--data-root", type=Path, default=Path("demo_out"),
                   help="where the demo's shard sets are (generated there when missing, as `make demo` does)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--configs", type=Path, default=REPO / "configs" / "methods",
                   help="folder of the methods' YAMLs (NAME.yaml)")
    p.add_argument("--unique", default="1%,100%", help="comma-separated N (counts or fractions of the pool)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--budget", default="128K", help="budget C: samples seen by every run")
    p.add_argument("--head-scale", type=float, default=4.0,
                   help="divide the YAMLs' head widths by this (4: ResNet-18's 512 features over the study's 128)")
    p.add_argument("--workers", type=int, default=1, help="data-loader workers of each run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--collect", action=argparse.BooleanOptionalAction, default=False,
                   help="only tabulate the cells already finished (train nothing; unfinished cells are left out; "
                        "default: off)")
    p.add_argument("--pool", type=int, help="samples in the generated pool (default: the demo's, 4000)")
    p.add_argument("--down-train", type=int, help="samples per downstream training set (default: the demo's, 1000)")
    p.add_argument("--down-test", type=int, help="samples per downstream test set (default: the demo's, 2000)")
    p.add_argument("--backbone", help="timm backbone (default: the demo's, resnet10t)")
    p.add_argument("--backbone-options", help="JSON, to timm (default: the demo's narrow channels)")
    p.add_argument("--batch-size", type=int, help="batch of every run (default: the demo's, 128)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="toy sizes, in well under a minute: checks that the benchmark runs, its figures mean nothing "
                        f"({', '.join(f'{k}={v}' for k, v in QUICK.items() if v is not None).replace('%', '%%')}, "
                        "temporary --out and --data-root; options given win; default: off)")
    return p


def method_settings(folder: Path, method: str, head_scale: float = 1.0) -> dict:
    """The method's own settings from its small-image YAML, head widths divided by `head_scale`."""
    from stream_ssl.config import load_yaml_settings

    settings = {k: v for k, v in load_yaml_settings(folder / f"{method}.yaml").items() if k in METHOD_KEYS}
    options = dict(settings.get("method_options") or {})
    for key in WIDTHS | {EMBEDDING_WIDTH.get(method, "")}:
        if key in options:
            options[key] = max(1, round(options[key] / head_scale))
    settings["method_options"] = options
    return settings


def study_spec(a: argparse.Namespace) -> dict:
    """The demo's sweep (data, network, budget, evaluation) with the methods and their YAML settings."""
    from launch.demo import demo_sweep, prepare_data
    from launch.demo import parser as demo_parser

    given = [arg for key in DEMO_OPTIONS if getattr(a, key) is not None
             for arg in (f"--{key.replace('_', '-')}", str(getattr(a, key)))]
    d = demo_parser().parse_args(["--out", str(a.data_root), "--budget", a.budget, "--unique", a.unique,
                                  "--seeds", a.seeds, "--workers", str(a.workers), "--threads", str(a.threads),
                                  *given])
    pool, down = prepare_data(d)
    spec = demo_sweep(d, pool, down)
    for key in METHOD_KEYS:
        spec["train"].pop(key, None)
    spec["train"]["precision"] = "no"
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    spec.update(name="methods_study", out=str(a.out),
                methods={m: method_settings(a.configs, m, a.head_scale) for m in methods})
    return spec


# ----------------------------------------------------------------------------------------------------------
# The table.


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0


def fmt(values: list[float], digits: int = 3) -> str:
    """mean ± std over seeds; a single seed is marked as such (no spread to show)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    m, s = mean_std(vals)
    return "-" if not vals else f"{m:.{digits}f} ± {s:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f} (1 seed)"


def collapse_std(run: str) -> tuple[float | None, float | None]:
    """The collapse monitor's final std of a run, and that std x sqrt(d) (1 healthy, 0 collapsed)."""
    path = Path(run) / "summary.json"
    monitor = json.loads(path.read_text()).get("collapse_monitor") or {} if path.exists() else {}
    std, d = monitor.get("embed_std"), monitor.get("embed_dim")
    return std, (std * math.sqrt(d) if std is not None and d else None)


def method_rows(rows: list[dict], method: str, down: str) -> dict:
    """Per seed, for one method and downstream set: kNN, linear and the final collapse std at the smallest and
    the largest N, and the random init."""
    cells = [r for r in rows if r["method"] == method and r["downstream"] == down and not r.get("baseline")]
    base = [r for r in rows if r["method"] == f"{method}: random init" and r["downstream"] == down]
    if not cells:
        return {}
    lo, hi = min(r["N"] for r in cells), max(r["N"] for r in cells)
    pick = lambda n, key: {r["seed"]: r[key] for r in cells if r["N"] == n}  # noqa: E731
    return {"n_lo": lo, "n_hi": hi,
            "knn_lo": pick(lo, "knn_k20"), "knn_hi": pick(hi, "knn_k20"),
            "lin_lo": pick(lo, "linear_top1"), "lin_hi": pick(hi, "linear_top1"),
            "knn_rand": {r["seed"]: r["knn_k20"] for r in base},
            "lin_rand": {r["seed"]: r["linear_top1"] for r in base},
            "std_lo": {r["seed"]: collapse_std(r["run"]) for r in cells if r["N"] == lo},
            "std_hi": {r["seed"]: collapse_std(r["run"]) for r in cells if r["N"] == hi}}


def table(rows: list[dict], methods: list[str], downs: list[str]) -> str:
    """One row per downstream set, method and N (the smallest and the largest), and the random init."""
    lines = ["| downstream | method | N | kNN k=20 | linear top-1 | final embedding std (x sqrt(d)) |",
             "|---|---|---|---|---|---|"]
    for down in downs:
        rand = None
        for method in methods:
            m = method_rows(rows, method, down)
            if not m:
                continue
            rand = rand or m
            for n, end in ((m["n_lo"], "lo"), (m["n_hi"], "hi"))[: 1 if m["n_lo"] == m["n_hi"] else 2]:
                stds = list(m[f"std_{end}"].values())
                lines.append(f"| {down} | {method} | {n} | {fmt(list(m[f'knn_{end}'].values()))} | "
                             f"{fmt(list(m[f'lin_{end}'].values()))} | "
                             f"{fmt([a for a, _ in stds if a is not None], 4)} "
                             f"({fmt([b for _, b in stds if b is not None], 2)}) |")
        if rand:
            lines.append(f"| {down} | random init | 0 | {fmt(list(rand['knn_rand'].values()))} | "
                         f"{fmt(list(rand['lin_rand'].values()))} | - |")
    return "\n".join(lines)


def checks(rows: list[dict], methods: list[str]) -> tuple[list[str], int]:
    """The study's two checks in domain a; returns the report lines and how many methods gain with N."""
    lines, gaining = [], 0
    for method in methods:
        m = method_rows(rows, method, DOMAIN)
        if not m:
            lines.append(f"{method}: no finished cells")
            continue
        margins = {s: m["knn_hi"][s] - m["knn_rand"].get(s, float("nan")) for s in m["knn_hi"]}
        # Accuracies are counts over a test set: 0.35 - 0.25 is 200 of 2000 images, exactly 10 points, though in
        # floating point it is 0.09999...; compare at a resolution far below one image.
        beats = bool(margins) and all(round(v, 9) >= MARGIN for v in margins.values())
        gain = mean_std(list(m["knn_hi"].values()))[0] - mean_std(list(m["knn_lo"].values()))[0]
        gaining += gain > 0
        lines.append(f"{method}: largest N beats random init by {', '.join(f'{v:+.3f}' for v in margins.values())} "
                     f"kNN (seeds {', '.join(map(str, margins))}): {'ok' if beats else 'NOT >= 0.10'}; "
                     f"largest - smallest N: {gain:+.3f}")
    return lines, gaining


def plot(rows: list[dict], methods: list[str], downs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(downs), figsize=(5.2 * len(downs), 4.2), dpi=120, squeeze=False)
    for ax, down in zip(axes[0], downs):
        rand = None
        for method in methods:
            m = method_rows(rows, method, down)
            if not m:
                continue
            ns = [m["n_lo"], m["n_hi"]]
            pts = [mean_std(list(m["knn_lo"].values())), mean_std(list(m["knn_hi"].values()))]
            ax.errorbar(ns, [p[0] for p in pts], yerr=[p[1] for p in pts], marker="o", capsize=3, label=method)
            rand = rand or mean_std(list(m["knn_rand"].values()))
        if rand:
            ax.axhline(rand[0], linestyle="--", color="gray", label="random init")
        ax.set_xscale("log")
        ax.set_xlabel("unique samples N (log scale)")
        ax.set_ylabel("kNN top-1 (k=20)")
        ax.set_title(f"downstream {down}")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = parse_quick(p, argv, QUICK)
    temporary = [key for key in ("out", "data_root") if getattr(a, key) is None]
    for key in temporary:
        setattr(a, key, Path(tempfile.mkdtemp(prefix=f"methods-study-{key}-")))
    try:
        return study(a, temporary)
    finally:
        for key in temporary:
            shutil.rmtree(getattr(a, key), ignore_errors=True)


def study(a: argparse.Namespace, temporary: list[str]) -> int:
    from launch.sweep import SweepError, collect, load_sweep, run_local

    t0 = time.perf_counter()
    try:
        sweep = load_sweep(study_spec(a))
        failed = 0 if a.collect else run_local(sweep, None)
        result = collect(sweep)
    except (SweepError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    methods, downs = list(sweep.methods), list(sweep.downstream)
    text = table(result["rows"], methods, downs)
    report, gaining = checks(result["rows"], methods)
    header = (f"Budget C = {a.budget} samples seen, N = {a.unique} of the demo's pool, seeds {a.seeds}; "
              "mean ± std over seeds.")
    summary = f"{gaining} of {len(methods)} methods are higher at the largest N than at the smallest (domain a)."
    (a.out / "methods.md").write_text("\n\n".join([header, text, "\n".join(report), summary]) + "\n")
    plot(result["rows"], methods, downs, a.out / "methods.png")
    print("\n" + header + "\n\n" + text + "\n\n" + "\n".join(report) + "\n" + summary)
    where = (f"{a.out} (temporary, removed)" if "out" in temporary else
             f"{a.out / 'methods.md'}, {a.out / 'methods.png'}; sweep rows in {result['csv']}")
    print(f"\n[methods study] {(time.perf_counter() - t0) / 60:.1f} min; {where}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
