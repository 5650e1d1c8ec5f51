"""The run object's parts that GPUs and several nodes depend on, checked on the CPU: SyncBatchNorm through timm,
the current device's CUDA RNG state only, the process-group timeout, one resume checkpoint for all ranks, the
GPU speed settings, fp16 skipped steps, a diverging run stopping with one line, and a collapsing run warned
about once."""

from __future__ import annotations

import csv
import json
import math
import os
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stream_ssl import checkpoint, checkpointer
from stream_ssl.config import TrainConfig
from stream_ssl.data.augment import byol_views
from stream_ssl.errors import RunError
from stream_ssl.methods import METHODS, SSLMethod
from stream_ssl.models.heads import mlp
from stream_ssl.run import apply_device_settings, build_run, make_accelerator, sync_batchnorm, trackers
from stream_ssl.testing.servers import free_port
from stream_ssl.train import Meter, main, release_accelerator, train, train_step
from tests.helpers.trainer import TINY


def test_sync_batchnorm_keeps_timm_activations():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model("test_efficientnet", num_classes=0))
    plain.load_state_dict(model.state_dict())
    assert (plain.eval()(x) - before).abs().max() > 1e-3  # torch's converter drops BatchNormAct2d's activation
    ours = sync_batchnorm(model, SimpleNamespace(device=torch.device("cuda")))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in ours.modules())
    assert torch.allclose(ours.eval()(x), before, atol=1e-6)


def test_checkpoint_keeps_the_current_cuda_device_state_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("all") or [])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.append(("set", int(s[0]))))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: calls.append("set_all"))
    state = checkpoint.rng_state()
    assert state["cuda"].tolist() == [7] and "all" not in calls
    checkpoint.set_rng_state(state)
    old = dict(state, cuda=[torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)])
    checkpoint.set_rng_state(old)  # a checkpoint from before: one state per GPU; this process's device is 1
    assert calls == [("set", 7), ("set", 2)]


def test_process_group_timeout_comes_from_the_settings():
    acc = make_accelerator(TrainConfig(data="x", dist_timeout=123))
    try:
        assert acc.init_handler.timeout == timedelta(seconds=123)
    finally:
        release_accelerator()


