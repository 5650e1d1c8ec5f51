"""Two-part augmentation. Workers do decode + geometry per view on uint8 (cheap, PIL); the photometric part
(color jitter, grayscale, blur, solarize, normalize) runs batched on the training device with per-sample
random parameters. Every random draw comes from an explicit generator seeded by (seed, step, rank), so a
resumed run sees exactly the augmentations an uninterrupted one would have.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MAX_DECODE_PIXELS = 64 * 1024 * 1024  # refuse larger images (decompression bombs)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: geometry (done in workers) and photometric settings (done on the device)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def decode_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode an image to RGB. With `min_side`, JPEG draft mode decodes at a reduced scale that still keeps
    the shorter side >= min_side (DCT scaling: much less work for large photos)."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if w * h > MAX_DECODE_PIXELS:
        raise ValueError(f"image too large to decode ({w}x{h})")
    if min_side and im.format == "JPEG":
        scale = min(w, h) / min_side
        if scale >= 2:
            im.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
    return im.convert("RGB")


def random_resized_crop_box(w: int, h: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Crop box (left, top, right, bottom) by the usual RandomResizedCrop rule: 10 tries, then center crop."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def crop_view(im: Image.Image, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    """One geometric view as a uint8 HxWx3 array."""
    box = random_resized_crop_box(im.width, im.height, spec.scale, spec.ratio, rng)
    out = im.resize((spec.size, spec.size), Image.BILINEAR, box=box)
    if rng.random() < spec.flip_p:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def center_view(im: Image.Image, size: int) -> np.ndarray:
    """Evaluation view: resize the shorter side to `size`, center crop."""
    w, h = im.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)


def to_chw(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def color_matrix(b: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 RGB matrices for brightness b, saturation s, hue rotation h (turns), fused into one.

    Hue is a rotation of the chroma plane of YIQ, which keeps luma; like saturation it leaves gray unchanged.
    """
    n, dev = b.shape[0], b.device
    w = torch.tensor(GRAY_WEIGHTS, device=dev)
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    sat = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * w.view(1, 1, 3).expand(n, 3, 3)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    theta = 2 * math.pi * h
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(n, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    hue = torch.linalg.inv(yiq) @ rot @ yiq
    return b.view(n, 1, 1) * (hue @ sat)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (kernel ~10% of the image side, as in SimCLR)."""
    n, c, hgt, wid = x.shape
    k = max(3, int(0.1 * min(hgt, wid)) // 2 * 2 + 1)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r.view(1, k) ** 2) / (2 * sigma.view(n, 1) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, k)
    y = x.reshape(1, n * c, hgt, wid)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def photometric(x: torch.Tensor, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalized float, with per-sample random jitter/gray/blur/solarize."""
    n, dev = x.shape[0], x.device
    x = x.float() / 255.0
    apply = torch.rand(n, generator=g, device=dev) < spec.jitter_p
    b = torch.where(apply, _uniform(n, 1 - spec.brightness, 1 + spec.brightness, g, dev), 1.0)
    c = torch.where(apply, _uniform(n, max(0.0, 1 - spec.contrast), 1 + spec.contrast, g, dev), 1.0)
    s = torch.where(apply, _uniform(n, max(0.0, 1 - spec.saturation), 1 + spec.saturation, g, dev), 1.0)
    h = torch.where(apply, _uniform(n, -spec.hue, spec.hue, g, dev), 0.0)
    if apply.any():
        # brightness, contrast, saturation, hue in that order, as one affine map per sample: contrast blends
        # with the gray mean of the brightened image; saturation and hue keep gray, so the blend commutes.
        w = torch.tensor(GRAY_WEIGHTS, device=dev).view(1, 3, 1, 1)
        mean = (x * w).sum(1).mean((1, 2)) * b
        m = color_matrix(c * b, s, h)
        x = torch.einsum("nij,njhw->nihw", m, x) + ((1 - c) * mean).view(n, 1, 1, 1)
        x = x.clamp(0, 1)
    gray = torch.rand(n, generator=g, device=dev) < spec.gray_p
    if gray.any():
        w = torch.tensor(GRAY_WEIGHTS, device=dev).view(1, 3, 1, 1)
        x = torch.where(gray.view(n, 1, 1, 1), (x * w).sum(1, keepdim=True).expand_as(x), x)
    if spec.blur_p > 0:
        blur = torch.rand(n, generator=g, device=dev) < spec.blur_p
        sigma = _uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], g, dev)
        if blur.any():
            x = torch.where(blur.view(n, 1, 1, 1), gaussian_blur(x, sigma), x)
    if spec.solarize_p > 0:
        sol = torch.rand(n, generator=g, device=dev) < spec.solarize_p
        x = torch.where(sol.view(n, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
    return normalize(x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
