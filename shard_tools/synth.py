"""Render a labeled procedural image set: shape and texture families under heavy nuisance variation.

    shard-tools synth --out DIR --samples N [--classes 10] [--size 64] [--domain a|b]
                                [--seed S] [--quality 90]

writes N JPEG files `DIR/images/XXXX/NNNNNN.jpg` (1000 per folder), `DIR/classes.txt` (one class name a
line; line k names label k) and, last, `DIR/manifest.csv` with header `path,label` (paths relative to DIR).

The class of a sample is its shape or texture family (see `FAMILIES`); everything else is nuisance drawn
at random: position, scale, rotation, colours, background, distractor blobs, pixel noise. Sample `i` gets
label `i % classes`, so labels are balanced within +-1, and is a pure function of (seed, i, domain, size):
its random numbers come from `numpy.random.default_rng([seed, i, domain_id])`, so a set of N samples is
a prefix of the set of M > N samples with the same seed, and the same arguments give byte-identical files.
All random draws that shape the scene are made before the ones whose count depends on the image size,
so one sample rendered at 32 and at 64 px shows the same scene.

Domain `a`: bright saturated objects filled flat on muted solid/gradient backgrounds with light noise,
sharp. Domain `b`: pastel or dark objects with a contrasting outline, on saturated low-frequency blotchy
backgrounds with heavy grain, blurred. The families, and so the labels, mean the same in both domains.

Everything is drawn with vectorised numpy signed-distance masks (anti-aliased over one pixel); there are
no per-pixel Python loops.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import io
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from shard_tools.cli import run_main, tool_prog
from shard_tools.quantities import COUNT_HELP, count_arg

DOMAINS = {"a": 0, "b": 1}
FOLDER_SIZE = 1000
TAU = 2.0 * math.pi

Array = np.ndarray
Rng = np.random.Generator


# --------------------------------------------------------------------------------------------------
# Shape families: signed distance (negative inside) in units of the object radius, object frame (u, v).
# Each function may draw its own shape parameters from the generator.


def _norm(u: Array, v: Array) -> Array:
    return np.sqrt(u * u + v * v)  # np.hypot is several times slower on small float32 arrays


def _box(u: Array, v: Array, a: float, b: float) -> Array:
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _polygon(u: Array, v: Array, n: int, apothem: float) -> Array:
    seg = TAU / n
    a = np.mod(np.arctan2(v, u), seg) - seg / 2
    return _norm(u, v) * np.cos(a) - apothem


def _star(u: Array, v: Array, n: int, outer: float, inner: float) -> Array:
    a = np.mod(np.arctan2(v, u), TAU / n) * (n / TAU)  # 0..1 between two spikes
    t = 1.0 - 2.0 * np.abs(a - 0.5)  # 0 at a spike, 1 in the valley
    return (_norm(u, v) - (outer - (outer - inner) * t)) * 0.5


def _disk(u: Array, v: Array, rng: Rng) -> Array:
    return _norm(u, v) - 1.0


def _square(u: Array, v: Array, rng: Rng) -> Array:
    return _box(u, v, 0.82, 0.82)


def _triangle(u: Array, v: Array, rng: Rng) -> Array:
    return _polygon(u, v + 0.2, 3, 0.6)


def _star5(u: Array, v: Array, rng: Rng) -> Array:
    return _star(u, v, 5, 1.15, rng.uniform(0.42, 0.55))


def _ring(u: Array, v: Array, rng: Rng) -> Array:
    inner = rng.uniform(0.5, 0.66)
    return np.abs(_norm(u, v) - (1.0 + inner) / 2) - (1.0 - inner) / 2


def _cross(u: Array, v: Array, rng: Rng) -> Array:
    w = rng.uniform(0.24, 0.34)
    return np.minimum(_box(u, v, 1.0, w), _box(u, v, w, 1.0))


def _crescent(u: Array, v: Array, rng: Rng) -> Array:
    off = rng.uniform(0.35, 0.55)
    u = u + 0.3
    return np.maximum(_norm(u, v) - 1.0, 0.85 - _norm(u - off, v))


def _bar(u: Array, v: Array, rng: Rng) -> Array:
    aspect = rng.uniform(0.28, 0.4)  # elongated ellipse, semi-axes 1.15 and 1.15 * aspect
    v = v / aspect
    k = _norm(u, v) + 1e-6
    grad = _norm(u, v / aspect) / k
    return (k - 1.15) / (grad + 1e-6)


def _bullseye(u: Array, v: Array, rng: Rng) -> Array:
    r = _norm(u, v)
    return np.minimum(r - 0.36, np.abs(r - 0.82) - 0.18)


def _half_disk(u: Array, v: Array, rng: Rng) -> Array:
    v = v + 0.45
    return np.maximum(_norm(u, v) - 1.15, -v)


def _frame(u: Array, v: Array, rng: Rng) -> Array:
    inner = rng.uniform(0.45, 0.58)
    return np.maximum(_box(u, v, 0.88, 0.88), -_box(u, v, inner, inner))


def _sparkle(u: Array, v: Array, rng: Rng) -> Array:
    return _star(u, v, 4, 1.2, rng.uniform(0.2, 0.28))


def _l_shape(u: Array, v: Array, rng: Rng) -> Array:
    return np.minimum(_box(u + 0.55, v, 0.3, 0.95), _box(u, v - 0.65, 0.85, 0.3))


def _dumbbell(u: Array, v: Array, rng: Rng) -> Array:
    d = rng.uniform(0.58, 0.68)
    discs = np.minimum(_norm(u - d, v), _norm(u + d, v)) - 0.45
    return np.minimum(discs, _box(u, v, d, 0.13))


def _t_shape(u: Array, v: Array, rng: Rng) -> Array:
    return np.minimum(_box(u, v + 0.7, 0.95, 0.26), _box(u, v - 0.15, 0.26, 0.85))


def _arrow(u: Array, v: Array, rng: Rng) -> Array:
    head = np.maximum(0.05 - u, (u + 1.25 * np.abs(v) - 1.0) / 1.6)
    return np.minimum(head, _box(u + 0.45, v, 0.5, 0.2))


def _hexagon(u: Array, v: Array, rng: Rng) -> Array:
    return _polygon(u, v, 6, 0.9)


# --------------------------------------------------------------------------------------------------
# Texture families: coverage in 0..1 of the first pattern colour, in patch coordinates (x, y in image
# widths, rotated). `px` is the pixel size in image widths. Orientation-defined textures (stripes,
# zigzag) only get a small rotation jitter, and use horizontal/vertical orientations only, so a
# horizontal flip (a standard SSL augmentation) never turns one class into another.


def _ramp(s: Array, width: float) -> Array:
    """Anti-aliased 0/1 step of a signed field `s` whose value changes by `width` per pixel."""
    return np.clip(0.5 + s / width, 0.0, 1.0)


def _stripes(c: Array, rng: Rng, px: float) -> Array:
    period = rng.uniform(0.12, 0.2)
    s = np.sin(c * (TAU / period) + rng.uniform(0, TAU)) + rng.uniform(-0.3, 0.3)
    return _ramp(s, TAU * px / period)


def _h_stripes(x: Array, y: Array, rng: Rng, px: float) -> Array:
    return _stripes(y, rng, px)


def _v_stripes(x: Array, y: Array, rng: Rng, px: float) -> Array:
    return _stripes(x, rng, px)


def _checker(x: Array, y: Array, rng: Rng, px: float) -> Array:
    period = rng.uniform(0.16, 0.26)
    w = TAU / period
    s = np.sin(x * w + rng.uniform(0, TAU)) * np.sin(y * w + rng.uniform(0, TAU))
    return _ramp(s, w * px * 0.7)


def _lattice(x: Array, y: Array, period: float, rng: Rng) -> tuple[Array, Array]:
    fx = x / period + rng.uniform(0, 1)
    fy = y / period + rng.uniform(0, 1)
    return (fx - np.floor(fx + 0.5)) * period, (fy - np.floor(fy + 0.5)) * period


def _dots(x: Array, y: Array, rng: Rng, px: float) -> Array:
    period = rng.uniform(0.15, 0.23)
    fx, fy = _lattice(x, y, period, rng)
    return _ramp(period * rng.uniform(0.24, 0.32) - _norm(fx, fy), px)


def _grid(x: Array, y: Array, rng: Rng, px: float) -> Array:
    period = rng.uniform(0.16, 0.24)
    fx, fy = _lattice(x, y, period, rng)
    half_width = max(rng.uniform(0.025, 0.035), 0.6 * px)
    return _ramp(half_width - np.minimum(np.abs(fx), np.abs(fy)), px)


def _zigzag(x: Array, y: Array, rng: Rng, px: float) -> Array:
    zig = rng.uniform(0.18, 0.26)
    amp = rng.uniform(0.05, 0.08)
    f = x / zig + rng.uniform(0, 1)
    return _stripes(y + amp * 2.0 * np.abs(f - np.floor(f) - 0.5), rng, px)


def _sunburst(x: Array, y: Array, rng: Rng, px: float) -> Array:
    k = int(rng.integers(6, 10))
    rho = _norm(x, y) + 1e-3
    s = np.sin(k * np.arctan2(y, x) + rng.uniform(0, TAU))
    return _ramp(s, k * px / rho)


ShapeFn = Callable[[Array, Array, Rng], Array]
TextureFn = Callable[[Array, Array, Rng, float], Array]

# (name, kind, function, free rotation). The first ten are the most distinct (the default --classes 10).
FAMILIES: list[tuple[str, str, ShapeFn | TextureFn, bool]] = [
    ("disk", "shape", _disk, True),
    ("square", "shape", _square, True),
    ("triangle", "shape", _triangle, True),
    ("star", "shape", _star5, True),
    ("ring", "shape", _ring, True),
    ("cross", "shape", _cross, True),
    ("h_stripes", "texture", _h_stripes, False),
    ("v_stripes", "texture", _v_stripes, False),
    ("checker", "texture", _checker, True),
    ("dots", "texture", _dots, True),
    ("crescent", "shape", _crescent, True),
    ("bar", "shape", _bar, True),
    ("bullseye", "shape", _bullseye, True),
    ("half_disk", "shape", _half_disk, True),
    ("frame", "shape", _frame, True),
    ("sparkle", "shape", _sparkle, True),
    ("l_shape", "shape", _l_shape, True),
    ("dumbbell", "shape", _dumbbell, True),
    ("grid", "texture", _grid, True),
    ("zigzag", "texture", _zigzag, False),
    ("sunburst", "texture", _sunburst, True),
    ("t_shape", "shape", _t_shape, True),
    ("arrow", "shape", _arrow, True),
    ("hexagon", "shape", _hexagon, True),
]
MAX_CLASSES = len(FAMILIES)


def class_names(classes: int) -> list[str]:
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_CLASSES} (number of families), got {classes}")
    return [name for name, _, _, _ in FAMILIES[:classes]]


# --------------------------------------------------------------------------------------------------
# Colours and backgrounds.


def _hsv(h: float, s: float, v: float) -> Array:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _object_colours(rng: Rng, domain: str) -> tuple[Array, Array, Array]:
    """(fill, second pattern colour, outline)."""
    hue = rng.uniform(0, 1)
    hue2 = hue + rng.uniform(0.25, 0.75)
    if domain == "a":
        fill = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
        second = _hsv(hue2, rng.uniform(0.6, 1.0), rng.uniform(0.2, 0.55))
        return fill, second, fill
    pastel = _hsv(hue, rng.uniform(0.08, 0.3), rng.uniform(0.85, 1.0))
    dark = _hsv(hue2, rng.uniform(0.2, 0.7), rng.uniform(0.06, 0.28))
    return (pastel, dark, dark) if rng.random() < 0.5 else (dark, pastel, pastel)


@lru_cache(maxsize=16)
def _grid_coords(size: int) -> tuple[Array, Array]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=64)
def _interp_matrix(size: int, g: int) -> Array:
    """(size, g) weights that interpolate g knots spanning the unit square (smoothstep) at pixel centres."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * (g - 1)
    i = np.minimum(c.astype(np.int64), g - 2)
    f = c - i
    f = f * f * (3 - 2 * f)
    w = np.zeros((size, g), dtype=np.float64)
    w[np.arange(size), i] = 1 - f
    w[np.arange(size), i + 1] = f
    w.setflags(write=False)
    return w


