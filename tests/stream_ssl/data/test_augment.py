"""The worker part: draft decoding that never costs a crop resolution, random resized crops with
torchvision's distribution, uint8 views, decode errors, and the per-method view recipes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

from stream_ssl.data.augment import (
    MAX_DECODE_PIXELS,
    ViewSpec,
    _draft,
    byol_views,
    crop_view,
    decode_rgb,
    decode_views,
    dino_views,
    draft_factor,
    draw_geometry,
    mocov3_views,
    multicrop_views,
    random_resized_crop_box,
    render_view,
    simclr_views,
    swav_views,
    to_chw,
)
from tests.helpers.images import photo_like


@pytest.fixture(scope="module")
def big_jpeg():
    return photo_like(1600, 1200, seed=3)


@pytest.mark.parametrize("w,h", [(1600, 1200), (1001, 753), (67, 45), (9, 17)])
def test_draft_grants_exactly_the_factor_asked(w, h):
    data = photo_like(w, h, seed=1)
    for factor in (2, 4, 8):
        if min(w, h) < factor:
            continue
        im = Image.open(io.BytesIO(data))
        assert _draft(im, factor) == factor
        im.load()
        assert im.size == (-(-w // factor), -(-h // factor))
    png = Image.open(io.BytesIO(photo_like(w, h, fmt="PNG")))
    assert _draft(png, 4) == 1  # not a JPEG: no draft


@settings(max_examples=200, deadline=None)
@given(w=st.integers(16, 6000), h=st.integers(16, 6000), sizes=st.lists(st.integers(8, 256), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_draft_factor_keeps_every_crop_at_least_its_output_size(w, h, sizes, seed):
    specs = [ViewSpec(s, scale=(0.05, 1.0)) for s in sizes]
    geometry = draw_geometry(w, h, specs, np.random.default_rng(seed))
    f = draft_factor(geometry, specs)
    assert f in (1, 2, 4, 8)
    sides = [(min(g.box[2] - g.box[0], g.box[3] - g.box[1]), s.size) for g, s in zip(geometry, specs)]
    if f > 1:
        assert all(side / f >= size for side, size in sides)
    if f < 8:  # the next scale would cost some crop its resolution
        assert any(side / (2 * f) < size for side, size in sides)


def test_decode_views_uses_draft_only_where_it_keeps_resolution(big_jpeg):
    """Same geometry either way; where a reduced decode is used, the views match the full decode closely.
    The old rule (short side >= view size) would decode this 1600x1200 photo at 1/4 for 224 px views and
    upsample small crops; here every crop keeps >= 224 source pixels per side."""
    full = Image.open(io.BytesIO(big_jpeg)).convert("RGB")
    specs = [ViewSpec(224), ViewSpec(64, scale=(0.3, 1.0))]
    factors = []
    for seed in range(12):
        views = decode_views(big_jpeg, specs, np.random.default_rng(seed))
        geometry = draw_geometry(1600, 1200, specs, np.random.default_rng(seed))
        factors.append(draft_factor(geometry, specs))
        for v, g, s in zip(views, geometry, specs):
            assert v.shape == (s.size, s.size, 3) and v.dtype == np.uint8
            ref = render_view(full, g, s.size)
            assert np.abs(v.astype(int) - ref).mean() < 4.0
    assert 1 in factors and max(factors) >= 2  # both cases exercised
    only_small = [ViewSpec(32, scale=(0.5, 1.0))] * 2
    geometry = draw_geometry(1600, 1200, only_small, np.random.default_rng(0))
    assert draft_factor(geometry, only_small) == 8


def test_decode_rgb_min_side(big_jpeg):
    assert decode_rgb(big_jpeg).size == (1600, 1200)
    im = decode_rgb(big_jpeg, 224)
    assert im.mode == "RGB" and im.size == (400, 300)  # 1/4: shorter side 300 >= 224; 1/8 would be 150
    assert decode_rgb(big_jpeg, 600).size == (800, 600)
    assert decode_rgb(photo_like(64, 48, fmt="PNG"), 8).size == (64, 48)


def test_crop_view_and_decode_views_draw_the_same():
    small = photo_like(90, 70, seed=2)  # crops < 2 x 48: no draft
    spec = ViewSpec(48)
    im = decode_rgb(small)
    a = crop_view(im, spec, np.random.default_rng(5))
    (b,) = decode_views(small, [spec], np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_modes_and_formats_decode_to_rgb():
    rgb = np.asarray(Image.open(io.BytesIO(photo_like(48, 40))).convert("RGB"))
    variants = {}
    for mode in ("L", "CMYK", "P", "RGBA", "I;16"):
        buf = io.BytesIO()
        im = Image.fromarray(rgb)
        im = im.convert(mode) if mode != "I;16" else im.convert("L").convert("I;16")
        im.save(buf, "JPEG" if mode in ("L", "CMYK") else "PNG")
        variants[mode] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "WEBP")
    variants["webp"] = buf.getvalue()
    for name, data in variants.items():
        (v,) = decode_views(data, [ViewSpec(16)], np.random.default_rng(0))
        assert v.shape == (16, 16, 3) and v.dtype == np.uint8, name


def test_undecodable_and_oversized_images_raise():
    good = photo_like(64, 48)
    spec = [ViewSpec(16)]
    for bad in (b"", b"not an image", good[: len(good) // 2], good[:20] + bytes(len(good) - 20)):
        with pytest.raises((OSError, ValueError, SyntaxError)):
            decode_views(bad, spec, np.random.default_rng(0))
    b = bytearray(photo_like(16, 16))  # patch the frame header to claim 10000 x 7000 pixels
    i = 2
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + ((b[i + 2] << 8) | b[i + 3])
    b[i + 5: i + 9] = (7000).to_bytes(2, "big") + (10000).to_bytes(2, "big")
    assert 10000 * 7000 > MAX_DECODE_PIXELS
    with pytest.raises(ValueError, match="outside what we decode"):
        decode_views(bytes(b), spec, np.random.default_rng(0))


def test_random_resized_crop_follows_torchvision():
    """Area fraction, log aspect ratio and position: two-sample KS against torchvision's own draws."""
    w, h, n = 500, 375, 4000
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)])
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(224)
    tv = []
    for _ in range(n):
        p = rrc.make_params([torch.zeros(3, h, w)])
        tv.append((p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]))
    tv = np.array(tv)

    def features(b):
        cw, ch = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return {"area": cw * ch / (w * h), "log_aspect": np.log(cw / ch), "cx": (b[:, 0] + b[:, 2]) / 2,
                "cy": (b[:, 1] + b[:, 3]) / 2}

    fo, ft = features(ours), features(tv)
    for key in fo:
        assert stats.ks_2samp(fo[key], ft[key]).pvalue > 1e-3, key
    assert (ours[:, 0] >= 0).all() and (ours[:, 2] <= w).all() and (ours[:, 3] <= h).all()
    flips = sum(g.flip for _ in range(2000) for g in draw_geometry(w, h, [ViewSpec(8)], rng))
    lo, hi = stats.binom.ppf([0.0005, 0.9995], 2000, 0.5)
    assert lo <= flips <= hi
    # a flip view is the mirror of the unflipped one (same box)
    data = photo_like(80, 60)
    (a,) = decode_views(data, [ViewSpec(24, flip_p=0.0)], np.random.default_rng(9))
    (b,) = decode_views(data, [ViewSpec(24, flip_p=1.0)], np.random.default_rng(9))
    assert np.array_equal(a[:, ::-1], b)


