"""Every script in benchmarks/ in its quick mode (`python -m benchmarks.NAME --quick` from the repository root):
it exits 0 and prints its table and ratio lines. A benchmark that no longer starts (an import that moved, an
option that changed) or that stops printing its figures fails here; its figures themselves are not checked
(toy sizes measure nothing). gpu_check.py's quick mode is its CPU mode: its rows are checked in detail."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from shard_tools.dedup import DEFAULT_THRESHOLD, DEFAULT_VERIFY
from tests.helpers import PYTHON, REPO
from tests.helpers.trainer import child_env

pytestmark = pytest.mark.multiprocess

NUMBER = r"-?[\d,]+(\.\d+)?"
RATIO = r"\d+\.\d+"

# Per script: patterns (regular expressions, multiline) its output must contain.
EXPECTED = {
    "augment": [rf"^recipe {r}: views" for r in ("simclr", "simclr-noblur", "dino")] +
               [rf"^  \(b\)/\(a\) = {RATIO}x", rf"^  \(b\)/\(d\) = {RATIO}$", r"^  \(a\) torchvision +[\d.]+ img/s",
                rf"^  \(c\)/\(a\) = {RATIO}x|^note: rows \(c\) dali-cpu and \(e\) dali-mixed left out: ",
                r"^note: rows \(e\) dali-mixed and \(f\) ours with the photometric part on the GPU left out: "],
    "dedup": [r"^\| threshold \(of 64\) \| verify \(of 256\) \| group precision",
              rf"^\| {DEFAULT_THRESHOLD} \| {DEFAULT_VERIFY} \| {RATIO} \(\d+ pairs\) \| {RATIO} \(\d+ planted\) \| "
              rf"{RATIO} \| {RATIO}",
              r"^dedup\.py end to end on the pool .* img/s per core",
              rf"^  ratio hash / full decode \(img/s\): {RATIO}$", r"^  5000 images: .* us per image"],
    "diversity_trend": [r"^\| downstream \| metric \| random init \| N smallest \| N largest \| gain",
                        rf"^\| a \| kNN k=20 \| {RATIO} ± {RATIO} \| {RATIO} ± {RATIO} \(N=\d+\) \| "
                        rf"{RATIO} ± {RATIO} \(N=\d+\) \| [+-]{RATIO} ± {RATIO} \(1 seed\)",
                        r"^\| b \(shifted\) \| linear top-1 \|", r"^\[trend\] "],
    "methods_study": [r"^\| downstream \| method \| N \| kNN k=20 \| linear top-1 \|",
                      rf"^\| a \| byol \| \d+ \| {RATIO} \(1 seed\) \| {RATIO} \(1 seed\) \|",
                      r"^\| b \(shifted\) \| random init \| 0 \|", r"^byol: largest N beats random init by ",
                      r"^\d of 1 methods are higher at the largest N"],
    "node_cache": [r"^\| nodes \| mode \| pass 1 MB \| pass 2 MB \| total MB \| pools"] +
                  [rf"^\| {n} \| {m} \| {RATIO} \| {RATIO} \|" for n in (1, 2) for m in ("none", "on-demand", "fill")] +
                  [rf"^{n} node\(s\): object-store bytes fill / on-demand = {RATIO}, fill / none = {RATIO}$"
                   for n in (1, 2)] + [r"^one pass at s3-30ms: cold \(no cache\) .* warm is [\d.]+x faster"],
    "pack": [rf"^  {re.escape(v)} +{NUMBER} images/s" for v in ("tar", "pack", "pack -w2", "resize", "resize -w2")] +
            [rf"^ratio {re.escape(r)}: +{RATIO}$" for r in ("pack / tar (target >= 0.8)", "pack -w2 / pack (scaling)",
                                                            "resize / pack (re-encode cost)",
                                                            "resize -w2 / resize (scaling)")],
    "pack_plan": [r"^run +rows kept +read s +assign s +rows/s"] +
                 [rf"^{re.escape(k)} +{NUMBER}K? +{RATIO} +{RATIO} +{NUMBER} .* {RATIO} +{RATIO}$"
                  for k in ("baseline", "1/1", "1/4")],
    "plan_scale": [r"^ +shards +index s +plan s +plan/index", rf"^ratio plan/index-build at 100 shards: {RATIO}$",
                   rf"^ratio per-shard plan time 100 vs 10 shards: {RATIO} ", r"^plan memory: \d+ bytes/shard peak"],
    "shard_check": [r"^ +shards +entries +pages +prefixes +index s", rf"^ +1,500 +2,99\d +\d+ +\d+ +{RATIO}",
                    rf"^ratio check/index-build at 1,500 shards: {RATIO}; check/listing alone: {RATIO}$",
                    rf"^requests: \d+ list requests .* ratio in turn / measured {RATIO} ",
                    r"^report: s3://bucket/pool: 3 of 1500 shards missing"],
    "startup": [r"^phase +seconds +RSS after +traced peak +what$",
                *(rf"^{re.escape(phase)} +{RATIO} " for phase in ("index.json read", "index.json parse", "plan",
                                                                   "shard check", ".idx fetches", "first batch")),
                rf"^total to the first batch: {RATIO} s \(target <= 15 s .*ratio total / index.json read alone "
                rf"\(the floor, {RATIO} s\): {RATIO}$",
                r"^peak memory: ru_maxrss [\d.]+ [KMG]i?B .* tracemalloc peak [\d.]+ [KMG]i?B$"],
    "stream": [r"^\| scenario \| webdataset \| ours \| ours unmixed \| litdata \| mosaic \| ceiling \|$",
               # samples/s: webdataset, ours, ours unmixed, (litdata, mosaic), ceiling, a median (one round: no range)
               *(rf"^\| {s} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| [^|]+ \| [^|]+ \| {NUMBER} \|$"
                 for s in ("local", "s3-30ms")),
               rf"^\| local-workers \| {NUMBER} \| {NUMBER} \| n/a \| ({NUMBER}|n/a) \| n/a \| n/a \|$",
               r"^ratios of samples/s, per round$",
               r"^\| scenario \| ours/ceiling \| ours/litdata \| ours/webdataset \|$",
               *(rf"^\| {s} \| {RATIO} \| ({RATIO}|n/a) \| {RATIO} \|$" for s in ("local", "s3-30ms")),
               rf"^\| local-workers \| n/a \| ({RATIO}|n/a) \| {RATIO} \|$",
               r"^read only: samples/s from the end of construction$",
               r"^time to the first batch of 8, construction included, ms$",
               # requests per pass, data/meta/HEAD/LIST: ours reads index.json and its index pack, no HEAD
               r"^\| s3-30ms \| \d+/0/\d+/\d+ \| [1-9]\d*/2/0/\d+ \| [1-9]\d*/2/0/\d+ \|",
               # samples per CPU second, with the workers' CPU; the last column is ours/litdata
               rf"^\| local-workers \| {NUMBER} \| {NUMBER} \| n/a \| ({NUMBER}|n/a) \| n/a \| n/a \| "
               rf"({RATIO}|n/a) \|$",
               # the emulated stores: their row, or the reason their emulator did not start
               *(rf"^\| {s} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| n/a \| n/a \| {NUMBER} \|$|^row {s} left out: "
                 for s in ("gcs-30ms", "azure-30ms")),
               r"^timeline s3-30ms, ours \(round 1, the median\): constructed [\d,]+ ms \(index [\d,]+ ms, plan .*; "
               r"first data GET [\d,]+ ms, first data byte [\d,]+ ms; first batch [\d,]+ ms, last batch [\d,]+ ms; "
               r"at most \d+ requests in flight",
               r"^columns litdata and mosaic left out: |^\| local \|( [^|]+ \|){3} [\d,]+ \| [\d,]+ \|"],
    "stream_peers": [r"^  tar \(baseline\) +[\d,]+ samples/s$"] +
                    [rf"^ratio {r} / tar: ({RATIO}|n/a \(left out\))$" for r in ("litdata", "mosaic")] +
                    [rf"^  {r} +([\d,]+ samples/s|left out: not installed)" for r in ("litdata", "mosaic")],
    "train_step": [r"^  in-memory batches: +[\d.]+ samples/s", r"^  streaming loader: +[\d.]+ samples/s",
                   rf"^ratio streaming / in-memory: {RATIO}$"],
}

# Per script: patterns no line of its output may match.
UNEXPECTED = {
    "stream": [r"^error: "],  # a pass that did not hand every sample exactly once
}


def quick(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", f"benchmarks.{script}", "--quick", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script}.py --quick exited {proc.returncode}:\n" + (proc.stdout +
                                                                                      proc.stderr)[-4000:]
    return proc


def test_every_benchmark_has_a_quick_test():
    assert {p.stem for p in (REPO / "benchmarks").glob("*.py")} == set(EXPECTED) | {"gpu_check", "__init__", "quick"}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_mode_runs_and_prints_its_figures(script):
    out = quick(script).stdout
    missing = [p for p in EXPECTED[script] if not re.search(p, out, re.MULTILINE)]
    assert not missing, f"{script}.py --quick printed no line matching {missing}:\n{out[-4000:]}"
    wrong = [p for p in UNEXPECTED.get(script, []) if re.search(p, out, re.MULTILINE)]
    assert not wrong, f"{script}.py --quick printed a line matching {wrong}:\n{out[-4000:]}"


def test_gpu_check_quick_runs_every_section_on_the_cpu(tmp_path):
    """gpu_check.py --quick is its CPU mode: every section's code path, the CUDA-only rows named as left out, one
    table written (and printed), exit status 0 only when every check passed."""
    out = tmp_path / "gpu_check.md"
    proc = quick("gpu_check", "--out", str(out))
    table = out.read_text()
    assert "CPU (CUDA parts skipped)" in table and table in proc.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    checks = {r["check"]: r for r in rows}
    assert checks["ceiling: synthetic input, bf16, channels-last"]["steps_per_s"] > 0
    loaders = [r for r in rows if r["check"].startswith("loader")]
    assert {r["check"].split(",")[0] for r in loaders} == {"loader --decoder pil", "loader --decoder nvjpeg"}
    assert all(r["steps_per_s"] > 0 and "ratio" in r for r in loaders)
    methods = [r for r in rows if r["check"].startswith("method")]
    assert len(methods) == 7 and all(r["ok"] and r["relative"] <= 5e-2 for r in methods)
    assert any(r["check"].startswith("augment.py: (b) ours") for r in rows)
    assert any(r["check"].startswith("augment.py: (b)/(a) = ") for r in rows)
    left_out = {r["check"]: r["left_out"] for r in rows if "left_out" in r}
    assert "ceiling in float32 with TF32" in left_out and "| left out: a GPU setting" in table
    assert any(c.startswith("augment.py: rows (e) dali-mixed") for c in left_out)