def _value_noise(values: Array, size: int) -> Array:
    """Smooth field at the pixel centres from a (g, g) grid of knot values spanning the unit square."""
    w = _interp_matrix(size, values.shape[0])
    return (w @ values @ w.T).astype(np.float32)


def _background(rng: Rng, domain: str, x: Array, y: Array) -> Array:
    """(3, H, W) float32 background in 0..1."""
    if domain == "a":
        c1 = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.7))
        c2 = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.7))
        if rng.random() < 0.3:
            return np.repeat(np.repeat(c1[:, None, None], x.shape[0], axis=1), x.shape[1], axis=2)
        angle = rng.uniform(0, TAU)
        t = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle) + 0.5
    else:
        hue = rng.uniform(0, 1)
        c1 = _hsv(hue, rng.uniform(0.35, 0.75), rng.uniform(0.35, 0.7))
        c2 = _hsv(hue + rng.uniform(0.15, 0.5), rng.uniform(0.35, 0.75), rng.uniform(0.35, 0.7))
        g = int(rng.integers(3, 6))
        coarse = rng.random((g, g))
        fine = rng.random((12, 12))
        # Blotches: coarse + fine value noise, contrast doubled around 0.5.
        t = _value_noise(1.5 * coarse - 0.5, x.shape[0]) + _value_noise(0.5 * fine, x.shape[0])
    np.clip(t, 0.0, 1.0, out=t)
    return c1[:, None, None] + (c2 - c1)[:, None, None] * t


