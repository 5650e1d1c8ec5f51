"""What a new user of `stream-ssl train` meets: the method's recipe by default, hints that fit the run's settings,
outputs with the same file mode, a warning for evaluation sets used as pretraining data, a storage rate that is
not always 0."""

from __future__ import annotations

import os
import stat
import time

import pytest

from shard_tools.pack import pack
from shard_tools.synth import synthesize
from stream_ssl.config import RECIPES, TrainConfig, parse_config
from stream_ssl.metrics import Meter
from stream_ssl.train import divergence_hints, main, read_rate
from tests.helpers import REPO
from tests.helpers.trainer import train_args

BASE = ["--data", "d", "--out", "o"]


def parse(*flags: str) -> TrainConfig:
    return parse_config([*BASE, *flags])


def test_a_method_starts_from_its_recipe_for_the_scale():
    barlow = parse("--method", "barlow")
    assert (barlow.recipe, barlow.optimizer, barlow.lr, barlow.weight_decay) == ("barlow", "adamw", 1e-3, 1e-5)
    assert barlow.method_options["proj_dim"] == 2048 and barlow.backbone == "resnet18" and barlow.image_size == 64
    assert barlow.precision == "no" and barlow.batch_size == 256  # the run's scale is never the recipe's
    assert parse("--method", "simclr", "--image-size", "224", "--backbone", "resnet50").recipe == "simclr_r50"
    vit = parse("--method", "dino", "--backbone", "vit_small_patch16_224", "--image-size", "224")
    assert vit.recipe == "dino_vit" and vit.backbone_options == {"drop_path_rate": 0.1}
    assert vit.weight_decay_end == 0.4 and vit.clip_grad == 3.0


def test_flags_and_config_files_override_the_recipe(tmp_path):
    assert parse("--method", "barlow", "--lr", "0.01").lr == 0.01
    # another optimizer than the recipe's takes none of the recipe's optimizer settings
    sgd = parse("--method", "barlow", "--optimizer", "sgd")
    assert (sgd.optimizer, sgd.lr, sgd.weight_decay, sgd.optimizer_options) == ("sgd", 0.3, 1e-6, {})
    assert sgd.method_options["lambd"] == 0.0051  # the method's own settings stay
    config = tmp_path / "c.yaml"
    config.write_text("method: byol\nmethod_options: {proj_dim: 32}\nwarmup_fraction: 0.2\n")
    byol = parse_config([*BASE, "--config", str(config)])
    assert byol.recipe == "byol" and byol.method_options == {"proj_dim": 32} and byol.warmup_fraction == 0.2
    assert byol.optimizer == "lars" and byol.optimizer_options == {"trust_coeff": 0.02, "trust_clip": True}


def test_recipe_none_a_name_or_a_file(tmp_path, capsys):
    generic = parse("--method", "vicreg", "--recipe", "none")
    assert generic.recipe == "none" and generic == TrainConfig(data="d", out="o", method="vicreg", recipe="none")
    assert parse("--method", "simclr", "--recipe", "simclr_r50").lr == 0.3
    own = tmp_path / "mine.yaml"
    own.write_text("method: swav\nlr: 0.05\nbatch_size: 8\n")
    mine = parse("--method", "swav", "--recipe", str(own))
    assert mine.recipe == str(own) and mine.lr == 0.05 and mine.batch_size == 256  # only how the method trains
    for flags, said in ((("--recipe", "simclr_xl"), "no such recipe"),
                        (("--method", "byol", "--recipe", str(own)), "a recipe for swav")):
        with pytest.raises(SystemExit):
            parse(*flags)
        assert said in capsys.readouterr().err
    assert sorted(p.stem for p in RECIPES.glob("*.yaml"))[:3] == ["barlow", "barlow_r50", "barlow_vit"]
    assert (REPO / "configs" / "methods" / "dino.yaml").read_text() == \
        (RECIPES / "dino.yaml").read_text()  # the documented path leads to the same files


def test_divergence_hints_leave_out_what_the_run_already_does():
    assert divergence_hints(TrainConfig(lr=0.5)) == "a lower --lr (now 0.5) or --clip-grad 1.0"
    hints = divergence_hints(TrainConfig(lr=0.5, precision="bf16", clip_grad=3.0))
    assert hints == "a lower --lr (now 0.5), --precision no or a lower --clip-grad (now 3)"
    assert "--precision no" not in divergence_hints(TrainConfig(precision="no", clip_grad=1.0))


def test_read_rate_is_the_run_average_not_the_last_row():
    meter = Meter(1, 16)
    meter.io_total["bytes_read"], meter.t_start = 3_000_000, time.perf_counter() - 2.0
    assert read_rate(meter).startswith("1.5 MB/s")  # the rows after the first pass read 0 bytes: not shown as 0
    meter.io_total["cache_hits"] = 7
    assert read_rate(meter).endswith("(7 cache hits)")


@pytest.mark.multiprocess
def test_outputs_share_one_mode_and_downstream_sets_are_flagged(tmp_path, capsys):
    manifest = synthesize(tmp_path / "img", 64, classes=4, size=32)
    pack(manifest, tmp_path / "down", name="down", shard_size=32, source="downstream")
    old = os.umask(0o022)
    try:
        args = train_args(tmp_path / "down", tmp_path / "run", budget_samples="32", log_with="none")
        assert main(args) == 0
    finally:
        os.umask(old)
    out = capsys.readouterr()
    assert "packed with --source downstream" in out.out + out.err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert modes["backbone.safetensors"] == modes["summary.json"] == 0o644, modes
    assert "recipe: simclr" in out.out
