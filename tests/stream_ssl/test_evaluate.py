"""Evaluation: Frechet known answers, linear probe, kNN, and the CLI on a run folder made without training."""

from __future__ import annotations

import io
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from shard_tools.shardset import load_shard_set
from stream_ssl.data.plan import make_plan
from stream_ssl.distance import feature_stats, frechet_distance, frechet_from_stats
from stream_ssl.evaluate import (
    LINEAR_C_GRID,
    evaluate,
    knn_accuracy,
    linear_probe,
    main,
    markdown_table,
    run_pool,
)
from stream_ssl.features import sample_pieces, spread
from tests.helpers import PYTHON, REPO
from tests.helpers.runs import make_run, read_json

# ----------------------------------------------------------------------------------------------------------
# Frechet distance: known answers.


def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_from_stats(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    x = rng.normal(size=(500, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_gaussians_closed_form():
    # Diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 25.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2  # 25 + 1 + 1 + 6.25
    assert frechet_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert expected == 33.25
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_from_stats([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_general_covariances_match_sqrtm_and_are_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T, b @ b.T + 0.5 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    d12 = frechet_from_stats(mu1, s1, mu2, s2)
    assert d12 == pytest.approx(reference, rel=1e-8)
    assert frechet_from_stats(mu2, s2, mu1, s1) == pytest.approx(d12, rel=1e-8)
    # rank-deficient covariance (fewer samples than dimensions): still finite and >= 0
    low = rng.normal(size=(5, 2))
    assert frechet_from_stats(mu1, low @ low.T, mu2, s2) >= 0


def test_frechet_of_samples_approaches_the_gaussians():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40000, 3))
    y = rng.normal(size=(40000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(x, y) == pytest.approx(1.0 + 3 * (2 - 1) ** 2, rel=0.03)  # mean 1, stds 1 vs 2
    mu, cov = feature_stats(y)
    assert mu == pytest.approx([1.0, 0.0, 0.0], abs=0.05)
    assert np.diag(cov) == pytest.approx([4.0] * 3, rel=0.03)


def test_spread_is_proportional_and_exact():
    assert spread(10, [10, 10]) == [5, 5]
    assert sum(spread(7, [3, 5, 9])) == 7
    assert spread(100, [3, 5]) == [3, 5]  # capped at the sizes
    assert spread(3, [1000, 1, 1]) == [3, 0, 0]


# ----------------------------------------------------------------------------------------------------------
# kNN and linear probe.


def test_knn_weighted_vote_known_answer():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.0]])
    test_y = torch.tensor([0, 1, 0])  # (-1, 0) is nearest (cos 0 and -0.11) to the class-1 samples: a miss
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=2, temperature=0.1) == pytest.approx(2 / 3)
    # k larger than the bank: every training sample votes, the closer class wins by weight
    assert knn_accuracy(train_x, train_y, test_x[:2], test_y[:2], k=50, temperature=0.07) == 1.0


def test_knn_at_a_tiny_temperature_is_the_nearest_neighbour():
    """exp(sim / T) overflows float32 below T ~ 0.011 (every vote inf: the lowest class id wins) and underflows
    for negative similarities; with the row maximum subtracted, T = 1e-3 is 1-NN."""
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g)
    train_y, test_y = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (200,), generator=g)
    one_nn = knn_accuracy(train_x, train_y, test_x, test_y, k=1, temperature=0.07)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=1e-3) == one_nn
    assert knn_accuracy(-train_x, train_y, test_x, test_y, k=20, temperature=1e-3) == knn_accuracy(
        -train_x, train_y, test_x, test_y, k=1, temperature=1.0)  # mostly negative similarities
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            knn_accuracy(train_x, train_y, test_x, test_y, temperature=bad)


def _blobs(n_per: int, classes: int, dim: int, sep: float, seed: int):
    centers = np.random.default_rng(0).normal(size=(classes, dim)) * sep  # the same classes for every seed
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per)
    x = centers[y] + rng.normal(size=(len(y), dim))
    x[:, 0] *= 100.0  # a badly scaled feature: standardization must cope
    return x.astype(np.float32), y