def _paint(img: Array, colour: Array, alpha: Array) -> None:
    """Blend `colour` (3,) over `img` (3, H, W, in place) with coverage `alpha` (H, W)."""
    delta = colour[:, None, None] - img
    delta *= alpha
    img += delta


def _coverage(sdf: Array) -> Array:
    """Anti-aliased coverage of the inside of a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _window(cx: float, cy: float, reach_x: float, reach_y: float, size: int) -> tuple[slice, slice]:
    """(rows, columns) of the pixels within `reach` (image widths) of (cx, cy), clipped to the image."""
    x0 = max(int(math.floor((cx - reach_x) * size)), 0)
    x1 = min(int(math.ceil((cx + reach_x) * size)) + 1, size)
    y0 = max(int(math.floor((cy - reach_y) * size)), 0)
    y1 = min(int(math.ceil((cy + reach_y) * size)) + 1, size)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


@lru_cache(maxsize=64)
def _gaussian_taps(sigma: float) -> tuple[float, ...]:
    r = max(1, math.ceil(2.0 * sigma))
    k = np.exp(-0.5 * (np.arange(r + 1) / sigma) ** 2)
    k /= k[0] + 2 * k[1:].sum()
    return tuple(float(v) for v in k)


def _blur(img: Array, sigma: float) -> Array:
    """Separable Gaussian blur (truncated at 2 sigma, edges replicated) of a (3, H, W) image."""
    taps = _gaussian_taps(round(sigma, 3))
    r = len(taps) - 1
    for axis in (1, 2):
        n = img.shape[axis]
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(img, pad, mode="edge")

        def shifted(offset: int, p: Array = p, axis: int = axis, n: int = n) -> Array:
            index = [slice(None)] * 3
            index[axis] = slice(r + offset, r + offset + n)
            return p[tuple(index)]

        out = shifted(0) * taps[0]
        for i in range(1, r + 1):
            pair = shifted(-i) + shifted(i)
            pair *= taps[i]
            out += pair
        img = out
    return img


# Object extent, in object radii, that bounds every shape family (the T-shape's corners reach 1.36).
SHAPE_REACH = 1.4


def render(index: int, label: int, size: int, domain: str, seed: int) -> Image.Image:
    """Sample `index` of family `label` as a `size` x `size` RGB image; a pure function of its arguments."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"label must be in [0, {MAX_CLASSES}), got {label}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index, DOMAINS[domain]])  # every draw below, in this order
    _, kind, fn, free_rotation = FAMILIES[label]
    x, y = _grid_coords(size)
    img = _background(rng, domain, x, y)  # (3, H, W) float32
    _distractors(img, rng, x, y, size)
    o = _object_layout(rng, kind, free_rotation, domain, size)
    _paint_object(img, rng, x, y, o, fn, size)
    if o.blur:
        img = _blur(img, o.blur)
    return _with_grain(img, rng, o.noise_sigma, size)


