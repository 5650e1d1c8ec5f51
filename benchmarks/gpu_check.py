"""The GPU path in one script: under ten minutes on one H100/H200, a minute on a CPU (CUDA parts skipped).

    python -m benchmarks.gpu_check --out gpu_check.md       # on the GPU machine (see docs/performance.md)
    python -m benchmarks.gpu_check --cpu                    # every code path, tiny, no CUDA (about a minute)
    python -m benchmarks.gpu_check --quick                  # what CI runs: --cpu, fewer images, narrower heads

Prints one table and writes it (plus JSON) next to --out:
  1. ceiling   ResNet-50 SimCLR at 224 px, bf16, global batch 256, channels-last: steps/s on synthetic uint8
               views already on the GPU (photometric augmentation on the device included), and the same without
               channels-last, without cuDNN autotuning, and in float32 with and without TF32 (the GPU settings);
  2. loaders   the same training from a local shard set of generated 500x375 JPEGs (made on the spot) through
               the real loader: --decoder pil with 12 workers and --decoder nvjpeg; each as a ratio to (1)
               (target: >= 0.90);
  3. methods   one bf16 training step of each of the 7 methods: loss finite, and the bf16 loss equal to the float32
               loss of the same weights and inputs within a relative tolerance (5e-2: bf16 keeps 8 bits);
  4. augment   benchmarks/augment.py --gpu: photometric throughput on the GPU against the torchvision baseline.
Exits non-zero when any check fails. Installs nothing: everything it needs is on the GPU machine or in the
repository (`make gpu-bundle` gathers the few wheels that machine lacks, for the tests that need them).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from shard_tools.writer import ShardWriter  # noqa: E402
from stream_ssl.config import TrainConfig  # noqa: E402
from stream_ssl.data.loader import Batch  # noqa: E402
from stream_ssl.methods import METHODS, build_method  # noqa: E402
from stream_ssl.models.backbone import create_backbone  # noqa: E402
from stream_ssl.run import build_run, make_accelerator  # noqa: E402
from stream_ssl.train import Meter, release_accelerator, train_step  # noqa: E402

TOLERANCE = 5e-2
# --quick: heads an eighth as wide (and DINO's output a sixteenth); timm's toy networks are no faster here and
# fail the bf16 comparison by chance (NaN gradients, losses too small to compare)
QUICK_HEADS = {"barlow": {"proj_hidden": 1024, "proj_dim": 1024}, "vicreg": {"proj_hidden": 1024, "proj_dim": 1024},
               "dino": {"out_dim": 4096, "head_hidden": 512}}


class Sizes:
    """The settings of a GPU run, the tiny ones of a CPU run, or (quick) tinier ones of a CPU run."""

    def __init__(self, gpu: bool, quick: bool = False):
        self.gpu, self.quick = gpu, quick
        self.backbone, self.image, self.batch = ("resnet50", 224, 256) if gpu else ("resnet18", 32, 8)
        self.images, self.warmup, self.steps = (4096, 8, 30) if gpu else (24, 1, 1)
        self.pil_workers, self.nvjpeg_workers = (12, 8) if gpu else (2, 1)
        self.method_batch = 64 if gpu else 4
        self.precision = "bf16"
        # the methods' own heads, or (quick) narrower ones for the three whose heads cost seconds on a CPU
        self.method_options = QUICK_HEADS if quick else {}
        if quick:
            self.batch, self.images, self.pil_workers = 4, 8, 1


# ----------------------------------------------------------------------------------------------------------
# Data.


def _jpeg(i: int) -> bytes:
    from benchmarks.augment import photo_jpeg

    return photo_jpeg(i)


def make_shards(folder: Path, n: int) -> str:
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        datas = list(pool.map(_jpeg, range(n), chunksize=16))
    w = ShardWriter(folder, "gpu", 256)
    for i, d in enumerate(datas):
        w.add(f"{i:07d}", {"jpg": d, "cls": str(i % 10).encode()})
    w.finish(source="generated")
    return str(folder)


# ----------------------------------------------------------------------------------------------------------
# Training rates.


def config(sz: Sizes, data: str, out: Path, **kw) -> TrainConfig:
    steps = sz.warmup + sz.steps
    base = dict(data=data, unique_samples="1.0", budget_samples=str(steps * sz.batch), method="simclr",
                backbone=sz.backbone, image_size=sz.image, batch_size=sz.batch, precision=sz.precision,
                optimizer="lars", lr=0.3, num_workers=0, out=str(out), log_with="none", progress=False,
                log_every=10**6, save_every=0, resume="never")
    base.update(kw)
    return TrainConfig(**base)


def synthetic(run, device) -> object:
    """Endless batches of random uint8 views already on the device (what a perfect loader would give)."""
    views = [torch.randint(0, 256, (run.cfg.batch_size, 3, v.size, v.size), dtype=torch.uint8, device=device)
             for v in run.views]
    step = run.start_step
    while True:
        yield Batch(step, views, torch.zeros(run.cfg.batch_size, dtype=torch.int64), [""] * run.cfg.batch_size, 0)
        step += 1


def rate(cfg: TrainConfig, sz: Sizes, synthetic_input: bool) -> float:
    """Optimizer steps per second over `sz.steps` after `sz.warmup`, through the trainer's own train_step."""
    acc = make_accelerator(cfg)
    try:
        run = build_run(acc, cfg)
        run.prepare()
        if synthetic_input:
            run.batches = synthetic(run, acc.device)
        meter = Meter(run.world_size, run.global_batch)
        run.model.train()
        for step in range(sz.warmup):
            train_step(run, step, meter)
        _sync(acc.device)
        t0 = time.perf_counter()
        for step in range(sz.warmup, sz.warmup + sz.steps):
            train_step(run, step, meter)
        _sync(acc.device)
        if not all(math.isfinite(float(x)) for x in meter.losses):
            raise FloatingPointError("a loss is not finite")
        return sz.steps / (time.perf_counter() - t0)
    finally:
        release_accelerator()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _gpu_flags() -> tuple:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


