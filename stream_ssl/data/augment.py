"""Two-part augmentation. Workers do decode + geometry per view on uint8 (cheap, PIL); the photometric part
(color jitter, grayscale, blur, solarize, normalize) runs batched on the training device with per-sample
random parameters. Every random draw comes from an explicit generator seeded by (seed, step, rank), so a
resumed run sees exactly the augmentations an uninterrupted one would have.

Worker part (`decode_views`): the crop boxes of every view are drawn first, in the coordinates of the full
image (its size comes from the header), and only then is the image decoded: a JPEG is decoded at the coarsest
DCT scale (1/2, 1/4, 1/8) at which every view's crop still has at least as many pixels as that view's output,
so draft mode never costs resolution, and the random draws do not depend on the decode scale.

Device part (`photometric(x, spec, g)` = `sample_params` + `photometric_with`), uint8 (N, 3, H, W) in,
normalized float out, in the order of the torchvision SSL recipes: color jitter (p), grayscale (p), Gaussian
blur (p), solarize (p), normalize. `apply_photometric` is the reference on [0, 1] floats (also what the DALI
graph computes); `photometric_with` computes the same in normalized space with fewer passes (see there).
Parameter distributions are torchvision's: brightness/contrast/saturation factors uniform in
[max(0, 1 - x), 1 + x], hue uniform in [-h, h], the four jitter operations in a uniformly random order per
sample, blur sigma uniform in `blur_sigma`, kernel `blur_kernel` (default ~10% of the side, odd).

Color jitter modes (`ViewSpec.jitter`):
- "fused" (default): the four operations in their drawn order composed into one affine color map per sample,
  `y = A x + P mean_rgb(x)` (3x3 A and P; the contrast term blends with the mean luma of the image as it is
  at that point of the order), applied in one pass and clamped to [0, 1] once. Brightness, contrast and
  saturation are exactly torchvision's operations; hue is a rotation of RGB space about the gray axis by
  2 pi h (it keeps gray, and maps red -> green -> blue at h = 1/3 as the HSV hue shift does) instead of
  torchvision's HSV shift: mean |difference| ~0.05 (max ~0.25) on [0, 1] for |h| <= 0.1 (see
  tests/stream_ssl/data/test_photometric.py). Intermediate clamps are dropped (torchvision clamps after each operation).
- "exact": torchvision's ColorJitter operation by operation in the drawn order, each clamped, with the
  exact HSV hue shift. Slower (a few extra passes); matches torchvision.transforms.v2.functional to ~1e-6.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stream_ssl.data import batch_memory

MAX_DECODE_PIXELS = 64 * 1024 * 1024  # refuse larger images (decompression bombs)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
JITTER_MODES = ("fused", "exact")
CPU_CHUNK_PIXELS = 8 * 224 * 224  # pixels per view processed together by `photometric_with` on the CPU
BLUR_TAIL = 1e-6  # weight of the outer Gaussian taps a blur may skip (see gaussian_blur)
# jitter operations, in the index order used by `PhotometricParams.order`
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


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
    blur_kernel: int = 0  # odd kernel side; 0: ~10% of the view side (23 at 224, as in SimCLR/BYOL)
    solarize_threshold: float = 0.5  # on [0, 1]: pixels >= threshold are inverted (128/255 on uint8)
    jitter: str = "fused"  # "fused" (one affine color map per sample) or "exact" (torchvision op by op)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"view size must be >= 1, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"bad crop scale {self.scale} or ratio {self.ratio}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("jitter strengths must be >= 0 and hue in [0, 0.5]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"bad blur sigma range {self.blur_sigma}")
        if self.blur_kernel and (self.blur_kernel < 1 or self.blur_kernel % 2 == 0):
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        if self.jitter not in JITTER_MODES:
            raise ValueError(f"jitter must be one of {JITTER_MODES}, got {self.jitter!r}")

    def kernel_size(self) -> int:
        return self.blur_kernel or blur_kernel_size(self.size)


def blur_kernel_size(side: int) -> int:
    """~10% of the side, odd, at least 3 (23 at 224)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


# ----------------------------------------------------------------------------------------------------------
# View recipes. Each returns the list of ViewSpecs of one method; `blur=None` blurs from 96 px up only
# (on small images blur destroys the signal: the CIFAR-style recipes drop it).


