"""Batches of encoded images with their random draws: what the GPU decoders (DALI, nvJPEG) get from the loader
workers.

Workers (an `EncodedDataset`, a `PlanDataset`) read the plan's samples, check every image cheaply
(`shard_tools.images.check_image`: header, pixel cap, JPEG end-of-image marker, PNG chunk CRCs, WebP size),
replace the ones that fail by another view of a good sample of the same batch (counted in `Batch.skipped`,
with the PIL loader's threshold), and draw the crop box and flip of every view from the header size
(`draw_geometry`, the same draws in the same order as the PIL loader's `decode_views`, so both decoders crop
the same boxes) and, for DALI, the photometric parameters.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from shard_tools.images import check_image
from stream_ssl.data.augment import MAX_DECODE_PIXELS, ViewSpec, draw_geometry, jitter_affine, sample_params
from stream_ssl.data.loader import Batch, PlanDataset
from stream_ssl.data.rng import batch_generator, batch_rng
from stream_ssl.data.streaming import image_bytes, sample_label

UNDECODABLE = (OSError, ValueError, SyntaxError)  # ImageError is a ValueError
GPU_DECODE_MAX_PIXELS = 16_000_000  # a GPU decoder gets images up to this size; larger ones are scaled down first


@dataclass
class ViewDraws:
    """The pipeline inputs of one view for a batch of n images (numpy, per sample along axis 0)."""

    roi_start: np.ndarray  # float32 (n, 2): top, left (full-image pixels)
    roi_end: np.ndarray  # float32 (n, 2): bottom, right
    flip: np.ndarray  # int32 (n,)
    # the photometric draws (DALI); None when the trainer draws them on the device (nvJPEG)
    a: np.ndarray | None = None  # float32 (n, 3, 3): color jitter matrix
    p: np.ndarray | None = None  # float32 (n, 3, 3): color jitter offset matrix (times the mean RGB)
    gray: np.ndarray | None = None  # bool (n,)
    blur: np.ndarray | None = None  # bool (n,)
    sigma: np.ndarray | None = None  # float32 (n,)
    solarize: np.ndarray | None = None  # bool (n,)

    def take(self, idx) -> ViewDraws:
        return ViewDraws(**{k: None if v is None else v[idx] for k, v in vars(self).items()})


def draw_views(sizes: list[tuple[int, int]], specs: list[ViewSpec], rng: np.random.Generator,
               g: torch.Generator | None) -> list[ViewDraws]:
    """Every view's draws for images of `sizes` (w, h): geometry image by image (the order `decode_views`
    draws in), then (unless `g` is None) the photometric parameters view by view (the order the trainer draws
    in)."""
    geometry = [draw_geometry(w, h, specs, rng) for w, h in sizes]
    out = []
    for v, spec in enumerate(specs):
        boxes = np.array([geo[v].box for geo in geometry], dtype=np.float32).reshape(-1, 4)
        draws = ViewDraws(roi_start=np.ascontiguousarray(boxes[:, [1, 0]]),
                          roi_end=np.ascontiguousarray(boxes[:, [3, 2]]),
                          flip=np.array([geo[v].flip for geo in geometry], dtype=np.int32))
        if g is not None:
            params = sample_params(spec, len(sizes), g, "cpu")
            a, pm = jitter_affine(params)
            draws.a, draws.p = a.numpy().astype(np.float32), pm.numpy().astype(np.float32)
            draws.gray, draws.blur = params.gray.numpy(), params.blur.numpy()
            draws.sigma, draws.solarize = params.sigma.numpy().astype(np.float32), params.solarize.numpy()
        out.append(draws)
    return out


def check_encoded(data: bytes) -> tuple[int, int]:
    """(width, height) of an image DALI can be fed, or ImageError/ValueError: header, pixel cap and the
    structural end checks of `shard_tools.images.check_image` (no pixel is decoded)."""
    checked = check_image(data, max_pixels=MAX_DECODE_PIXELS)
    return checked.width, checked.height


@dataclass
class EncodedBatch(Batch):
    """A batch before decoding: encoded images and every random draw (views stays empty)."""

    data: list[np.ndarray] = field(default_factory=list)  # uint8 encoded bytes per sample
    sizes: list[tuple[int, int]] = field(default_factory=list)
    draws: list[ViewDraws] = field(default_factory=list)  # one per view


def shrink(data: bytes, max_pixels: int) -> tuple[bytes, tuple[int, int]]:
    """An image as a JPEG of at most `max_pixels` (q95): decoded at the coarsest JPEG DCT scale that keeps at
    least the target size, then resized to it. (A GPU decoder's memory grows with the largest image it meets.)"""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    scale = math.sqrt(max_pixels / (im.width * im.height))
    target = (max(1, int(im.width * scale)), max(1, int(im.height * scale)))
    im.draft("RGB", target)
    im = im.convert("RGB").resize(target, Image.BILINEAR)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=95)
    return out.getvalue(), im.size


class EncodedDataset(PlanDataset):
    """The plan's batches of one rank as EncodedBatch: read, checked, drawn; not decoded. `photometric`:
    also draw the colour augmentation (DALI applies it; otherwise the trainer draws it on the device).
    `max_pixels`: larger images are scaled down to it here (crops are then drawn on the smaller image)."""

    photometric = True
    max_pixels: int | None = None

    def make_batch(self, step: int, samples: list[dict], micro: int = 0) -> EncodedBatch:
        datas, sizes, labels, keys, bad = [], [], [], [], 0
        for s in samples:
            try:
                if "__error__" in s:
                    raise ValueError(s["__error__"])
                data = image_bytes(s)
                size = check_encoded(data)
                if self.max_pixels and size[0] * size[1] > self.max_pixels:
                    data, size = shrink(data, self.max_pixels)
                sizes.append(size)
                datas.append(np.frombuffer(data, dtype=np.uint8))
                labels.append(sample_label(s))
                keys.append(s["__key__"])
            except UNDECODABLE as e:
                self._last_error = f"{s.get('__url__', '?')} {s.get('__key__', '?')}: {e}"
                bad += 1
        if not datas:
            raise RuntimeError(f"step {step}: no decodable image among {len(samples)} samples")
        # Keep the batch full: an undecodable sample becomes another view of a good one (fresh draws).
        for j in range(bad):
            k = j % len(keys)
            datas.append(datas[k])
            sizes.append(sizes[k])
            labels.append(labels[k])
            keys.append(keys[k])
        g = batch_generator(self.seed, step, self.rank, micro) if self.photometric else None
        draws = draw_views(sizes, self.views, batch_rng(self.seed, step, self.rank, micro), g)
        return EncodedBatch(step, [], torch.tensor(labels, dtype=torch.int64), keys, bad, micro=micro,
                            data=datas, sizes=sizes, draws=draws)
