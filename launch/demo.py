"""The whole path on generated data, small enough for a laptop: `make demo`.

Renders a labeled procedural image pool (domain a) and two downstream sets (domain a, and a shifted
domain b), packs them into shard sets, pretrains SimCLR at one fixed budget C for several numbers of
unique samples N, evaluates each backbone with kNN, and prints the table.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import the project, not this folder
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shard_tools.pack import pack
from shard_tools.shardset import load_shard_set
from shard_tools.synth import synthesize
from stream_ssl.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent


def make_set(root: Path, name: str, samples: int, domain: str, seed: int, source: str) -> Path:
    out = root / "shards" / name
    if (out / "index.json").exists():
        return out
    manifest = synthesize(root / "images" / name, samples, classes=10, size=64, domain=domain, seed=seed)
    pack(manifest, out, name=name, shard_size=250, seed=seed, source=source)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--pool", type=int, default=4000, help="samples in the pretraining pool")
    p.add_argument("--budget", default="16K", help="budget C: samples seen by every run")
    p.add_argument("--unique", default="2%,20%,100%", help="comma-separated N values (counts or fractions)")
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    root = a.out
    print(f"[demo] generating and packing data under {root} ...", flush=True)
    pool = make_set(root, "pool", a.pool, "a", 0, "real")
    down = {
        "a": (make_set(root, "down_a_train", 1000, "a", 101, "downstream"),
              make_set(root, "down_a_test", 500, "a", 102, "downstream")),
        "b (shifted)": (make_set(root, "down_b_train", 1000, "b", 201, "downstream"),
                        make_set(root, "down_b_test", 500, "b", 202, "downstream")),
    }
    rows = []
    for n in a.unique.split(","):
        run = root / "runs" / f"{a.method}_N{n.replace('%', 'pct')}"
        cmd = [sys.executable, str(REPO / "stream_ssl/train.py"), "--data", str(pool), "--unique-samples", n,
               "--budget-samples", a.budget, "--method", a.method, "--backbone", a.backbone,
               "--image-size", str(a.image_size), "--batch-size", str(a.batch_size), "--num-workers", str(a.workers),
               "--optimizer", "sgd", "--lr", "0.5", "--method-options", '{"proj_hidden": 256}',
               "--log-every", "50", "--out", str(run)]
        if not (run / "summary.json").exists():
            print(f"[demo] pretraining {a.method} with N = {n} ...", flush=True)
            subprocess.run(cmd, check=True)
        summary = json.loads((run / "summary.json").read_text())
        row = {"N": summary["plan"]["unique_samples"], "D": summary["plan"]["diversity"],
               "passes": summary["plan"]["passes"], "steps": summary["steps"], "loss": summary["final_loss"],
               "minutes": summary["wall_seconds"] / 60}
        for domain, (train, test) in down.items():
            row[f"kNN {domain}"] = evaluate(run, str(train), str(test))["knn_top1"]
        rows.append(row)

    print()
    print(f"{a.method}, budget C = {summary['plan']['budget_samples']} samples seen, pool of "
          f"{load_shard_set(str(pool)).num_samples} generated images; kNN (k=20, T=0.07) on held-out sets")
    table = format_table(rows)
    print(table)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n[demo] done in {(time.perf_counter() - t0) / 60:.1f} min; table in {root / 'results.md'}")
    return 0


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = {"N": "{:d}", "D": "{:.4f}", "passes": "{:.1f}", "steps": "{:d}", "loss": "{:.3f}", "minutes": "{:.1f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.get(c, "{:.3f}").format(r[c]) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
