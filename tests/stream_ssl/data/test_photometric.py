"""The batched photometric part: identity settings are the identity, each operation equals torchvision's on
the same parameters, the fast normalized path equals the reference one, and the parameters follow the
torchvision recipe's distributions (binomial and KS tests)."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats
from torchvision.transforms import v2

from stream_ssl.data.augment import (
    BLUR_TAIL,
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    PhotometricParams,
    ViewSpec,
    adjust_hue,
    apply_photometric,
    blur_radii,
    byol_views,
    device_views,
    gaussian_blur,
    gaussian_kernels,
    grayscale,
    normalize,
    photometric,
    photometric_with,
    sample_params,
    simclr_views,
    solarize,
)
from tests.helpers.images import image_batch

N = 12


def params(n: int = N, **over) -> PhotometricParams:
    """Jitter on for all, identity factors, torchvision's listed order, nothing else: override fields."""
    one = torch.ones(n)
    off = torch.zeros(n, dtype=torch.bool)
    d = dict(jitter=~off, brightness=one.clone(), contrast=one.clone(), saturation=one.clone(), hue=torch.zeros(n),
             order=torch.arange(4).repeat(n, 1), gray=off, blur=off, sigma=one.clone(), solarize=off)
    d.update(over)
    return PhotometricParams(**d)


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture(scope="module")
def x():
    return image_batch(N, 40, seed=1)


@pytest.fixture(scope="module")
def x8():
    return (image_batch(N, 40, seed=2) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# Identity.


@pytest.mark.parametrize("mode", ["fused", "exact"])
def test_identity_settings_give_identity_output(x, x8, mode):
    ident = ViewSpec(40, jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0, gray_p=0, blur_p=0,
                     solarize_p=0, jitter=mode)
    p = sample_params(ident, N, gen())
    assert bool(p.jitter.all())
    assert torch.equal(apply_photometric(x.clone(), p, ident), x)  # exactly
    off = ViewSpec(40, jitter_p=0.0, gray_p=0, jitter=mode)
    assert torch.equal(apply_photometric(x.clone(), sample_params(off, N, gen()), off), x)
    want = normalize(x8.float() / 255)
    for spec in (ident, off):
        got = photometric(x8, spec, gen())
        assert got.dtype == torch.float32 and got.shape == x8.shape
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)  # the normalization, folded, rounds differently


# ----------------------------------------------------------------------------------------------------------
# Each operation against torchvision.transforms.v2.functional on the same parameters.