def test_to_chw():
    views = [np.random.default_rng(i).integers(0, 256, (6, 5, 3), dtype=np.uint8) for i in range(3)]
    t = to_chw(views)
    assert t.shape == (3, 3, 6, 5) and t.dtype == torch.uint8 and t.is_contiguous()
    assert torch.equal(t, torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2))


def test_view_recipes():
    s = simclr_views(224)
    assert len(s) == 2 and s[0] == s[1]
    assert (s[0].brightness, s[0].contrast, s[0].saturation, s[0].hue) == (0.8, 0.8, 0.8, 0.2)
    assert s[0].jitter_p == 0.8 and s[0].gray_p == 0.2 and s[0].blur_p == 0.5 and s[0].solarize_p == 0
    small = simclr_views(32)
    assert small[0].blur_p == 0 and small[0].brightness == pytest.approx(0.4)
    b1, b2 = byol_views(224)
    assert (b1.blur_p, b1.solarize_p, b2.blur_p, b2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (b1.brightness, b1.contrast, b1.saturation, b1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert mocov3_views(224) == byol_views(224)
    assert byol_views(64)[0].blur_p == 0 and byol_views(64, blur=True)[0].blur_p == 1.0
    d = dino_views(224, 96, 8)
    assert len(d) == 10 and [v.size for v in d] == [224, 224] + [96] * 8
    assert d[0].scale == (0.4, 1.0) and d[2].scale == (0.05, 0.4)
    assert (d[0].blur_p, d[1].blur_p, d[1].solarize_p, d[2].blur_p, d[2].solarize_p) == (1.0, 0.1, 0.2, 0.5, 0.0)
    sw = swav_views(224, 96, 6)
    assert len(sw) == 8 and sw[0].scale == (0.14, 1.0) and sw[2].scale == (0.05, 0.14)
    assert all(v.blur_p == 0.5 and v.solarize_p == 0 and v.brightness == 0.8 for v in sw)
    custom = multicrop_views(160, 64, 3, global_scale=(0.3, 1.0), local_scale=(0.1, 0.3), style="swav", blur=False)
    assert [v.size for v in custom] == [160, 160, 64, 64, 64] and custom[3].scale == (0.1, 0.3)
    assert all(v.blur_p == 0 for v in custom)
    with pytest.raises(ValueError):
        multicrop_views(224, 96, 2, style="simclr")