def _blur_on(size: int, blur: bool | None) -> bool:
    return size >= 96 if blur is None else blur


def simclr_views(size: int, blur: bool | None = None, color_strength: float | None = None,
                 min_scale: float = 0.08) -> list[ViewSpec]:
    """SimCLR: two identical views; jitter (0.8s, 0.8s, 0.8s, 0.2s) p=0.8, gray 0.2, blur p=0.5.
    Color strength s is 1.0 from 96 px up, 0.5 below (the CIFAR recipe)."""
    s = color_strength if color_strength is not None else (1.0 if size >= 96 else 0.5)
    spec = ViewSpec(size=size, scale=(min_scale, 1.0), brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s,
                    hue=min(0.5, 0.2 * s), blur_p=0.5 if _blur_on(size, blur) else 0.0)
    return [spec, spec]


def byol_views(size: int, blur: bool | None = None, min_scale: float = 0.08) -> list[ViewSpec]:
    """BYOL (also MoCo v3, Barlow Twins, VICReg): jitter (0.4, 0.4, 0.2, 0.1) p=0.8, gray 0.2; view 1 always
    blurred, never solarized; view 2 blurred 10%, solarized 20%."""
    blur = _blur_on(size, blur)
    common = dict(size=size, scale=(min_scale, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    return [ViewSpec(**common, blur_p=1.0 if blur else 0.0, solarize_p=0.0),
            ViewSpec(**common, blur_p=0.1 if blur else 0.0, solarize_p=0.2)]


mocov3_views = byol_views


def multicrop_views(global_size: int, local_size: int, n_local: int, global_scale=(0.4, 1.0),
                    local_scale=(0.05, 0.4), style: str = "dino", blur: bool | None = None) -> list[ViewSpec]:
    """2 global + n local crops.

    style "dino": jitter (0.4, 0.4, 0.2, 0.1) p=0.8, gray 0.2; global 1 blur 1.0; global 2 blur 0.1 +
    solarize 0.2; locals blur 0.5. style "swav": jitter (0.8, 0.8, 0.8, 0.2) p=0.8, gray 0.2, blur 0.5 on
    every crop, no solarize. Whether to blur is decided from the global size."""
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    on = _blur_on(global_size, blur)
    if style == "dino":
        common = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        g1 = ViewSpec(size=global_size, scale=tuple(global_scale), blur_p=1.0 if on else 0.0, **common)
        g2 = ViewSpec(size=global_size, scale=tuple(global_scale), blur_p=0.1 if on else 0.0, solarize_p=0.2,
                      **common)
        local = ViewSpec(size=local_size, scale=tuple(local_scale), blur_p=0.5 if on else 0.0, **common)
    elif style == "swav":
        common = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5 if on else 0.0)
        g1 = g2 = ViewSpec(size=global_size, scale=tuple(global_scale), **common)
        local = ViewSpec(size=local_size, scale=tuple(local_scale), **common)
    else:
        raise ValueError(f"unknown multi-crop style {style!r}; choose dino or swav")
    return [g1, g2] + [local] * n_local


def dino_views(global_size: int, local_size: int, n_local: int = 8, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4), blur: bool | None = None) -> list[ViewSpec]:
    return multicrop_views(global_size, local_size, n_local, global_scale, local_scale, "dino", blur)


def swav_views(global_size: int, local_size: int, n_local: int = 6, global_scale=(0.14, 1.0),
               local_scale=(0.05, 0.14), blur: bool | None = None) -> list[ViewSpec]:
    return multicrop_views(global_size, local_size, n_local, global_scale, local_scale, "swav", blur)


# ----------------------------------------------------------------------------------------------------------
# Worker part: decode + geometry on uint8.


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if w < 1 or h < 1 or w * h > MAX_DECODE_PIXELS:
        raise ValueError(f"image size {w}x{h} outside what we decode (max {MAX_DECODE_PIXELS} pixels)")
    return im