def per_sample(fn, x, factors):
    return torch.stack([fn(x[i], float(f)) for i, f in enumerate(factors)])


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_linear_ops_match_torchvision(x, op):
    f = torch.linspace(0.0, 2.0, N)
    ref = per_sample(getattr(TF, f"adjust_{op}"), x, f)
    for mode in ("fused", "exact"):
        got = apply_photometric(x.clone(), params(**{op: f}), ViewSpec(40, jitter=mode))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_exact_hue_matches_torchvision(x):
    h = torch.linspace(-0.5, 0.5, N)
    ref = per_sample(TF.adjust_hue, x, h)
    torch.testing.assert_close(adjust_hue(x, h), ref, atol=1e-5, rtol=0)
    got = apply_photometric(x.clone(), params(hue=h), ViewSpec(40, jitter="exact"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    gray = x.mean(1, keepdim=True).expand_as(x)
    torch.testing.assert_close(adjust_hue(gray, h), gray, atol=1e-6, rtol=0)


def test_fused_hue_is_within_the_documented_tolerance(x):
    """Fused mode rotates about the gray axis instead of shifting HSV hue: mean |diff| <= 0.06, max <= 0.3
    for |h| <= 0.1 (the BYOL/DINO range); gray stays gray; h = 1/3 turns red into green exactly."""
    h = torch.linspace(-0.1, 0.1, N)
    got = apply_photometric(x.clone(), params(hue=h), ViewSpec(40))
    diff = (got - per_sample(TF.adjust_hue, x, h)).abs()
    assert diff.mean() <= 0.06 and diff.max() <= 0.3
    gray = x.mean(1, keepdim=True).expand_as(x).contiguous()
    torch.testing.assert_close(apply_photometric(gray.clone(), params(hue=h), ViewSpec(40)), gray, atol=1e-6,
                               rtol=0)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    green = apply_photometric(red.clone(), params(1, hue=torch.tensor([1 / 3])), ViewSpec(2))
    torch.testing.assert_close(green, red.roll(1, dims=1), atol=1e-6, rtol=0)


def test_grayscale_solarize_blur_match_torchvision(x):
    torch.testing.assert_close(grayscale(x), torch.stack([TF.rgb_to_grayscale(v, 3) for v in x]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(solarize(x, 0.5), torch.stack([TF.solarize(v, 0.5) for v in x]), atol=0, rtol=0)
    sigma = torch.linspace(0.1, 2.0, N)
    for k in (5, 23):
        ref = torch.stack([TF.gaussian_blur(v, [k, k], [float(s), float(s)]) for v, s in zip(x, sigma)])
        torch.testing.assert_close(gaussian_blur(x, sigma, k), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(gaussian_blur(x, sigma, k, by_radius=False), ref, atol=1e-5, rtol=0)
    spec = ViewSpec(40, blur_kernel=9)
    on = torch.ones(N, dtype=torch.bool)
    got = apply_photometric(x.clone(), params(jitter=~on, gray=on, blur=on, sigma=sigma, solarize=on), spec)
    ref = torch.stack([TF.solarize(TF.gaussian_blur(TF.rgb_to_grayscale(v, 3), [9, 9], [float(s)] * 2), 0.5)
                       for v, s in zip(x, sigma)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_blur_skips_only_taps_that_weigh_less_than_the_tail_bound():
    # sigma 1: offsets beyond 5 weigh ~1e-8 in all, offset 5 alone ~1.5e-6; sigma 2 needs 10 of 11
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0])
    kern = gaussian_kernels(sigma, 23)
    radii = blur_radii(kern)
    assert radii.tolist() == [0, 2, 5, 10, 11]
    for row, r in zip(kern, radii.tolist()):
        dropped = row.sum() - row[11 - r: 12 + r].sum()
        assert dropped < BLUR_TAIL
        if r:
            assert row[11 - r] + row[11 + r] + dropped >= BLUR_TAIL  # one tap fewer would drop too much


def _tv_jitter(v, p: PhotometricParams, i: int):
    fns = {BRIGHTNESS: (TF.adjust_brightness, p.brightness), CONTRAST: (TF.adjust_contrast, p.contrast),
           SATURATION: (TF.adjust_saturation, p.saturation), HUE: (TF.adjust_hue, p.hue)}
    for op in p.order[i].tolist():
        fn, f = fns[op]
        v = fn(v, float(f[i]))
    return v


def test_jitter_in_drawn_order_matches_torchvision_color_jitter():
    """Exact mode = torchvision's ColorJitter op by op (clamps included); fused mode = the same composition
    when nothing clips (mid-range images, moderate factors, no hue)."""
    n = 48
    g = gen(3)
    p = sample_params(ViewSpec(32, jitter_p=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, gray_p=0),
                      n, g)
    x = image_batch(n, 32, seed=4)
    ref = torch.stack([_tv_jitter(x[i], p, i) for i in range(n)])
    torch.testing.assert_close(apply_photometric(x.clone(), p, ViewSpec(32, jitter="exact")), ref, atol=1e-5,
                               rtol=0)
    mild = sample_params(ViewSpec(32, jitter_p=1.0, brightness=0.15, contrast=0.15, saturation=0.15, hue=0,
                                  gray_p=0), n, g)
    xm = image_batch(n, 32, seed=5, lo=0.3, hi=0.7)
    ref = torch.stack([_tv_jitter(xm[i], mild, i) for i in range(n)])
    assert 0 < ref.min() and ref.max() < 1  # nothing clipped: the fused map must agree
    torch.testing.assert_close(apply_photometric(xm.clone(), mild, ViewSpec(32)), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", [simclr_views(40, blur=True)[0], byol_views(40, blur=True)[1],
                                  ViewSpec(40, gray_p=0.5, blur_p=0.5, solarize_p=0.5, blur_kernel=7),
                                  ViewSpec(40, jitter="exact", blur_p=0.5, solarize_p=0.5)],
                         ids=["simclr", "byol2", "all", "exact"])
def test_fast_normalized_path_equals_reference(x8, spec):
    p = sample_params(spec, N, gen(5))
    ref = normalize(apply_photometric(x8.float() / 255, p, spec))
    for chunk in (None, 1, 5, N):
        torch.testing.assert_close(photometric_with(x8, p, spec, chunk), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(photometric(x8, spec, gen(5)), ref, atol=1e-5, rtol=0)  # same draws


def test_device_views_passes_float_views_through(x8):
    spec = ViewSpec(40)
    ready = torch.randn(N, 3, 40, 40)
    out = device_views([x8, ready], [spec, spec], gen(1), "cpu")
    torch.testing.assert_close(out[0], photometric(x8, spec, gen(1)))
    assert out[1] is ready or torch.equal(out[1], ready)


# ----------------------------------------------------------------------------------------------------------
# Parameter distributions (deterministic seeds; bounds are 99.9% intervals).


def binomial_ok(k: int, n: int, p: float) -> bool:
    lo, hi = stats.binom.ppf([0.0005, 0.9995], n, p)
    return lo <= k <= hi


def test_parameter_distributions_follow_the_recipe():
    n = 20000
    spec = ViewSpec(32, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2,
                    blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.2)
    p = sample_params(spec, n, gen(11))
    j = p.jitter
    for mask, prob in ((j, 0.8), (p.gray, 0.2), (p.blur, 0.5), (p.solarize, 0.2)):
        assert binomial_ok(int(mask.sum()), n, prob)
    assert (p.brightness[~j] == 1).all() and (p.contrast[~j] == 1).all() and (p.hue[~j] == 0).all()
    for values, (lo, hi) in ((p.brightness[j], (0.6, 1.4)), (p.contrast[j], (0.6, 1.4)),
                             (p.saturation[j], (0.8, 1.2)), (p.hue[j], (-0.1, 0.1)), (p.sigma, (0.1, 2.0))):
        v = values.double().numpy()
        assert lo <= v.min() and v.max() <= hi
        assert stats.kstest(v, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    counts = {perm: 0 for perm in permutations(range(4))}
    for row in p.order.tolist():
        counts[tuple(row)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3
    # the same distributions as torchvision's own draws (two-sample KS)
    tv = v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    torch.manual_seed(0)
    draws = [tv.make_params([torch.zeros(3, 4, 4)]) for _ in range(3000)]
    for ours, key in ((p.brightness[j], "brightness_factor"), (p.saturation[j], "saturation_factor"),
                      (p.hue[j], "hue_factor")):
        assert stats.ks_2samp(ours.numpy(), [d[key] for d in draws]).pvalue > 1e-3
    sig = [v2.GaussianBlur(23, (0.1, 2.0)).make_params([torch.zeros(3, 4, 4)])["sigma"][0] for _ in range(3000)]
    assert stats.ks_2samp(p.sigma.numpy(), sig).pvalue > 1e-3
    # max(0, 1 - x): strength >= 1 starts at 0
    wide = sample_params(ViewSpec(32, jitter_p=1.0, brightness=1.5), 2000, gen(2))
    assert wide.brightness.min() >= 0 and wide.brightness.max() <= 2.5 and wide.brightness.min() < 0.1


def test_photometric_applies_the_drawn_operations_end_to_end():
    """Observed outputs: grayscale samples have equal channels, solarized ones invert bright pixels, in the
    drawn proportions."""
    n = 4000
    spec = ViewSpec(8, jitter_p=0.0, gray_p=0.3, solarize_p=0.4)
    x8 = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    x8[:, 0], x8[:, 1], x8[:, 2] = 200, 30, 90  # saturated colour, one channel above the threshold
    out = photometric(x8, spec, gen(4))
    p = sample_params(spec, n, gen(4))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    v = (out * std + mean)[:, :, 0, 0]  # back to [0, 1]
    gray = (v.max(1).values - v.min(1).values) < 1e-4
    assert torch.equal(gray, p.gray)
    assert binomial_ok(int(gray.sum()), n, 0.3)
    solarized = ~p.gray & (v[:, 0] < 0.5)
    assert torch.equal(solarized, p.solarize & ~p.gray)
    assert math.isclose(float(v[solarized, 0].mean()), 1 - 200 / 255, abs_tol=1e-5)


def test_view_spec_validation():
    with pytest.raises(ValueError):
        ViewSpec(0)
    with pytest.raises(ValueError):
        ViewSpec(32, gray_p=1.5)
    with pytest.raises(ValueError):
        ViewSpec(32, blur_kernel=4)
    with pytest.raises(ValueError):
        ViewSpec(32, jitter="hsv")
    assert ViewSpec(224).kernel_size() == 23 and ViewSpec(96).kernel_size() == 9
    assert np.isclose(ViewSpec(32).ratio[0], 0.75)


def test_the_accelerator_path_needs_no_host_sync_and_computes_the_same(monkeypatch):
    """sync_free (the GPU default): masked steps on the whole batch selected with `where`, blur with every tap;
    the same views as the CPU's subset path (up to the blur taps the CPU skips, < 1e-3 of the range)."""
    x = image_batch(N, 32, seed=7)
    spec = simclr_views(32)[0]
    params = sample_params(spec, N, torch.Generator().manual_seed(3))
    exact = photometric_with(x, params, spec, sync_free=False).clone()
    calls = []
    real = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    free = photometric_with(x, params, spec, sync_free=True)
    assert not calls  # no nonzero: nothing waits on the device
    assert torch.allclose(free, exact, atol=2e-2) and (free - exact).abs().mean() < 1e-3