def test_gpu_speed_settings_apply_on_cuda_only(monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        cnn = SimpleNamespace(backbone=timm.create_model("test_resnet", num_classes=0))
        cnn.to = lambda memory_format: setattr(cnn, "format", memory_format)
        assert apply_device_settings(TrainConfig(), torch.device("cpu"), cnn) == {}
        assert not hasattr(cnn, "format")
        got = apply_device_settings(TrainConfig(), torch.device("cuda"), cnn)
        assert got == {"tf32": True, "cudnn_benchmark": True, "channels_last": True}
        assert cnn.format is torch.channels_last and torch.backends.cuda.matmul.allow_tf32
        vit = SimpleNamespace(backbone=timm.create_model("test_vit", num_classes=0))
        got = apply_device_settings(TrainConfig(tf32=False, channels_last=True), torch.device("cuda"), vit)
        assert got["channels_last"] is False and not torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


def _resume_rank(rank: int, port: int, outs: list[str], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        run = SimpleNamespace(cfg=TrainConfig(out=outs[rank], resume="auto"), out=Path(outs[rank]))
        checkpointer.resume_point(run)
        results.put((rank, "ok"))
    except RunError as e:
        results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def test_ranks_that_see_different_checkpoints_stop_with_one_line(tmp_path):
    outs = []
    for r, step in enumerate((4, 8)):  # a node-local --out: each node sees its own checkpoints
        folder = tmp_path / f"node{r}"
        checkpoint.save_checkpoint(folder, step, {"step": step})
        outs.append(str(folder))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_resume_rank, args=(r, port, outs, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    for r in range(2):
        assert "processes see different checkpoints" in got[r]
        assert "rank 0: step-00000004.pt" in got[r] and "rank 1: step-00000008.pt" in got[r]


@pytest.fixture
def byol_run(make_shard_set, tmp_path):
    options, _, lr = TINY["byol"]
    cfg = TrainConfig(data=str(make_shard_set(64, shard_size=32)), unique_samples="32", budget_samples="64",
                      method="byol", method_options=options, backbone="test_resnet", image_size=32, batch_size=8,
                      num_workers=0, optimizer="sgd", lr=lr, out=str(tmp_path / "run"), log_with="none",
                      progress=False)
    run = build_run(make_accelerator(cfg), cfg)
    run.prepare()
    yield run
    release_accelerator()


def test_a_step_the_fp16_scaler_skipped_moves_no_momentum_encoder(byol_run):
    run, meter = byol_run, Meter(1, byol_run.global_batch)
    target = [p.detach().clone() for p in run.method.target.backbone.parameters()]
    online = [p.detach().clone() for p in run.method.backbone.parameters()]
    run.optimizer._is_overflow = True  # what the fp16 scaler reports after inf/NaN gradients (no scaler on CPU)
    run.optimizer.optimizer.step = lambda *a, **k: None  # ... and the step it skipped changes no parameter
    train_step(run, 0, meter)
    assert meter.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(target, run.method.target.backbone.parameters()))
    run.optimizer._is_overflow = False
    del run.optimizer.optimizer.step
    train_step(run, 1, meter)
    assert not all(torch.equal(a, b) for a, b in zip(online, run.method.backbone.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(target, run.method.target.backbone.parameters()))


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_good_checkpoint(make_shard_set, tmp_path, capsys):
    out = tmp_path / "run"
    options = json.dumps(TINY["simclr"][0])
    code = main(["--data", str(make_shard_set(64, shard_size=32)), "--unique-samples", "32",
                 "--budget-samples", "160", "--backbone", "test_resnet", "--image-size", "32", "--batch-size", "16",
                 "--num-workers", "0", "--optimizer", "sgd", "--lr", "1e12", "--warmup-fraction", "0",
                 "--log-every", "1", "--save-every", "1", "--method-options", options, "--out", str(out),
                 "--no-progress", "--log-with", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert "is nan at optimizer step" in err[0] or "is inf at optimizer step" in err[0]
    assert "last finite loss" in err[0] and "--clip-grad" in err[0] and "step-0000000" in err[0]
    last_good = checkpoint.latest_checkpoint(out)
    state = checkpoint.load_checkpoint(last_good)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class NoStopGradSimSiam(SSLMethod):
    """SimSiam without its stop-gradient: the known collapsing method (Chen & He 2021, Fig. 2): the negative
    cosine between the two views' predictions and projections is minimized by mapping everything to one point."""

    name = "nostopgrad"

    def __init__(self, backbone, feature_dim):
        super().__init__(backbone, feature_dim)
        self.projector = mlp(feature_dim, 64, 32, layers=2)
        self.predictor = mlp(32, 16, 32, layers=2)

    def views(self, image_size):
        return byol_views(image_size)

    def forward(self, views):
        z1, z2 = self.encode(lambda x: self.projector(self.backbone(x)), views[:2])
        p1, p2 = self.encode(self.predictor, [z1, z2])
        loss = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
        return {"loss": loss, **self.monitor(z1)}


def test_a_collapsing_run_trips_the_collapse_warning_once(make_shard_set, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(METHODS, "nostopgrad", NoStopGradSimSiam)
    out = tmp_path / "collapse"
    cfg = TrainConfig(data=str(make_shard_set(64, shard_size=32)), unique_samples="64", budget_samples="640",
                      method="nostopgrad", backbone="test_resnet", image_size=32, batch_size=16, num_workers=0,
                      optimizer="sgd", lr=4.0, warmup_fraction=0.0, log_every=2, out=str(out), log_with="none",
                      progress=False)
    summary = train(cfg)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: embeddings collapsing")]
    warning = summary["collapse_monitor"]["warning"]
    assert len(err) == 1 and warning is not None, err  # once, however long it stays collapsed
    assert f"at optimizer step {warning['step']}:" in err[0] and "0.1 / sqrt(32)" in err[0]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    stds = {int(r["step"]): float(r["embed_std"]) for r in rows}
    # Warned at the first logged step under the limit, having been above it before.
    assert stds[warning["step"]] < 0.1 / math.sqrt(32) <= stds[2]
    assert all(s >= 0.1 / math.sqrt(32) for step, s in stds.items() if step < warning["step"])
    assert json.loads((out / "summary.json").read_text())["collapse_monitor"]["warning"]["step"] == warning["step"]


def test_log_with_names_installed_trackers_or_stops_with_one_line(monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    assert trackers(TrainConfig(data="x", log_with="tensorboard, tensorboard")) == ["tensorboard"]
    assert trackers(TrainConfig(data="x", log_with="none")) == []
    with pytest.raises(RunError, match=r"--log-with mlflow: the mlflow package is not installed \(pip install mlflow"):
        trackers(TrainConfig(data="x", log_with="tensorboard,mlflow"))
    with pytest.raises(RunError, match="--log-with tensorbord: not a tracker .*wandb"):
        trackers(TrainConfig(data="x", log_with="tensorbord"))


@pytest.mark.slow
def test_wandb_offline_mode_is_honoured(make_shard_set, tmp_path, monkeypatch):
    """`--log-with wandb` under WANDB_MODE=offline: the run's rows go to an offline W&B run in OUT/wandb, with no
    network; metrics.csv is written as always."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    options, _, lr = TINY["simclr"]
    out = tmp_path / "wandb_run"
    train(TrainConfig(data=str(make_shard_set(64, shard_size=32)), unique_samples="32", budget_samples="64",
                      method_options=options, backbone="test_resnet", image_size=32, batch_size=16, num_workers=0,
                      optimizer="sgd", lr=lr, log_every=1, out=str(out), log_with="wandb", progress=False))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((out / "wandb").iterdir())
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 4
