"""stream_ssl.distance: known answers for KID, the VisualDNA EMD and Frechet, the seeded sample of a set, the
feature cache, weights from local files, and the command's JSON contract on a domain shift."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from shard_tools.shardset import load_shard_set
from stream_ssl import distance as dist_module
from stream_ssl.distance import (
    compare_sets,
    distances,
    kid,
    main,
    mmd2_unbiased,
    run_extractor,
    timm_extractor,
    vdna_emd,
)
from stream_ssl.features import sample_set
from stream_ssl.models.backbone import create_backbone
from tests.helpers.runs import TINY_BACKBONE, make_run

# ----------------------------------------------------------------------------------------------------------
# Known answers.


def test_mmd_unbiased_by_hand():
    # d = 1, k(a, b) = (a b + 1)^3. x = {0, 1}: k(0, 1) = 1. y = {2, 3}: k(2, 3) = 343.
    # across: k(0,2) = k(0,3) = 1, k(1,2) = 27, k(1,3) = 64 -> mean 93 / 4.
    # MMD^2_u = 2 * 1 / 2 + 2 * 343 / 2 - 2 * 93 / 4 = 1 + 343 - 46.5
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    assert mmd2_unbiased(x, y) == pytest.approx(297.5, rel=1e-12)
    # one subset of the whole sets: the KID is that value, with no spread
    assert kid(x, y, subsets=1, subset_size=2) == pytest.approx((297.5, 0.0))


def test_kid_is_about_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(800, 8)), rng.normal(size=(800, 8))
    same, same_std = kid(x, y, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std / math.sqrt(20)  # unbiased: zero within its standard error
    near = kid(x, y + 0.3, subsets=20, subset_size=200)[0]
    far = kid(x, y + 1.0, subsets=20, subset_size=200)[0]
    assert 0 < near < far
    assert kid(x, y + 1.0, subsets=20, subset_size=200, seed=1)[0] == pytest.approx(far, rel=0.1)  # other draws


def test_vdna_emd_by_hand():
    # one neuron: half the mass at 0 and half at 1, against all of it at 1. Bins span [0, 1]; the masses sit in
    # the first and the last bin, (bins - 1) bin widths apart: EMD = 0.5 * (bins - 1) / bins.
    a = np.array([[0.0], [0.0], [1.0], [1.0]])
    b = np.ones((4, 1))
    assert vdna_emd(a, b, bins=1000) == pytest.approx(0.5 * 0.999, rel=1e-12)
    assert vdna_emd(a, b, bins=2) == pytest.approx(0.25, rel=1e-12)
    # a second neuron, constant in both sets, adds 0 to the sum: the mean halves
    two = vdna_emd(np.hstack([a, np.full((4, 1), 7.0)]), np.hstack([b, np.full((4, 1), 7.0)]), bins=1000)
    assert two == pytest.approx(0.5 * 0.999 / 2, rel=1e-12)
    assert vdna_emd(a, a) == 0.0


def test_vdna_emd_matches_the_1d_wasserstein_distance_within_a_bin():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 3)) * [1.0, 2.0, 0.5]
    y = rng.normal(size=(2000, 3)) * [1.0, 1.0, 0.5] + [0.5, 0.0, -1.0]
    per = vdna_emd(x, y, bins=1000, per_neuron=True)
    for k in range(3):
        width = (max(x[:, k].max(), y[:, k].max()) - min(x[:, k].min(), y[:, k].min())) / 1000
        assert per[k] == pytest.approx(wasserstein_distance(x[:, k], y[:, k]), abs=width)
    assert vdna_emd(x, y) == pytest.approx(per.mean())


def test_distances_of_shifted_gaussians_and_of_a_set_with_itself():
    rng = np.random.default_rng(2)
    mu = np.array([1.0, -2.0, 0.5, 0.0])
    x, y = rng.normal(size=(20000, 4)), rng.normal(size=(20000, 4)) + mu
    d = distances(x, y, kid_subsets=10, kid_subset_size=500)
    # equal covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) = 0, the distance is |mu1 - mu2|^2 = 5.25
    assert d["frechet"] == pytest.approx(float(mu @ mu), rel=0.03)
    assert d["samples"] == 20000 and d["kid_subset_size"] == 500 and d["kid"] > 0
    # the 1-D EMD between N(0, 1) and N(m, 1) is |m|: the mean over the four dimensions
    assert d["vdna"] == pytest.approx(np.abs(mu).mean(), abs=0.03)
    same = distances(x, x, kid_subsets=10, kid_subset_size=500)
    assert same["frechet"] == pytest.approx(0.0, abs=1e-9) and same["vdna"] == 0.0
    assert abs(same["kid"]) < 3 * same["kid_std"] / math.sqrt(10)


def test_distances_use_the_same_count_on_both_sides_and_half_of_it_per_kid_subset():
    rng = np.random.default_rng(3)
    d = distances(rng.normal(size=(300, 5)), rng.normal(size=(120, 5)), kid_subsets=5)
    assert d["samples"] == 120 and d["kid_subset_size"] == 60 and d["kid_std"] > 0
    with pytest.raises(ValueError, match="at least 4"):
        distances(np.zeros((3, 2)), np.zeros((10, 2)))


def test_distances_show_a_bar_of_the_three_only_when_asked(capsys):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    quiet = distances(x, y, kid_subsets=3)
    assert capsys.readouterr().err == ""
    shown = distances(x, y, kid_subsets=3, progress="distances down_b")
    err = capsys.readouterr().err
    assert "distances down_b" in err and "3/3" in err and "VisualDNA, 1000 bins" in err
    assert shown == quiet  # the bar changes nothing computed


# ----------------------------------------------------------------------------------------------------------
# Samples, features, weights.


def test_sample_set_is_seeded_spread_and_within_shards(make_shard_set):
    s = load_shard_set(str(make_shard_set(400, shard_size=100, seed=21)))
    pieces = sample_set(s, 130, seed=0, run=40)
    assert sum(len(p) for p in pieces) == 130 and len({p.shard for p in pieces}) >= 4  # >= 130 / 40 shards
    assert all(0 <= p.start < p.stop <= 100 and p.source == 0 for p in pieces)
    assert pieces == sample_set(s, 130, seed=0, run=40)
    assert pieces != sample_set(s, 130, seed=1, run=40)
    everything = sample_set(s, 10_000, seed=0)
    assert [(p.shard, p.start, p.stop) for p in everything] == [(i, 0, 100) for i in range(4)]


@pytest.fixture(scope="module")
def shifted(make_shard_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("distance")
    sets = {"pool": make_shard_set(300, shard_size=100, seed=31), "a": make_shard_set(200, shard_size=100, seed=32),
            "b": make_shard_set(200, shard_size=100, seed=33, domain="b")}
    return root, make_run(root / "run", data=str(sets["pool"])), {k: str(v) for k, v in sets.items()}


def test_command_json_contract_and_the_shifted_domain_is_farther(shifted, capsys):
    root, run, sets = shifted
    out = root / "out" / "d.json"
    assert main([sets["pool"], sets["a"], sets["b"], "--checkpoint", str(run), "--samples", "150", "--kid-subsets",
                 "20", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    result = json.loads(out.read_text())
    assert result == json.loads(printed.out)
    a, b = result["pairs"]
    assert (a["a"], a["b"], b["a"], b["b"]) == (sets["pool"], sets["a"], sets["pool"], sets["b"])
    for p in (a, b):
        assert set(p) >= {"frechet", "kid", "kid_std", "vdna", "samples"} and p["samples"] == 150
    for metric in ("frechet", "kid", "vdna"):  # a random-init encoder already separates the domains
        assert a[metric] < b[metric], metric
    assert result["backbone"]["backbone"] == TINY_BACKBONE and len(result["backbone"]["sha256"]) == 64
    assert "| Frechet |" in out.with_suffix(".md").read_text() and "features" in printed.err


def test_features_are_cached_per_set_backbone_and_sample(shifted, tmp_path, monkeypatch):
    root, run, sets = shifted
    ex = run_extractor(run)
    first = compare_sets(sets["pool"], [sets["a"]], ex, samples=60, kid_subsets=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(dist_module, "features_of_slices", no_extraction)
    again = compare_sets(sets["pool"], [sets["a"]], ex, samples=60, kid_subsets=3, cache_dir=tmp_path)
    assert again["pairs"] == first["pairs"]
    with pytest.raises(AssertionError, match="extracted again"):  # another sample size is another entry
        compare_sets(sets["pool"], [sets["a"]], ex, samples=61, kid_subsets=3, cache_dir=tmp_path)


def test_timm_backbone_from_a_local_state_dict(tmp_path, shifted):
    model, _ = create_backbone(TINY_BACKBONE, 32)
    state = {**model.state_dict(), "head.fc.weight": torch.zeros(3, 3)}  # a classifier the backbone has not
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    ex = timm_extractor(TINY_BACKBONE, tmp_path / "w.pth", image_size=32)
    assert ex.description["ignored_weights"] == ["head.fc.weight"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ex.model(x), model.eval()(x))
    torch.save({k: v for k, v in list(state.items())[:3]}, tmp_path / "part.pth")
    with pytest.raises(ValueError, match="lacks"):
        timm_extractor(TINY_BACKBONE, tmp_path / "part.pth", image_size=32)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        timm_extractor(TINY_BACKBONE, tmp_path / "none.safetensors")


def test_a_backbone_built_with_options_loads_with_backbone_options(tmp_path, shifted, capsys):
    """Weights of a model made with options (the demo's narrow ResNet) load with the same --backbone-options; without
    them the command says which weights do not fit and what to give."""
    root, run, sets = shifted
    options = {"channels": [8, 8, 16, 16]}
    model, _ = create_backbone("resnet10t", 32, **options)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "narrow.safetensors"))
    ex = timm_extractor("resnet10t", tmp_path / "narrow.safetensors", image_size=32, options=options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ex.model(x), model.eval()(x))
    base = [sets["pool"], sets["a"], "--backbone", "resnet10t", "--weights", str(tmp_path / "narrow.safetensors"),
            "--image-size", "32", "--samples", "20", "--kid-subsets", "2", "--no-progress"]
    assert main([*base, "--backbone-options", "{channels: [8, 8, 16, 16]}"]) == 0  # YAML flow style, as train's
    result = json.loads(capsys.readouterr().out)
    assert result["backbone"]["backbone_options"] == options and result["pairs"][0]["samples"] == 20
    assert main(base) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "other shapes than in resnet10t built with --backbone-options {}" in line
    with pytest.raises(SystemExit):
        main([*base, "--backbone-options", "[8, 8]"])
    assert "expected a mapping" in capsys.readouterr().err


def test_command_refuses_a_backbone_without_weights_and_reports_a_missing_set(shifted, capsys):
    root, run, sets = shifted
    with pytest.raises(SystemExit):
        main([sets["pool"], sets["a"], "--backbone", TINY_BACKBONE])
    assert "--backbone needs --weights" in capsys.readouterr().err
    assert main([sets["pool"], str(root / "nope"), "--checkpoint", str(run), "--no-progress"]) == 2
    assert "not a shard set" in capsys.readouterr().err
