"""The trainer end to end: all seven methods on two processes through `accelerate launch`, the run's outputs
(metrics, TensorBoard, summary, checkpoints, kNN monitor, timm-loadable backbone), mixed precision, gradient
accumulation and clipping, the method configs, and the errors a user must see clearly."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from stream_ssl.config import TrainConfig, parse_config
from stream_ssl.methods import METHODS
from stream_ssl.train import main, train
from tests.helpers import REPO
from tests.helpers.trainer import TINY, accelerate_cmd, run

pytestmark = pytest.mark.multiprocess

DRIVER = "tests.helpers.trainer_driver"  # a module, run from the repository root under accelerate launch
STEPS = 20


def tiny_config(data: Path, out: Path, method: str = "simclr", **overrides) -> TrainConfig:
    options, optimizer, lr = TINY[method]
    values = dict(data=str(data), out=str(out), method=method, method_options=dict(options), backbone="test_resnet",
                  image_size=32, batch_size=16, optimizer=optimizer, lr=lr, num_workers=0, progress=False,
                  log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_method_trains_on_two_processes(make_shard_set, tmp_path):
    data = make_shard_set(128, shard_size=32)
    r = run([*accelerate_cmd(DRIVER), data, tmp_path, ",".join(TINY), STEPS], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == sorted(METHODS)
    for method, res in results.items():
        assert res["world_size"] == 2 and res["global_batch"] == 32 and res["steps"] == STEPS, method
        loss = res["losses"]
        assert len(loss) == STEPS and all(math.isfinite(v) for v in loss), (method, loss)
        # Decreasing: after a 2-step burn-in (BN statistics, DINO's zero-initialized center), the mean of the
        # last 4 steps is below the mean of the first 4.
        head, tail = sum(loss[2:6]) / 4, sum(loss[-4:]) / 4
        assert tail < head, (method, loss)
        assert res["checksums"][0] == res["checksums"][1], method  # DDP kept both replicas identical


def test_run_outputs_accumulation_and_knn_monitor(make_shard_set, tmp_path):
    data = make_shard_set(128, shard_size=32)
    labeled = make_shard_set(60, shard_size=30, seed=1)
    out = tmp_path / "run"
    cfg = tiny_config(data, out, budget_samples="176", grad_accum=2, save_every=2, eval_every=2,
                      knn_train=str(data), knn_test=str(labeled), knn_k=5)
    summary = train(cfg)
    # global batch 16 x 2 = 32: 176 // 32 = 5 optimizer steps of 2 micro-batches; the plan's global batch is 32
    assert summary["global_batch"] == 32 and summary["steps"] == 5 and summary["micro_steps"] == 10
    assert summary["plan"]["global_batch"] == 32 and summary["plan"]["steps"] == 5
    assert summary["plan"]["dropped"] == 16
    assert summary["peak_lr"] == pytest.approx(2.0 * 32 / 256)
    assert json.loads((out / "run.json").read_text())["global_batch"] == 32
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert {"loss", "lr", "weight_decay", "samples_per_s", "data_wait", "samples"} <= set(rows[0])
    assert [int(r["samples"]) for r in rows] == [32, 64, 96, 128, 160]
    assert all(0 <= float(r["data_wait"]) <= 1 for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(0.25)  # warm-up: 1 step of 5 x 0.1 -> peak at step 0
    assert {"embed_std", "embed_rank"} <= set(rows[0])  # the collapse monitor, every row
    monitor = summary["collapse_monitor"]
    assert monitor["embed_std"] == pytest.approx(float(rows[-1]["embed_std"]), rel=1e-5)
    assert monitor["embed_dim"] == 64 and monitor["warning"] is None and monitor["threshold"] == 0.1
    # The same rows went to TensorBoard through Accelerate's tracker (OUT/tb/stream-ssl), with the kNN monitor.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb" / "stream-ssl"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/embed_std", "train/embed_rank", "train/lr", "eval/knn_top1"} <= tags
    assert [e.step for e in events.Scalars("train/embed_std")] == [1, 2, 3, 4, 5]
    assert events.Scalars("train/embed_std")[-1].value == pytest.approx(monitor["embed_std"], rel=1e-5)
    assert [line.split(",")[0] for line in (out / "knn.csv").read_text().splitlines()] == ["2", "4", "5"]
    assert [k["step"] for k in summary["knn"]] == [2, 4, 5] and 0 <= summary["knn"][-1]["knn_top1"] <= 1
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))
    assert ckpts == ["step-00000004.pt", "step-00000005.pt"]  # every 2 steps and at the end; newest 2 kept

    # The exported backbone loads into the same timm model with load_state_dict (strict) ...
    weights = load_file(str(out / "backbone.safetensors"))
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    model.load_state_dict(weights)
    # ... and is the trained backbone of the final checkpoint.
    final = torch.load(out / "checkpoints" / "step-00000005.pt", weights_only=True)["model"]
    for k, v in weights.items():
        assert torch.equal(v, final[f"backbone.{k}"])
    from stream_ssl.evaluate import load_backbone

    loaded, saved_cfg = load_backbone(out)
    assert saved_cfg["method"] == "simclr"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_bf16_clipping_adamw_and_weight_decay_schedule(make_shard_set, tmp_path):
    data = make_shard_set(128, shard_size=32)
    out = tmp_path / "bf16"
    cfg = tiny_config(data, out, method="byol", backbone="test_vit", budget_samples="64", precision="bf16",
                      clip_grad=1.0, optimizer="adamw", lr=1e-3, weight_decay=0.04, weight_decay_end=0.4,
                      log_with="none")
    # A ViT: the trainer turns oneDNN off for mixed precision on CPU (its bf16 convolution backward returned NaN
    # weight gradients for 1x1 feature maps), and the native bf16 convolutions are slow.
    summary = train(cfg)
    assert torch.backends.mkldnn.enabled  # restored after the run
    rows = read_metrics(out)
    assert summary["steps"] == 4 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert all(float(r["grad_norm"]) > 0 for r in rows)
    wd = [float(r["weight_decay"]) for r in rows]
    assert wd[0] == pytest.approx(0.04) and wd == sorted(wd) and wd[-1] < 0.4
    assert float(rows[0]["momentum"]) == pytest.approx(0.996)


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_clear_errors(make_shard_set, tmp_path, capsys):
    data = str(make_shard_set(128, shard_size=32))
    base = ["--data", data, "--backbone", "test_resnet", "--image-size", "32", "--num-workers", "0",
            "--no-progress", "--log-with", "none"]

    for flag, typo, choice in (("--method", "simclrr", "'dino'"), ("--optimizer", "adam", "'adamw'"),
                               ("--decoder", "nvjpg", "'nvjpeg'"), ("--precision", "bf17", "'bf16'"),
                               ("--local-reads", "copy", "'pread'")):
        with pytest.raises(SystemExit) as e:  # at parse time, naming the choices
            parse_config([*base, "--out", str(tmp_path / "a"), flag, typo])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"invalid choice: '{typo}'" in err and flag in err and choice in err
    code, err = run_main(capsys, [*base, "--out", str(tmp_path / "a"), "--backbone", "resnet_999"])
    assert code == 2 and "unknown backbone 'resnet_999'" in err
    code, err = run_main(capsys, [*base, "--out", str(tmp_path / "a"), "--method", "vicreg", "--batch-size", "1"])
    assert code == 2 and "batch statistics" in err
    code, err = run_main(capsys, [*base, "--out", str(tmp_path / "a"), "--batch-size", "16", "--grad-accum", "4",
                                  "--budget-samples", "48"])
    assert code == 2 and "smaller than one global batch" in err and "64" in err
    # a run that could not start writes nothing but its log, in the run folder (docs/training.md)
    assert [p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()] == \
        [Path(".logs/train.log")]

    small = [*base, "--out", str(tmp_path / "b"), "--batch-size", "16", "--budget-samples", "32",
             "--method-options", json.dumps(TINY["simclr"][0])]
    assert run_main(capsys, small)[0] == 0
    code, err = run_main(capsys, [*small, "--lr", "0.1"])
    assert code == 2 and "holds a different run" in err and "lr" in err
    code, err = run_main(capsys, [*small, "--resume", "never"])
    assert code == 2 and "already holds a run" in err
    assert run_main(capsys, small)[0] == 0  # same run: resumes (already complete) and re-exports

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: simclr\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(bad), "--data", data])
    assert e.value.code == 2 and "learning_rate" in capsys.readouterr().err
    bad.write_text("lr: fast\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(bad), "--data", data])
    assert f"{bad}: lr must be a number, got 'fast'" in capsys.readouterr().err  # names the file
    with pytest.raises(SystemExit):
        parse_config(["--config", str(bad), "--data", data, "--lr", "slow"])
    assert "--lr: could not convert" in capsys.readouterr().err  # the flag, not the file
    bad.write_text("method: simclrr\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(bad), "--data", data])
    assert f"{bad}: method 'simclrr' is not one of barlow, byol, dino" in capsys.readouterr().err


def test_boolean_settings_are_switches(capsys):
    cfg = parse_config(["--data", "x", "--log-keys", "--no-progress", "--sync-bn"])
    assert (cfg.log_keys, cfg.progress, cfg.sync_bn, cfg.tf32) == (True, False, True, True)
    assert parse_config(["--data", "x", "--no-progress"]).progress is False
    with pytest.raises(SystemExit):
        parse_config(["--data", "x", "--log-keys", "true"])  # a switch takes no value
    assert "unrecognized arguments: true" in capsys.readouterr().err


def test_help_explains_every_setting(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):  # every flag with its meaning from the config field
        assert "--" + f.name.replace("_", "-") in out
        assert " ".join(f.metadata["help"].split())[:40] in out
    assert "{barlow,byol,dino,mocov3,simclr,swav,vicreg}" in out and "1G = 10^9 bytes" in out
    assert "KiB, MiB, GiB, TiB of 1024" in out and "or the path of a JSON file" in out


CONFIGS = sorted((REPO / "configs" / "methods").glob("*.yaml"))


def test_method_configs_load_and_name_real_options():
    names = {p.stem for p in CONFIGS}
    for method in METHODS:
        assert {method, f"{method}_r50", f"{method}_vit"} <= names, method
    for path in CONFIGS:
        cfg = parse_config(["--config", str(path), "--data", "shards/x"])
        assert cfg.method in METHODS, path
        assert timm.is_model(cfg.backbone), path
        accepted = inspect.signature(METHODS[cfg.method].__init__).parameters
        unknown = set(cfg.method_options) - set(accepted)
        assert not unknown, (path, unknown)
        assert cfg.optimizer in ("lars", "sgd", "adamw") and cfg.lr > 0, path


@pytest.mark.parametrize("method", sorted(TINY))
def test_every_method_trains_on_the_dali_path(make_shard_set, tmp_path, method):
    """`--decoder dali` (the CPU-only DALI graph here) feeds every method's views, multi-crop included."""
    pytest.importorskip("nvidia.dali")
    data = make_shard_set(64, shard_size=32)
    summary = train(tiny_config(data, tmp_path / method, method, decoder="dali", dali_threads=1,
                                unique_samples="32", budget_samples="48", batch_size=8, log_with="none"))
    assert summary["steps"] == 6 and summary["decoder"] == "dali"
    assert summary["dali"]["batches"] == 6 and summary["dali"]["pil_batches"] == 0  # DALI augmented every batch
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / method)]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
