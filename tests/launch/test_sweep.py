"""The diversity sweep on a tiny grid: cells train + evaluate, results.csv/md/png, re-runs skip, SLURM script."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from launch.sweep import SweepError, collect, compress_indices, load_sweep, main, slug, slurm_script
from tests.helpers import PYTHON, REPO
from tests.helpers.runs import TINY_BACKBONE, read_json

pytestmark = pytest.mark.multiprocess

TINY_TRAIN = {"backbone": TINY_BACKBONE, "image_size": 32, "batch_size": 16, "num_workers": 0, "optimizer": "sgd",
              "lr": 0.5, "method_options": {"proj_hidden": 64, "proj_dim": 32}, "progress": False,
              "log_with": "none", "log_every": 1}


@pytest.fixture(scope="module")
def sweep_file(make_shard_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    pool = make_shard_set(200, shard_size=100, seed=21)
    spec = {
        "name": "tiny",
        "out": str(root / "out"),
        "budget": 64,
        "unique": [16, "100%"],
        "methods": ["simclr"],
        "sources": {"gen_a": str(pool)},
        "downstream": {"a": {"train": str(make_shard_set(200, shard_size=100, seed=22)),
                             "test": str(make_shard_set(100, shard_size=100, seed=23))},
                       "b": {"train": str(make_shard_set(200, shard_size=100, seed=24, domain="b")),
                             "test": str(make_shard_set(100, shard_size=100, seed=25, domain="b"))}},
        "seeds": [0],
        "random_init": True,
        "train": TINY_TRAIN,
        "evaluate": {"distance_samples": 100},
        "launch": {"env": {"OMP_NUM_THREADS": "1"}},
        "slurm": {"partition": "gpu", "time": "01:00:00", "gpus": 1, "cpus": 8, "max_parallel": 4,
                  "setup": ["source .venv/bin/activate"]},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, root / "out"


def _sweep(args, timeout=600):
    return subprocess.run([PYTHON, str(REPO / "launch" / "sweep.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_cells_are_the_grid_and_settings_merge(sweep_file):
    path, out = sweep_file
    sweep = load_sweep(path)
    assert [c.name for c in sweep.cells] == ["simclr-gen_a-N16-s0", "simclr-gen_a-N100pct-s0"]
    cell = sweep.cells[1]
    assert cell.settings["unique_samples"] == "100%" and cell.settings["budget_samples"] == "64"
    assert cell.settings["backbone"] == TINY_BACKBONE and cell.run == out / "runs" / cell.name
    assert slug("real+gen 10%") == "real_plus_gen_10pct"
    assert compress_indices([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8" and compress_indices([3]) == "3"


def test_bad_sweeps_are_refused(sweep_file, tmp_path):
    path, _ = sweep_file
    spec = yaml.safe_load(path.read_text())
    with pytest.raises(SweepError, match="unknown train.py settings"):
        load_sweep({**spec, "train": {"batchsize": 3}})
    with pytest.raises(SweepError, match="set by the sweep"):
        load_sweep({**spec, "train": {"unique_samples": 3}})
    with pytest.raises(SweepError, match="budget"):
        load_sweep({k: v for k, v in spec.items() if k != "budget"})


def test_dry_run_lists_cells_and_commands(sweep_file):
    path, out = sweep_file
    runs = sorted((out / "runs").rglob("*")) if (out / "runs").exists() else []  # (another test may have run them)
    proc = _sweep([path, "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("cell ")]
    assert len(lines) == 2
    assert "stream_ssl/train.py --config" in lines[0] and "simclr-gen_a-N16-s0.yaml" in lines[0]
    assert (sorted((out / "runs").rglob("*")) if (out / "runs").exists() else []) == runs  # nothing started
    assert "warning" not in proc.stderr  # every input is a shard set
    sweep = load_sweep(path)
    for line, cell in zip(lines, sweep.cells):  # the commands run as printed: the YAML they read exists
        config = shlex.split(line.split(": ", 1)[1])[-1]
        assert yaml.safe_load(Path(config).read_text()) == {k: v for k, v in cell.settings.items() if v is not None}


def test_sweep_runs_collects_and_skips_finished_cells(sweep_file, capsys):
    path, out = sweep_file
    proc = _sweep([path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6  # 2 cells x 2 downstream sets, and the untrained backbone on both
    base = [r for r in rows if r["method"] == "simclr: random init"]
    assert len(base) == 2 and all(r["N"] == "0" and r["frechet"] == "" for r in base)
    by = {(r["unique"], r["downstream"]): r for r in rows}
    small, full = by[("16", "a")], by[("100%", "a")]
    assert int(small["N"]) == 16 and int(full["N"]) == 200 and int(small["C"]) == 64
    assert float(small["D"]) == pytest.approx(16 / 64) and float(small["passes"]) == pytest.approx(4.0)
    assert float(full["D"]) == pytest.approx(200 / 64)
    assert int(small["steps"]) == 64 // 16
    for r in rows:
        for key in ("knn_k20", "knn_k200", "linear_top1", "linear_top5"):
            assert 0.0 <= float(r[key]) <= 1.0
    cells = [r for r in rows if r not in base]
    assert all(float(r["frechet"]) > 0 and float(r["train_seconds"]) > 0 for r in cells)
    assert all(float(r["vdna"]) > 0 and float(r["kid_std"]) > 0 and r["kid"] != "" for r in cells)
    assert all(int(r["distance_samples"]) == 100 for r in cells)  # samples of the whole source, for every N
    for name in ("diversity.png", "gain_vs_distance.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = (out / "results.md").read_text()
    assert "| downstream | method | source | N | D |" in table and table.split("\n\n")[1].count("| simclr |") == 4
    assert table.count("| simclr: random init |") == 2
    assert table.split("\n\n")[1].strip() in proc.stdout  # the table is printed too
    assert "| simclr | gen_a | a | 16 → 200 |" in table and "gain_vs_distance.png" in proc.stdout

    stamps = {c: (out / "runs" / c / "summary.json").stat().st_mtime_ns
              for c in ("simclr-gen_a-N16-s0", "simclr-gen_a-N100pct-s0")}
    capsys.readouterr()
    assert main([str(path)]) == 0  # in this process from here on: nothing is trained any more
    again = capsys.readouterr().out
    assert again.count("finished, skipped") == 2 and "training" not in again
    assert stamps == {c: (out / "runs" / c / "summary.json").stat().st_mtime_ns for c in stamps}

    # a changed evaluation setting re-evaluates without retraining (here through the one-cell-per-GPU path)
    spec = yaml.safe_load(path.read_text())
    spec["evaluate"]["linear"] = False
    path2 = path.with_name("tiny2.yaml")
    path2.write_text(yaml.safe_dump(spec))
    import launch.sweep as sweep_module

    with pytest.MonkeyPatch.context() as mp:  # as if 2 GPUs were visible: one cell process per "GPU"
        mp.setattr(sweep_module, "gpu_count", lambda: 2)
        assert main([str(path2)]) == 0
    third = capsys.readouterr().out
    assert "on GPU 0" in third and "on GPU 1" in third
    for name in stamps:
        log = (out / "logs" / f"{name}.log").read_text()
        assert ": evaluating" in log and ": training" not in log
    assert all("linear" not in r for r in read_json(out / "runs" / "simclr-gen_a-N16-s0" / "eval.json")["results"]
               .values())

    # SLURM: every cell is finished, nothing to submit
    assert main([str(path2), "--slurm"]) == 2
    assert "nothing to submit" in capsys.readouterr().err


def test_gains_from_smallest_to_largest_n_with_the_largest_n_distances():
    from launch.sweep import gains

    def g(down, n, acc, fd, baseline=False):
        return {"method": "m", "source": "s", "downstream": down, "N": n, "knn_k20": acc, "linear_top1": acc / 2,
                "frechet": fd, "kid": fd / 100, "vdna": fd / 10, "baseline": baseline}

    groups = [g("a", 40, 0.5, 1.0), g("a", 4000, 0.7, 2.0), g("a", 400, 0.6, 9.0), g("b", 40, 0.4, 5.0),
              g("b", 4000, 0.45, 6.0), g("a", 0, 0.2, float("nan"), baseline=True), g("c", 40, 0.3, 1.0)]
    rows = gains(groups, "knn")
    assert [(r["downstream"], r["N_small"], r["N_large"]) for r in rows] == [("a", 40, 4000), ("b", 40, 4000)]
    assert [r["gain"] for r in rows] == pytest.approx([0.2, 0.05])
    assert [(r["frechet"], r["kid"], r["vdna"]) for r in rows] == [(2.0, 0.02, 0.2), (6.0, 0.06, 0.6)]
    assert gains(groups, "linear")[0]["gain"] == pytest.approx(0.1)


def test_slurm_array_script(sweep_file, tmp_path, capsys):
    path, _ = sweep_file
    spec = yaml.safe_load(path.read_text())
    spec["out"] = str(tmp_path / "fresh")
    sweep = load_sweep(spec)
    script = slurm_script(sweep, str(path))
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --array=0-1%4" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --time=01:00:00" in script and "source .venv/bin/activate" in script
    assert '--cell "$SLURM_ARRAY_TASK_ID"' in script and "export OMP_NUM_THREADS=1" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell
    # Setup lines (conda activate, module load) may read unset variables: they run before `set -u`.
    spec_u = {**spec, "slurm": {**spec["slurm"], "setup": ['echo "setup sees ${NOT_SET_ANYWHERE_X}"']}}
    head = slurm_script(load_sweep(spec_u), str(path)).split("\nPYTHON=")[0]
    assert head.index("setup sees") < head.index("\nset -u\n")
    ran = subprocess.run(["bash"], input=head, text=True, capture_output=True)
    assert ran.returncode == 0 and "setup sees" in ran.stdout, ran.stderr

    p2 = tmp_path / "s.yaml"
    p2.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main([str(p2), "--slurm"]) == 0
    assert (tmp_path / "fresh" / "sweep.sbatch").read_text() == slurm_script(load_sweep(p2), str(p2))
    collect = (tmp_path / "fresh" / "collect.sbatch").read_text()
    assert "--collect" in collect and "sbatch --dependency=afterany" in capsys.readouterr().out
    assert main([str(p2), "--slurm", "--dry-run"]) == 0
    assert "#SBATCH --array=0-1%4" in capsys.readouterr().out


def test_a_diverging_cell_is_a_result_and_the_sweep_goes_on(make_shard_set, tmp_path, capsys):
    """train.py exits 3 when the loss stops being finite: the sweep records the cell as diverged (a row with that
    status and train.py's reason), trains the other cells, exits 0, and does not train it again on a re-run."""
    options = {"proj_hidden": 64, "proj_dim": 32}
    spec = {"name": "nan", "out": str(tmp_path / "out"), "budget": 64, "unique": [32],
            "methods": {"simclr": {}, "vicreg": {"lr": 1e12, "warmup_fraction": 0.0, "method_options": options}},
            "sources": {"gen_a": str(make_shard_set(200, shard_size=100, seed=21))},
            "train": {**TINY_TRAIN, "save_every": 1}}
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = _sweep([path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["simclr"]["status"] == "done" and float(rows["simclr"]["final_loss"]) > 0
    bad = rows["vicreg"]
    assert bad["status"] == "diverged" and bad["final_loss"] == "" and "at optimizer step" in bad["reason"]
    assert "vicreg-gen_a-N32-s0: diverged (" in proc.stdout and "training failed" not in proc.stdout
    assert "Diverged (no accuracy):\n- vicreg-gen_a-N32-s0: diverged (" in (tmp_path / "out" / "results.md").read_text()
    capsys.readouterr()
    assert main([str(path)]) == 0
    again = capsys.readouterr().out
    assert "vicreg-gen_a-N32-s0: diverged, skipped" in again and "training" not in again


def test_missing_inputs_are_warned_about_in_a_dry_run_and_stop_a_real_run(make_shard_set, tmp_path, capsys):
    """Every input of the unfinished cells is checked before the first cell runs: a dry run lists the missing
    ones (and marks the cells reading them), a real run stops with one line naming all of them, before training."""
    here, down = make_shard_set(200, shard_size=100, seed=21), make_shard_set(100, shard_size=100, seed=23)
    spec = {"name": "gaps", "out": str(tmp_path / "out"), "budget": 64, "unique": [16],
            "sources": {"here": str(here), "gone": str(tmp_path / "no_pool")},
            "downstream": {"a": {"train": str(down), "test": str(down)}}, "train": TINY_TRAIN}
    path = tmp_path / "gaps.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--dry-run"]) == 0
    printed = capsys.readouterr()
    cells = {ln.split()[2]: ln for ln in printed.out.splitlines() if ln.startswith("cell ")}
    assert "input missing" in cells["simclr-gone-N16-s0"] and "input missing" not in cells["simclr-here-N16-s0"]
    warnings = [ln for ln in printed.err.splitlines() if ln.startswith("warning: not a shard set:")]
    assert warnings == [f"warning: not a shard set: sources.gone {tmp_path / 'no_pool'} (no index.json)"]

    spec["downstream"]["a"]["train"] = str(tmp_path / "no_train")
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: 2 inputs of the sweep are not shard sets, nothing was run: sources.gone ")
    assert "downstream.a.train" in line and str(down) not in line and str(here) not in line
    assert not (tmp_path / "out" / "runs").exists()  # no cell started
    assert main([str(path), "--cell", "0"]) == 2  # what a SLURM task or a GPU slot runs checks its own cell
    assert "downstream.a.train" in capsys.readouterr().err and not (tmp_path / "out" / "runs").exists()


def _fake_cell(sweep, index: int, results: dict) -> None:
    """A finished cell's summary.json and eval.json, as train.py and the evaluation write them."""
    cell = sweep.cells[index]
    cell.run.mkdir(parents=True, exist_ok=True)
    n = int(cell.unique)
    plan = {"unique_samples": n, "budget_samples": 64, "diversity": n / 64, "passes": 64 / n}
    (cell.run / "summary.json").write_text(json.dumps({"plan": plan, "steps": 4, "final_loss": 1.0}))
    (cell.run / "eval.json").write_text(json.dumps({"cell": cell.name, "results": results}))


def _result(acc: float, frechet: float) -> dict:
    return {"knn": {"k20_t0.07": acc}, "distance": {"frechet": frechet, "kid": frechet / 10, "kid_std": 0.01,
                                                     "vdna": frechet / 5, "samples": 100}}


def test_gain_plot_needs_two_downstream_sets(tmp_path):
    """gain_vs_distance.png plots the gain against the distance across downstream sets: with one set each panel
    would hold one point, so it is not drawn, and the output says why (a stale one is removed)."""
    spec = {"name": "one", "out": str(tmp_path / "out"), "budget": 64, "unique": [16, 64],
            "sources": {"s": str(tmp_path / "pool")},
            "downstream": {d: {"train": str(tmp_path / d), "test": str(tmp_path / d)} for d in ("a", "b")}}
    sweep = load_sweep(spec)
    png = tmp_path / "out" / "gain_vs_distance.png"
    for i, acc in enumerate((0.4, 0.6)):
        _fake_cell(sweep, i, {"a": _result(acc, 2.0), "b": _result(acc - 0.1, 5.0)})
    result = collect(sweep, log=lambda text: None)
    assert result["gain_plot"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["downstream"] for r in result["gains"]] == ["a", "b"]

    for i, acc in enumerate((0.4, 0.6)):
        _fake_cell(sweep, i, {"a": _result(acc, 2.0)})
    logged = []
    result = collect(sweep, log=logged.append)
    assert result["gain_plot"] is None and not png.exists() and (tmp_path / "out" / "diversity.png").exists()
    assert [r["downstream"] for r in result["gains"]] == ["a"]  # the gain is still in the table
    assert logged == ["[sweep] gain_vs_distance.png not drawn: one downstream set (a): the plot compares the gains "
                      "on several downstream sets at their distances, and needs at least 2"]
    assert "gain_vs_distance.png is not drawn: one downstream set (a)" in (tmp_path / "out" / "results.md").read_text()