def rates(sz: Sizes, data: str, tmp: Path) -> list[dict]:
    rows = []
    flags = _gpu_flags()
    variants = [("ceiling: synthetic input, bf16, channels-last", {}, True),
                ("ceiling without channels-last", {"channels_last": False}, True),
                ("ceiling without cuDNN autotuning", {"cudnn_benchmark": False}, True),
                ("ceiling in float32 with TF32", {"precision": "no", "tf32": True}, True),
                ("ceiling in float32 without TF32", {"precision": "no", "tf32": False}, True),
                (f"loader --decoder pil, {sz.pil_workers} workers", {"num_workers": sz.pil_workers}, False),
                (f"loader --decoder nvjpeg, {sz.nvjpeg_workers} workers",
                 {"decoder": "nvjpeg", "num_workers": sz.nvjpeg_workers}, False)]
    left_out = []
    if not sz.gpu:  # the CPU run checks the code paths: the ceiling and both loaders
        left_out = [{"check": name, "left_out": "a GPU setting, measured on a GPU only"}
                    for name, _, _ in variants[1:-2]]
        variants = variants[:1] + variants[-2:]
    for i, (name, kw, synth) in enumerate(variants):
        try:
            r = rate(config(sz, data, tmp / f"run{i}", **kw), sz, synth)
            rows.append({"check": name, "steps_per_s": r, "images_per_s": r * sz.batch})
        except Exception as e:  # noqa: BLE001 - reported in the table, the script exits non-zero
            rows.append({"check": name, "error": f"{type(e).__name__}: {e}"})
        finally:
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark) = flags
    ceiling = rows[0].get("steps_per_s")
    for row in rows[1:]:
        if ceiling and "steps_per_s" in row:
            row["ratio"] = row["steps_per_s"] / ceiling
            if row["check"].startswith("loader"):
                row["ok"] = row["ratio"] >= 0.9 or not sz.gpu
    return rows + left_out


# ----------------------------------------------------------------------------------------------------------
# Methods in bf16.


def method_step(name: str, sz: Sizes, device: torch.device) -> dict:
    """The loss of one forward in float32 and under bf16 autocast (same weights, same views), then one bf16
    training step: finite, and within TOLERANCE."""
    torch.manual_seed(0)
    backbone, dim = create_backbone(sz.backbone, sz.image)
    method = build_method(name, backbone, dim, **sz.method_options.get(name, {})).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    from stream_ssl.data.augment import photometric

    views = [photometric(torch.randint(0, 256, (sz.method_batch, 3, v.size, v.size), dtype=torch.uint8,
                                       device=device, generator=g), v, g) for v in method.views(sz.image)]
    method.set_step(0, 100)
    losses = {}
    for precision in ("fp32", "bf16"):
        m = copy.deepcopy(method)  # a forward may update state (centers, queues): each starts from the same
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses[precision] = m(views)["loss"]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses["bf16"].backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    opt.step()
    a, b = losses["fp32"].item(), losses["bf16"].item()
    rel = abs(a - b) / max(abs(a), 1e-6)
    ok = math.isfinite(a) and math.isfinite(b) and grads_finite and rel <= TOLERANCE
    return {"check": f"method {name}: bf16 step", "fp32_loss": a, "bf16_loss": b, "relative": rel, "ok": ok}