def _distractors(img: Array, rng: Rng, x: Array, y: Array, size: int) -> None:
    """A few small blobs, well below the smallest object scale."""
    px = 1.0 / size
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)
        rad = rng.uniform(0.02, 0.05)
        colour = _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.9), rng.uniform(0.15, 1.0))
        disk = rng.random() < 0.5
        win = _window(cx, cy, rad + 2 * px, rad + 2 * px, size)
        bx, by = x[win] - cx, y[win] - cy
        d = _norm(bx, by) - rad if disk else _box(bx, by, rad, rad)
        _paint(img[:, win[0], win[1]], colour, _coverage(d * size))


@dataclass
class _Layout:
    """Where and how the object of one image is drawn (units of the image side)."""

    kind: str  # "shape" or "texture"
    colours: tuple  # fill, second, outline
    angle: float
    cx: float
    cy: float
    reach: tuple[float, float]  # half extent of what the object can cover, x and y
    radius: float = 0.0  # shapes
    half: tuple[float, float] = (0.0, 0.0)  # textures: half width and height of the patch
    ellipse: bool = False
    corner: float = 0.0
    outline_width: float = 0.0  # pixels
    blur: float = 0.0  # pixels
    noise_sigma: float = 0.0  # grey levels


def _object_layout(rng: Rng, kind: str, free_rotation: bool, domain: str, size: int) -> _Layout:
    colours = _object_colours(rng, domain)
    angle = rng.uniform(0, TAU) if free_rotation else rng.uniform(-0.17, 0.17)
    if kind == "shape":
        radius = rng.uniform(0.2, 0.34)
        cx, cy = (rng.uniform(radius * 0.9, 1.0 - radius * 0.9) for _ in range(2))
        o = _Layout(kind, colours, angle, cx, cy, (SHAPE_REACH * radius,) * 2, radius=radius)
    else:
        cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
        half = rng.uniform(0.26, 0.42), rng.uniform(0.26, 0.42)
        ellipse = rng.random() < 0.5
        o = _Layout(kind, colours, angle, cx, cy, half, half=half, ellipse=ellipse, corner=rng.uniform(0.03, 0.1))
    o.outline_width = rng.uniform(1.2, 2.2) * size / 64 if domain == "b" else 0.0
    o.blur = rng.uniform(0.4, 1.0) * size / 64 if domain == "b" else 0.0
    o.noise_sigma = rng.uniform(10.0, 22.0) if domain == "b" else rng.uniform(2.0, 6.0)
    return o