def test_linear_probe_beats_chance_on_separable_features():
    xtr, ytr = _blobs(40, 10, 32, 1.5, seed=1)
    xte, yte = _blobs(20, 10, 32, 1.5, seed=2)
    out = linear_probe(xtr, ytr, xte, yte)
    assert out["top1"] > 0.9  # chance is 0.1
    assert out["top5"] >= out["top1"]
    assert out["C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    assert set(out["val_top1_by_C"]) == {"0.001", "0.01", "0.1", "1", "10"}


def test_linear_probe_reports_fits_that_stop_at_the_iteration_cap():
    xtr, ytr = _blobs(20, 5, 16, 1.0, seed=1)
    xte, yte = _blobs(10, 5, 16, 1.0, seed=2)
    capped = linear_probe(xtr, ytr, xte, yte, max_iter=2)
    assert capped["converged"] is False and capped["unconverged_C"] == [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    free = linear_probe(xtr, ytr, xte, yte)
    assert free["max_iter"] == 1000 and free["converged"] is True and free["unconverged_C"] == []


def test_linear_probe_shows_a_bar_of_its_fits_only_when_asked(capsys):
    """The probe's fits take most of an evaluation's time after the features: a bar counts them (one per C, then
    the final fit), labeled as the caller says; off, nothing is written."""
    xtr, ytr = _blobs(20, 5, 16, 1.0, seed=1)
    xte, yte = _blobs(10, 5, 16, 1.0, seed=2)
    quiet = linear_probe(xtr, ytr, xte, yte)
    assert capsys.readouterr().err == ""
    shown = linear_probe(xtr, ytr, xte, yte, c_grid=(0.1, 1.0), progress="linear probe down_a")
    err = capsys.readouterr().err
    assert "linear probe down_a" in err and "3/3" in err and "final fit, C=" in err
    assert shown["C"] in (0.1, 1.0) and quiet["C"] in LINEAR_C_GRID


def test_linear_probe_at_chance_on_random_labels_and_no_top5_below_ten_classes():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = rng.integers(0, 3, size=300)
    out = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert "top5" not in out
    assert out["top1"] < 0.55  # chance 1/3: no signal to find


# ----------------------------------------------------------------------------------------------------------
# Pools and the command line.


def test_run_pool_is_the_plans_pool_and_distance_samples_spread_over_it(make_shard_set, tmp_path):
    pool = make_shard_set(400, shard_size=100, seed=3)
    run = make_run(tmp_path / "run", data=str(pool), unique_samples="250", budget_samples="1000")
    sets, pieces, desc = run_pool(read_json(run / "config.json"))
    plan = make_plan([load_shard_set(str(pool))], 250, 1000, batch_size=1)
    assert sum(len(p) for p in pieces) == plan.unique_samples == 250
    assert [(p.shard, p.stop) for p in pieces] == list(zip(plan.unit_shard.tolist(), plan.unit_stop.tolist()))
    assert "250 unique samples" in desc
    sub = sample_pieces(pieces, 100)
    assert sum(len(p) for p in sub) == 100
    for s, p in zip(sub, pieces):
        assert s.shard == p.shard and s.start == 0 and s.stop <= p.stop


def test_evaluation_view_is_torchvision_resize_then_center_crop():
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    from stream_ssl.data.augment import center_view
    from tests.helpers.images import photo_like

    for w, h, size in ((96, 72, 32), (72, 96, 32), (500, 375, 224), (64, 64, 24), (33, 100, 32)):
        im = Image.open(io.BytesIO(photo_like(w, h, seed=w))).convert("RGB")
        reference = Compose([Resize(int(size / 0.875), InterpolationMode.BILINEAR), CenterCrop(size)])(im)
        diff = np.abs(np.asarray(reference, dtype=int) - center_view(im, size).astype(int))
        assert diff.max() <= 1, (w, h, size)  # rounding only


def test_features_are_float32_under_autocast_and_from_a_full_decode(make_shard_set, tmp_path, monkeypatch):
    from stream_ssl import features as ev
    from stream_ssl.data.augment import decode_rgb
    from stream_ssl.features import extract_features, load_backbone

    s = load_shard_set(str(make_shard_set(40, shard_size=20, seed=15, size=64)))
    model, _ = load_backbone(make_run(tmp_path / "run"))
    plain, _ = extract_features(model, s, 32, batch_size=16, workers=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = extract_features(model, s, 32, batch_size=16, workers=1)
    assert plain.dtype == torch.float32 and torch.equal(plain, auto)
    calls = []

    def spy(data, min_side=None):
        calls.append(min_side)
        return decode_rgb(data)

    monkeypatch.setattr(ev, "decode_rgb", spy)
    extract_features(model, s, 32, batch_size=16, workers=1, limit=5)
    assert calls == [None] * 5  # no reduced-resolution (draft) decode


@pytest.fixture(scope="module")
def tiny_eval(make_shard_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sets = {"pool": make_shard_set(300, shard_size=100, seed=11),
            "train_a": make_shard_set(200, shard_size=100, seed=12),
            "test_a": make_shard_set(100, shard_size=100, seed=13),
            "train_b": make_shard_set(200, shard_size=100, seed=14, domain="b")}
    run = make_run(root / "run", data=str(sets["pool"]), unique_samples="0.5", budget_samples="1K")
    return root, run, sets


def test_cli_writes_json_and_markdown(tiny_eval):
    root, run, sets = tiny_eval
    out = root / "eval" / "result.json"
    proc = subprocess.run([PYTHON, "-m", "stream_ssl.evaluate", "--checkpoint", str(run), "--train",
                           str(sets["train_a"]), "--test", str(sets["test_a"]), "--knn", "--linear", "--distance",
                           "--distance-samples", "120", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == read_json(out)
    assert result["train_samples"] == 200 and result["test_samples"] == 100 and result["classes"] == 10
    assert set(result["knn"]) == {"k20_t0.07", "k200_t0.1"}
    assert result["knn_top1"] == result["knn"]["k20_t0.07"]
    for acc in [*result["knn"].values(), result["linear"]["top1"], result["linear"]["top5"]]:
        assert 0.0 <= acc <= 1.0
    assert result["linear"]["top5"] >= result["linear"]["top1"]
    dist = result["distance"]
    assert dist["samples"] == 120 and dist["pool_samples"] == 150  # N = 0.5 of the 300-sample pool
    assert dist["frechet"] > 0 and math.isfinite(dist["frechet"])
    assert dist["vdna"] > 0 and math.isfinite(dist["kid"]) and dist["kid_std"] > 0 and dist["kid_subset_size"] == 60
    table = out.with_suffix(".md").read_text()
    assert "| kNN top-1 (k=20, T=0.07) |" in table and "| linear top-5 |" in table and "Frechet" in table
    assert "| KID (± std over subsets) |" in table and "VisualDNA" in table
    assert "features" in proc.stderr  # the progress bars, one per phase
    assert "linear probe" in proc.stderr and "6/6" in proc.stderr  # 5 values of C, then the final fit
    assert "distances" in proc.stderr and "3/3" in proc.stderr  # Frechet, KID, VisualDNA
    assert dist["pool"].startswith("run pool: 150 unique samples")
    assert table.strip() == markdown_table(result)


def test_distance_to_given_pool_sets_and_shift(tiny_eval):
    """Same encoder: the generated domain-a pool is closer to domain-a data than to shifted domain-b data."""
    root, run, sets = tiny_eval
    dists = {}
    for dom in ("a", "b"):
        result = evaluate(run, str(sets[f"train_{dom}"]), str(sets["test_a"]), knn=False,
                          distance=[str(sets["pool"])])
        assert "knn" not in result and "linear" not in result  # only what was asked
        assert result["distance"]["samples"] == 200 and result["distance"]["pool_samples"] == 300
        dists[dom] = result["distance"]["frechet"]
    assert dists["a"] < dists["b"], dists


def test_distance_of_the_whole_source(tiny_eval):
    root, run, sets = tiny_eval
    result = evaluate(run, str(sets["train_a"]), str(sets["test_a"]), knn=False, distance="source",
                      distance_samples=250)
    assert result["distance"]["pool_samples"] == 300 and result["distance"]["samples"] == 200
    assert result["distance"]["pool"].startswith("run source: 300 samples")


def test_no_progress_is_silent_on_stderr(tiny_eval, capsys):
    root, run, sets = tiny_eval
    out = root / "quiet" / "result.json"
    assert main(["--checkpoint", str(run), "--train", str(sets["train_a"]), "--test", str(sets["test_a"]), "--linear",
                 "--distance", str(sets["pool"]), "--distance-samples", "40", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    bars = [ln for ln in printed.err.splitlines() if not ln.startswith("note: ")]  # a probe at its cap is noted
    assert bars == [] and json.loads(printed.out)["distance"]["samples"] == 40


def test_cli_reports_a_missing_run(tmp_path, make_shard_set, capsys):
    s = make_shard_set(200, shard_size=100, seed=12)
    assert main(["--checkpoint", str(tmp_path / "nope"), "--train", str(s), "--test", str(s)]) == 2
    assert "not a finished run" in capsys.readouterr().err