def methods(sz: Sizes, device: torch.device) -> list[dict]:
    rows = []
    for name in sorted(METHODS):
        try:
            rows.append(method_step(name, sz, device))
        except Exception as e:  # noqa: BLE001
            rows.append({"check": f"method {name}: bf16 step", "error": f"{type(e).__name__}: {e}"})
    return rows


# ----------------------------------------------------------------------------------------------------------
# augment.py --gpu, and the report.


def augment(sz: Sizes) -> list[dict]:
    args = ["--recipes", "simclr", "--no-dali", "--gpu"] + (["--images", "256", "--repeats", "2"] if sz.gpu else
                                                            ["--quick"] if sz.quick else
                                                            ["--images", "4", "--baseline-images", "2",
                                                             "--repeats", "1", "--size", "32"])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.augment", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, timeout=600)
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("(")]
    if proc.returncode != 0:
        return [{"check": "benchmarks/augment.py", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}]
    notes = [ln.removeprefix("note: ").split(" left out: ") for ln in proc.stdout.splitlines()
             if ln.startswith("note: ") and " left out: " in ln]
    return ([{"check": "augment.py: " + " ".join(ln.split()), "ok": True} for ln in lines] +
            [{"check": "augment.py: " + rows, "left_out": why} for rows, why in notes])


def table(rows: list[dict], header: str) -> str:
    out = [header, "", "| check | steps/s | images/s | ratio to ceiling | fp32 loss | bf16 loss | rel. diff | ok |",
           "|---|---|---|---|---|---|---|---|"]

    def f(row, key, fmt):
        return format(row[key], fmt) if key in row else ""

    for r in rows:
        ok = ("FAIL: " + r["error"] if "error" in r else "left out: " + r["left_out"] if "left_out" in r else
              {True: "yes", False: "FAIL", None: ""}[r.get("ok")])
        out.append(f"| {r['check']} | {f(r, 'steps_per_s', '.2f')} | {f(r, 'images_per_s', ',.0f')} | "
                   f"{f(r, 'ratio', '.2f')} | {f(r, 'fp32_loss', '.4f')} | {f(r, 'bf16_loss', '.4f')} | "
                   f"{f(r, 'relative', '.1e')} | {ok} |")
    return "\n".join(out)


def environment(device: torch.device) -> str:
    import timm
    import torchvision

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (CUDA parts skipped)"
    return (f"device: {name}; torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
            f"{timm.__version__}, CUDA {torch.version.cuda}; {os.cpu_count()} CPUs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="the table (and .json beside it)")
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=not torch.cuda.is_available(),
                   help="tiny settings on the CPU, CUDA parts skipped (default: when no GPU is visible)")
    p.add_argument("--sections", default="rates,methods,augment",
                   help="comma-separated: rates, methods, augment (default: all three)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="the CPU mode with fewer images, batches of 4 and narrower Barlow Twins, VICReg and DINO "
                        "heads, in seconds: checks that every section runs (implies --cpu; default: off)")
    a = p.parse_args(argv)
    sz = Sizes(gpu=not (a.cpu or a.quick), quick=a.quick)
    device = torch.device("cuda" if sz.gpu else "cpu")
    sections = a.sections.split(",")
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data = make_shards(Path(tmp) / "shards", sz.images) if "rates" in sections else ""
        if "rates" in sections:
            rows += rates(sz, data, Path(tmp))
        if "methods" in sections:
            rows += methods(sz, device)
    if "augment" in sections:
        rows += augment(sz)
    header = f"{environment(device)}; {time.perf_counter() - t0:.0f} s"
    text = table(rows, header)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"environment": header, "rows": rows}, indent=1) + "\n")
    failed = [r["check"] for r in rows if "error" in r or r.get("ok") is False]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