def _draft(im: Image.Image, factor: int) -> int:
    """Ask the JPEG decoder for a 1/factor DCT-scaled decode; returns the factor granted (1 if none)."""
    if factor < 2 or im.format != "JPEG":
        return 1
    w, h = im.size
    # PIL grants the largest a in (8, 4, 2, 1) with a <= min(w // rw, h // rh): with rw = w // factor that is
    # exactly `factor` (asking for ceil(w / factor) would often grant less).
    granted = im.draft("RGB", (max(1, w // factor), max(1, h // factor)))
    return 1 if granted is None else max(1, round(w / granted[1][2]))


def _rgb(im: Image.Image) -> Image.Image:
    """Decode; convert to RGB only when needed (convert() of an RGB image is a full copy)."""
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode an image to RGB. With `min_side`, JPEG draft mode decodes at a reduced scale that still keeps
    the shorter side >= min_side (right for resizing the whole image, e.g. `center_view`; for random
    resized crops use `decode_views`, which keeps the resolution every crop needs)."""
    im = _open(data)
    if min_side:
        w, h = im.size
        factor = 1
        while factor < 8 and min(w, h) // (2 * factor) >= min_side:
            factor *= 2
        _draft(im, factor)
    return _rgb(im)


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


@dataclass(frozen=True)
class Geometry:
    """The geometric draw of one view of one image, in the coordinates of the full-size image."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    flip: bool


def draw_geometry(w: int, h: int, specs: Sequence[ViewSpec], rng: np.random.Generator) -> list[Geometry]:
    """Crop box and flip of every view (box then flip, view by view: the order `crop_view` draws in)."""
    out = []
    for spec in specs:
        box = random_resized_crop_box(w, h, spec.scale, spec.ratio, rng)
        out.append(Geometry(box, bool(rng.random() < spec.flip_p)))
    return out


def draft_factor(geometry: Sequence[Geometry], specs: Sequence[ViewSpec]) -> int:
    """Coarsest DCT scale (1, 2, 4 or 8) at which every crop keeps >= its output size in pixels per side."""
    need = min(min(g.box[2] - g.box[0], g.box[3] - g.box[1]) / s.size for g, s in zip(geometry, specs))
    factor = 1
    while factor < 8 and 2 * factor <= need:
        factor *= 2
    return factor


def render_view(im: Image.Image, geometry: Geometry, size: int, factor: int = 1) -> np.ndarray:
    """Crop `geometry.box` (full-image coordinates; `im` decoded at 1/factor), resize to size x size
    (bilinear, antialiased), flip: uint8 HxWx3."""
    box = geometry.box if factor == 1 else tuple(c / factor for c in geometry.box)
    out = im.resize((size, size), Image.BILINEAR, box=box)
    if geometry.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def decode_views(data: bytes, specs: Sequence[ViewSpec], rng: np.random.Generator) -> list[np.ndarray]:
    """The geometric views of one encoded image: uint8 HxWx3 arrays, one per spec.

    Boxes and flips are drawn from the header size before decoding, then a JPEG is decoded at the coarsest
    DCT scale that keeps every crop at least as large as its output (`draft_factor`). Raises OSError /
    ValueError / SyntaxError on undecodable data, like PIL."""
    im = _open(data)
    geometry = draw_geometry(im.width, im.height, specs, rng)
    factor = _draft(im, draft_factor(geometry, specs)) if specs else 1
    im = _rgb(im)
    return [render_view(im, g, s.size, factor) for g, s in zip(geometry, specs)]


def crop_view(im: Image.Image, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    """One geometric view of a decoded full-size image as a uint8 HxWx3 array."""
    (g,) = draw_geometry(im.width, im.height, [spec], rng)
    return render_view(im, g, spec.size)


def center_view(im: Image.Image, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Evaluation view, the standard ImageNet one (torchvision's and timm's default): resize the shorter side to
    floor(size / crop_fraction) (bilinear, antialiased), then center crop size x size (224 from 256 at the default
    0.875; crop_fraction 1 resizes the shorter side to `size`). Done as one resize of the crop's source box, which
    gives the pixels of the resize-then-crop (same scale and sample positions)."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    w, h = im.size
    short = max(size, math.floor(size / crop_fraction))
    rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # torchvision's Resize(int)
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))  # torchvision's CenterCrop
    sx, sy = w / rw, h / rh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)


def to_chw(batch: list[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 arrays -> one contiguous uint8 (N, 3, H, W) tensor (one strided copy per image)."""
    if not batch:
        raise ValueError("empty batch")
    out = np.empty((len(batch), 3, *batch[0].shape[:2]), dtype=np.uint8)
    for i, a in enumerate(batch):
        out[i] = a.transpose(2, 0, 1)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------------------
# Device part: per-sample parameters, then batched operations.


@dataclass
class PhotometricParams:
    """Per-sample photometric draws of one view (tensors of length n, on the device)."""

    jitter: torch.Tensor  # bool: color jitter applied (where not, the factors below are the identity)
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # in turns, [-hue, hue]
    order: torch.Tensor  # int64 (n, 4): a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE)
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor
    solarize: torch.Tensor  # bool

    def __len__(self) -> int:
        return self.jitter.shape[0]

    def select(self, idx) -> PhotometricParams:
        return PhotometricParams(**{k: v[idx] for k, v in vars(self).items()})

    def cpu(self) -> PhotometricParams:
        return PhotometricParams(**{k: v.cpu() for k, v in vars(self).items()})


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def sample_params(spec: ViewSpec, n: int, g: torch.Generator, device=None) -> PhotometricParams:
    """Draw the photometric parameters of n samples. The number of draws does not depend on the
    probabilities, so changing one setting does not shift the others' random streams."""
    device = g.device if device is None else device
    jitter = torch.rand(n, generator=g, device=device) < spec.jitter_p
    b = _uniform(n, max(0.0, 1 - spec.brightness), 1 + spec.brightness, g, device)
    c = _uniform(n, max(0.0, 1 - spec.contrast), 1 + spec.contrast, g, device)
    s = _uniform(n, max(0.0, 1 - spec.saturation), 1 + spec.saturation, g, device)
    h = _uniform(n, -spec.hue, spec.hue, g, device)
    order = torch.rand(n, 4, generator=g, device=device).argsort(dim=1)
    gray = torch.rand(n, generator=g, device=device) < spec.gray_p
    blur = torch.rand(n, generator=g, device=device) < spec.blur_p
    sigma = _uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], g, device)
    solarize = torch.rand(n, generator=g, device=device) < spec.solarize_p
    one = torch.ones((), device=device)
    return PhotometricParams(jitter, torch.where(jitter, b, one), torch.where(jitter, c, one),
                             torch.where(jitter, s, one), torch.where(jitter, h, 0 * one), order, gray, blur,
                             sigma, solarize)


def _gray_weights(device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(GRAY_WEIGHTS, device=device, dtype=dtype)


def saturation_matrix(s: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3): blend with the luma gray, s I + (1 - s) 1 w^T (torchvision's adjust_saturation)."""
    n, dev = s.shape[0], s.device
    w = _gray_weights(dev, s.dtype)
    eye = torch.eye(3, device=dev, dtype=s.dtype)
    return s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * w.view(1, 1, 3).expand(n, 3, 3)


def hue_matrix(h: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3): rotation of RGB space about the gray axis by 2 pi h (Rodrigues). Exactly the identity at 0;
    at h = 1/3 it maps red to green, like the HSV hue shift it approximates."""
    n, dev = h.shape[0], h.device
    theta = 2 * math.pi * h.double()
    cos, sin = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
    k = 1 / math.sqrt(3)
    cross = torch.tensor([[0, -k, k], [k, 0, -k], [-k, k, 0]], device=dev, dtype=torch.float64)
    outer = torch.full((3, 3), 1 / 3, device=dev, dtype=torch.float64)
    eye = torch.eye(3, device=dev, dtype=torch.float64)
    return (cos * eye + sin * cross + (1 - cos) * outer).to(h.dtype)


def jitter_affine(p: PhotometricParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The color jitter of every sample as one affine map of its pixels: y = A x + P m, where m is the mean
    RGB of the sample's input image. Built by composing the four operations in each sample's drawn order
    (contrast blends with the mean luma of its own input, w^T (A + P) m at that point)."""
    n, dev = len(p), p.brightness.device
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    a = eye.clone()
    pm = torch.zeros(n, 3, 3, device=dev)
    w = _gray_weights(dev).view(1, 1, 3)
    ones_w = torch.ones(1, 3, 1, device=dev) * w  # 1 w^T
    mats = {SATURATION: saturation_matrix(p.saturation), HUE: hue_matrix(p.hue)}
    b, c = p.brightness.view(n, 1, 1), p.contrast.view(n, 1, 1)
    for pos in range(4):
        op = p.order[:, pos].view(n, 1, 1)
        a_b, pm_b = b * a, b * pm
        a_c, pm_c = c * a, c * pm + (1 - c) * (ones_w @ (a + pm))
        a_s, pm_s = mats[SATURATION] @ a, mats[SATURATION] @ pm
        a_h, pm_h = mats[HUE] @ a, mats[HUE] @ pm
        a = torch.where(op == BRIGHTNESS, a_b,
                        torch.where(op == CONTRAST, a_c, torch.where(op == SATURATION, a_s, a_h)))
        pm = torch.where(op == BRIGHTNESS, pm_b,
                         torch.where(op == CONTRAST, pm_c, torch.where(op == SATURATION, pm_s, pm_h)))
    return a, pm


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> luma replicated on 3 channels (torchvision's rgb_to_grayscale, 3 output channels)."""
    w = _gray_weights(x.device, x.dtype)
    return (w[0] * x[:, 0] + w[1] * x[:, 1] + w[2] * x[:, 2]).unsqueeze(1).expand_as(x)


def adjust_brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x * b.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    c = c.view(-1, 1, 1, 1)
    mean = grayscale(x)[:, :1].mean((2, 3), keepdim=True)
    return (c * x + (1 - c) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = s.view(-1, 1, 1, 1)
    return (s * x + (1 - s) * grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Exact HSV hue shift by h turns per sample (value and saturation kept), as torchvision's adjust_hue:
    each channel is max - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 hue') mod 6, n = 5, 3, 1."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue6 = torch.remainder(hue6 + 6 * h.view(-1, 1, 1), 6.0)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue6, 6.0)
        out.append(maxc - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, 1)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_kernels(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) normalized 1-D Gaussian kernels, sampled at integer offsets (torchvision's)."""
    r = torch.arange(k, device=sigma.device, dtype=torch.float32) - k // 2
    kern = torch.exp(-0.5 * (r.view(1, k) / sigma.view(-1, 1).float()) ** 2)
    return kern / kern.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int | None = None,
                  by_radius: bool | None = None, full: bool = False) -> torch.Tensor:
    """Blur each image with its own sigma: separable, reflect padding (torchvision's gaussian_blur).
    Kernel side `kernel` (odd), default ~10% of the image side; at most 2 x side - 1 (reflect padding).

    Outer taps that together weigh less than BLUR_TAIL are skipped (`blur_radii`), so the cost follows sigma:
    at k = 23 a sigma of 1 needs 11 taps, not 23, and the output moves by at most ~BLUR_TAIL x the largest
    |pixel| per pass. `by_radius` (default: on the CPU) blurs images in groups of equal radius; otherwise
    the whole batch is blurred at the largest radius in one go (fewer, larger kernel launches on a GPU).
    `full`: every tap of the kernel (no radius read back from the device)."""
    n, c, hgt, wid = x.shape
    k = kernel or blur_kernel_size(min(hgt, wid))
    k = min(k, 2 * min(hgt, wid) - 1)
    if k < 3 or n == 0:
        return x
    kern = gaussian_kernels(sigma, k).to(x.dtype)  # (n, k)
    r = k // 2
    if full:  # every tap, no data-dependent radius (no host synchronization)
        return _separable_blur(x, kern)
    radii = blur_radii(kern)
    by_radius = x.device.type == "cpu" if by_radius is None else by_radius
    groups = radii.unique().tolist() if by_radius else [int(radii.max())]
    if len(groups) == 1:
        return _separable_blur(x, kern[:, r - groups[0]: r + groups[0] + 1])
    out = torch.empty_like(x)
    for rad in groups:
        idx = (radii == rad).nonzero().flatten()
        out[idx] = _separable_blur(x[idx], kern[idx, r - rad: r + rad + 1])
    return out


def blur_radii(kern: torch.Tensor) -> torch.Tensor:
    """(n,) for (n, k) kernels: the smallest radius whose outer taps together weigh < BLUR_TAIL."""
    r = kern.shape[1] // 2
    side = kern[:, r + 1:] + kern[:, :r].flip(1)  # weight at offsets 1..r
    tail = side.flip(1).cumsum(1).flip(1)  # tail[:, j]: weight at offsets > j
    return (tail >= BLUR_TAIL).sum(1)


def _separable_blur(x: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
    """Blur by (n, k) per-image kernels: rows, then columns, each as k multiply-adds of shifted slices.
    Not a depthwise conv2d: on the CPU its cost hardly falls with k (k = 3 measured slower than k = 23), while
    this is linear in k. Reflect padding commutes with the row pass, so columns are padded after it."""
    n, c, hgt, wid = x.shape
    k = kern.shape[1]
    r = k // 2
    kern = kern.view(n, 1, 1, 1, k)
    if r == 0:
        return x * kern[..., 0]
    y = F.pad(x, (r, r, 0, 0), mode="reflect")
    rows = y[..., 0:wid] * kern[..., 0]
    for j in range(1, k):
        rows.addcmul_(y[..., j:j + wid], kern[..., j])
    y = F.pad(rows, (0, 0, r, r), mode="reflect")
    out = y[..., 0:hgt, :] * kern[..., 0]
    for j in range(1, k):
        out.addcmul_(y[..., j:j + hgt, :], kern[..., j])
    return out


def _on_subset(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """x with fn applied to the samples where mask is set (work only on those)."""
    if bool(mask.all()):
        return fn(x, slice(None)).contiguous()
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return x
    x = x.contiguous()
    x[idx] = fn(x[idx], idx)
    return x


def _exact_jitter(x: torch.Tensor, p: PhotometricParams) -> torch.Tensor:
    ops = {BRIGHTNESS: (adjust_brightness, p.brightness), CONTRAST: (adjust_contrast, p.contrast),
           SATURATION: (adjust_saturation, p.saturation), HUE: (adjust_hue, p.hue)}
    neutral = {BRIGHTNESS: p.brightness == 1, CONTRAST: p.contrast == 1, SATURATION: p.saturation == 1,
               HUE: p.hue == 0}  # skipped: exactly the identity (the HSV round trip is not)
    for pos in range(4):
        for op, (fn, factor) in ops.items():
            mask = p.jitter & (p.order[:, pos] == op) & ~neutral[op]
            x = _on_subset(x, mask, lambda v, i, fn=fn, f=factor: fn(v, f[i]))
    return x


def apply_photometric(x: torch.Tensor, p: PhotometricParams, spec: ViewSpec) -> torch.Tensor:
    """Float (n, 3, H, W) in [0, 1] -> jitter, grayscale, blur, solarize (not normalized). `x` may be
    overwritten."""
    n = x.shape[0]
    if n == 0:
        return x
    if bool(p.jitter.any()):
        if spec.jitter == "exact":
            x = _exact_jitter(x, p)
        else:
            a, pm = jitter_affine(p)
            t = pm @ x.mean((2, 3)).unsqueeze(2)  # (n, 3, 1)
            hw = x.shape[2] * x.shape[3]
            x = torch.baddbmm(t, a.to(x.dtype), x.reshape(n, 3, hw)).view_as(x).clamp_(0, 1)
    x = _on_subset(x, p.gray, lambda v, i: grayscale(v))
    x = _on_subset(x, p.blur, lambda v, i: gaussian_blur(v, p.sigma[i], spec.kernel_size()))
    x = _on_subset(x, p.solarize, lambda v, i: solarize(v, spec.solarize_threshold))
    return x


def photometric(x: torch.Tensor, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalized float, with per-sample random jitter/gray/blur/solarize drawn from g."""
    return photometric_with(x, sample_params(spec, x.shape[0], g, x.device), spec)


def photometric_with(x: torch.Tensor, p: PhotometricParams, spec: ViewSpec, chunk: int | None = None,
                     sync_free: bool | None = None) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalized float: `normalize(apply_photometric(x / 255, p, spec))`, computed in
    normalized space with fewer passes over the batch (fused mode): the 1/255 scaling and the normalization
    are folded into the per-sample color matrix, the clamp uses per-channel bounds, and grayscale and
    solarize use per-channel constants (blur commutes with the per-channel affine normalization).

    `chunk`: samples processed together (default on the CPU: as many as hold CPU_CHUNK_PIXELS, 8 views at
    224 px or 43 at 96 px, so temporaries stay in cache and per-call overhead stays small; the whole batch
    on an accelerator). On the CPU the output lives in memory reused from an earlier batch that nothing
    refers to any more (`batch_memory`). `sync_free` (default: on accelerators) avoids every host
    synchronization: masked steps run on the whole batch and are selected with `where`, blur uses all taps."""
    n, dev = x.shape[0], x.device
    sync_free = dev.type != "cpu" if sync_free is None else sync_free
    if spec.jitter == "exact" or n == 0:
        return normalize(apply_photometric(x / 255.0, p, spec), inplace=True)
    chunk = chunk or (max(1, CPU_CHUNK_PIXELS // (x.shape[2] * x.shape[3])) if dev.type == "cpu" else n)
    mean = torch.tensor(IMAGENET_MEAN, device=dev)
    std = torch.tensor(IMAGENET_STD, device=dev)
    a, pm = jitter_affine(p)  # the identity where not jittered
    scale = (1.0 / (255.0 * std)).view(1, 3, 1)
    a, pm = scale * a, scale * pm
    shift = (mean / std).view(1, 3, 1)
    lo, hi = (-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    w = _gray_weights(dev)
    thr = ((spec.solarize_threshold - mean) / std).view(1, 3, 1, 1)
    flipped = ((1 - 2 * mean) / std).view(1, 3, 1, 1)
    out = batch_memory.empty(tuple(x.shape)) if dev.type == "cpu" else torch.empty(x.shape, device=dev)
    for i in range(0, n, chunk):
        part = slice(i, min(n, i + chunk))
        xf, y, q = x[part].float(), out[part], p.select(part)
        m = xf.shape[0]
        torch.baddbmm(pm[part] @ xf.mean((2, 3)).unsqueeze(2) - shift, a[part], xf.view(m, 3, -1),
                      out=y.view(m, 3, -1))
        if sync_free or bool(q.jitter.any()):
            torch.maximum(y, lo, out=y)
            torch.minimum(y, hi, out=y)
        _subset_(y, q.gray, lambda v, j: _gray_normalized(v, w, mean, std), sync_free)
        _subset_(y, q.blur, lambda v, j, q=q: gaussian_blur(v, q.sigma[j], spec.kernel_size(), full=sync_free),
                 sync_free)
        _subset_(y, q.solarize, lambda v, j: torch.where(v >= thr, flipped - v, v), sync_free)
    return out


def _subset_(y: torch.Tensor, mask: torch.Tensor, fn, sync_free: bool = False) -> None:
    """In place: y[mask] = fn(y[mask], indices): only the masked samples are computed, or (`sync_free`) the
    whole batch, selected with `where`, with no host synchronization (on a GPU a `nonzero` stops the queue of
    kernels at every call)."""
    if sync_free:
        torch.where(mask.view(-1, 1, 1, 1), fn(y, slice(None)), y, out=y)
        return
    idx = mask.nonzero().flatten()
    if idx.numel() == mask.numel():
        y.copy_(fn(y, slice(None)))
    elif idx.numel():
        y[idx] = fn(y[idx], idx)


def _gray_normalized(v: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Grayscale of normalized images, normalized: luma of the de-normalized pixels, normalized again."""
    ws = w * std
    luma = ws[0] * v[:, 0] + ws[1] * v[:, 1] + ws[2] * v[:, 2] + float((w * mean).sum())
    return (luma.unsqueeze(1) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def device_views(views: Sequence[torch.Tensor], specs: Sequence[ViewSpec], g: torch.Generator,
                 device) -> list[torch.Tensor]:
    """The trainer's device step for either loader: uint8 views (PIL loader) get `photometric`; float views
    (the DALI loader: already augmented and normalized) are only moved to `device`."""
    out = []
    for v, spec in zip(views, specs):
        v = v.to(device, non_blocking=True)
        out.append(v if v.is_floating_point() else photometric(v, spec, g))
    return out


def normalize(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    if inplace:
        return x.sub_(mean).div_(std)
    return (x - mean) / std
