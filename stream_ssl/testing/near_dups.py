"""Photo-like image sets with planted near-duplicates and planted downstream leakage, with their ground truth.

A base image is a random photo-like scene: a colour field with a 1/f amplitude spectrum (the spectrum of
natural images), a few soft-edged objects with gradients, and fine grain, at a random size and aspect. A
variant of a base is one of `VARIANTS`: a re-encode at low JPEG quality, a resize (down to 45-80%), a crop
(2-6% off each side), a colour change (brightness, contrast, saturation, hue), or a mix of them. Different
bases are independent draws, so any two of them are different images.

`planted_sets` packs a pool (bases, some with 1-2 extra variants: planted near-duplicate groups) and a
downstream set (other bases, some of which have a variant hidden in the pool: planted leakage). Keys end
with `o<origin>v<variant>`, the ground truth.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from shard_tools.pack import pack

VARIANTS = ("reencode", "resize", "crop", "colour", "mixed")


def photo(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A random photo-like RGB scene, 96-256 px per side (or `size`, (w, h))."""
    rng = np.random.default_rng([seed, 0xD0])
    w, h = size or (int(v) for v in rng.integers(96, 257, size=2))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(w, h)) ** 1.1
    channels = []
    for _ in range(3):
        spec = amp * np.exp(2j * np.pi * rng.random(amp.shape))
        c = np.fft.irfft2(spec, s=(h, w))
        channels.append((c - c.mean()) / (c.std() + 1e-9))
    mix = rng.normal(size=(3, 3)) * 0.35 + np.eye(3)  # correlated channels, like real colours
    field = np.tensordot(mix, np.stack(channels), axes=1)
    img = np.clip(128 + 40 * field + rng.normal(0, 40, size=(3, 1, 1)), 0, 255).transpose(1, 2, 0)
    im = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        x1, y1 = x0 + rng.integers(8, max(9, w // 2)), y0 + rng.integers(8, max(9, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    grain = rng.normal(0, rng.uniform(2, 8), size=(h, w, 1))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    left, top, right, bottom = (float(v) for v in rng.uniform(0.02, 0.06, size=4))
    return im.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


def _colour(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-12, 13))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _resize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    s = rng.uniform(0.45, 0.8)
    return im.resize((max(16, round(im.width * s)), max(16, round(im.height * s))), Image.BICUBIC)


def variant(im: Image.Image, kind: str, seed: int) -> bytes:
    """JPEG bytes of one near-duplicate of `im`."""
    rng = np.random.default_rng([seed, 0xD1])
    if kind == "reencode":
        return jpeg(im, int(rng.integers(30, 61)))
    if kind == "resize":
        return jpeg(_resize(im, rng), int(rng.integers(70, 91)))
    if kind == "crop":
        return jpeg(_crop(im, rng), 90)
    if kind == "colour":
        return jpeg(_colour(im, rng), 90)
    if kind == "mixed":
        return jpeg(_colour(_resize(_crop(im, rng), rng), rng), int(rng.integers(50, 81)))
    raise ValueError(kind)


@dataclass
class Planted:
    pool: Path
    down: Path
    groups: list[set[str]]  # pool origins' ids with >= 2 pool images ("o12")
    leaked_origins: set[str]  # downstream origins with a variant in the pool
    pool_images: int
    down_images: int


def origin_of(key: str) -> str:
    return re.search(r"(o\d+)v\d+$", key).group(1)


def variant_of(key: str) -> str:
    return VARIANTS[int(re.search(r"v(\d+)$", key).group(1)) - 1] if not key.endswith("v0") else "original"


def _write(folder: Path, items: list[tuple[str, bytes]], name: str, shard_size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for ident, data in items:
        (folder / f"{ident}.jpg").write_bytes(data)
        rows.append([f"{ident}.jpg", ident])
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([["path", "id"], *rows])
    out = folder.parent / f"{name}_shards"
    pack(manifest, out, name=name, shard_size=shard_size, key_column="id", source="generated")
    return out


def planted_sets(root: Path, pool_bases: int = 120, down_bases: int = 60, copied: float = 0.25,
                 leaked: int = 12, seed: int = 0, shard_size: int = 50) -> Planted:
    """A pool of `pool_bases` distinct images of which a fraction `copied` get 1-2 extra variants, and `leaked`
    variants of downstream images; a downstream set of `down_bases` other images."""
    rng = np.random.default_rng([seed, 0xD2])
    pool, groups = [], []
    for o in range(pool_bases):
        im = photo(seed * 1_000_000 + o)
        pool.append((f"o{o}v0", jpeg(im)))
        if rng.random() < copied:
            kinds = rng.choice(len(VARIANTS), size=int(rng.integers(1, 3)), replace=False)
            pool += [(f"o{o}v{k + 1}", variant(im, VARIANTS[k], seed * 7919 + o * 5 + k)) for k in kinds]
            groups.append(f"o{o}")
    down, leaked_origins = [], set()
    for o in range(pool_bases, pool_bases + down_bases):
        im = photo(seed * 1_000_000 + o)
        down.append((f"o{o}v0", jpeg(im)))
        if len(leaked_origins) < leaked:
            k = int(rng.integers(len(VARIANTS)))
            pool.append((f"o{o}v{k + 1}", variant(im, VARIANTS[k], seed * 7919 + o * 5 + k)))
            leaked_origins.add(f"o{o}")
    pool_set = _write(root / "pool", pool, "pool", shard_size)
    down_set = _write(root / "down", down, "down", shard_size)
    return Planted(pool_set, down_set, groups, leaked_origins, len(pool), len(down))


def scores(report: dict, planted: Planted, pool_keys: list[str]) -> dict:
    """Pairwise precision/recall of the groups (pairs of pool images put together vs same origin) and
    per-image precision/recall of the leakage, from a dedup report."""
    origin = {k: origin_of(k) for k in pool_keys}
    true_pairs = set()
    by_origin: dict[str, list[str]] = {}
    for k, o in origin.items():
        by_origin.setdefault(o, []).append(k)
    for ks in by_origin.values():
        true_pairs |= {(a, b) for a in ks for b in ks if a < b}
    found = {(a, b) for g in report["groups"] for a in g for b in g if a < b}
    leaked_true = {k for k, o in origin.items() if o in planted.leaked_origins}
    leaked_found = {x["key"] for x in report["leaked"]}
    return {"group_precision": len(found & true_pairs) / max(len(found), 1),
            "group_recall": len(found & true_pairs) / max(len(true_pairs), 1),
            "leak_precision": len(leaked_found & leaked_true) / max(len(leaked_found), 1),
            "leak_recall": len(leaked_found & leaked_true) / max(len(leaked_true), 1),
            "true_pairs": len(true_pairs), "found_pairs": len(found), "true_leaked": len(leaked_true),
            "found_leaked": len(leaked_found)}