def _paint_object(img: Array, rng: Rng, x: Array, y: Array, o: _Layout, fn, size: int) -> None:
    """Paint the object; only the pixels it (and its outline) can reach are computed."""
    px = 1.0 / size
    fill, second, outline = o.colours
    ca, sa = math.cos(o.angle), math.sin(o.angle)
    margin = (o.outline_width + 2.0) * px
    win = _window(o.cx, o.cy, o.reach[0] + margin, o.reach[1] + margin, size)
    target = img[:, win[0], win[1]]
    dx, dy = x[win] - o.cx, y[win] - o.cy
    if o.kind == "shape":
        u = (dx * ca + dy * sa) / o.radius
        v = (dy * ca - dx * sa) / o.radius
        sdf = fn(u, v, rng) * (o.radius * size)  # in pixels
        _paint(target, fill, _coverage(sdf))
    else:
        hx, hy = o.half
        if o.ellipse:
            sdf = (_norm(dx / hx, dy / hy) - 1.0) * (min(hx, hy) * size)
        else:
            sdf = (_box(dx, dy, hx - o.corner, hy - o.corner) - o.corner) * size
        pattern = fn(dx * ca + dy * sa, dy * ca - dx * sa, rng, px)
        coverage = _coverage(sdf)
        _paint(target, second, coverage)
        coverage *= pattern
        _paint(target, fill, coverage)
    if o.outline_width:
        _paint(target, outline, _coverage(np.abs(sdf) - o.outline_width / 2))


def _with_grain(img: Array, rng: Rng, noise_sigma: float, size: int) -> Image.Image:
    """Grain: grey plus weaker colour noise, uniform with standard deviation noise_sigma (grey) and
    0.35 * noise_sigma (colour). These draws depend on `size`, so they come last and the scene drawn before
    is the same at every size."""
    noise = rng.random((4, size, size), dtype=np.float32)
    noise -= 0.5
    noise *= math.sqrt(12.0) * noise_sigma / 255.0
    img += noise[:3] * 0.35
    img += noise[3]
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return Image.fromarray(np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0)), "RGB")


def image_relpath(index: int, samples: int) -> str:
    width = max(6, len(str(samples - 1)))
    return f"images/{index // FOLDER_SIZE:04d}/{index:0{width}d}.jpg"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def synthesize(
    out: Path,
    samples: int,
    classes: int = 10,
    size: int = 64,
    domain: str = "a",
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Render `samples` images under `out` with `manifest.csv` and `classes.txt`; return the manifest path.

    Existing files are overwritten. The manifest is written last, so it only ever lists finished images.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    names = class_names(classes)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for index in range(samples):
        label = index % classes
        rel = image_relpath(index, samples)
        path = out / rel
        if index % FOLDER_SIZE == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        render(index, label, size, domain, seed).save(path, format="JPEG", quality=quality)
        rows.append((rel, label))

    _atomic_write_text(out / "classes.txt", "".join(f"{n}\n" for n in names))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label"))
    writer.writerows(rows)
    manifest = out / "manifest.csv"
    _atomic_write_text(manifest, buf.getvalue())
    return manifest


# --------------------------------------------------------------------------------------------------
# Command line.


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=tool_prog("synth.py"),
        description="Render a labeled procedural image set (shape/texture families) as JPEGs + manifest.csv.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created; files overwritten)")
    p.add_argument("--samples", type=count_arg, required=True, help=f"number of images, {COUNT_HELP}")
    p.add_argument(
        "--classes",
        type=_int_at_least(2),
        default=10,
        help=f"number of classes, 2..{MAX_CLASSES} (default 10)",
    )
    p.add_argument("--size", type=_int_at_least(16), default=64, help="image side, >= 16 px (default 64)")
    p.add_argument("--domain", choices=sorted(DOMAINS), default="a", help="rendering domain (default a)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--quality", type=_int_at_least(1), default=90, help="JPEG quality 1..100 (default 90)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.classes > MAX_CLASSES:
        parser.error(f"argument --classes: at most {MAX_CLASSES} (one class per family), got {args.classes}")
    if args.quality > 100:
        parser.error(f"argument --quality: must be <= 100, got {args.quality}")
    return run_main("synth", lambda: _run(args), log_folder=args.out)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest = synthesize(
        args.out,
        args.samples,
        classes=args.classes,
        size=args.size,
        domain=args.domain,
        seed=args.seed,
        quality=args.quality,
    )
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.samples} images ({args.classes} classes, {args.size}px, domain {args.domain}) "
        f"in {elapsed:.1f}s ({args.samples / max(elapsed, 1e-9):.0f} img/s); manifest: {manifest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
