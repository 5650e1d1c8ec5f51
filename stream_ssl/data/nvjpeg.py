"""GPU JPEG decoding without DALI (`--decoder nvjpeg`): torchvision's nvJPEG decoder fed by the planned stream.

    loader = make_nvjpeg_loader(plan, rank, views, start_step, num_workers, device="cuda:0", seed=seed)
    for batch in loader:         # loader.Batch; batch.views: uint8 (B, 3, S, S) on the device, geometry done
        x = device_views(batch.views, views, g, device)   # the photometric part, as for --decoder pil

Who does what:
- DataLoader workers (`NvjpegDataset`, an `EncodedDataset`) read the plan's samples, check every image cheaply,
  replace the ones that fail (counted), and draw the crop box and flip of every view from the header size:
  the same draws, in the same order, as the PIL loader's `decode_views`, so both decoders crop the same boxes
  from every image they can both read. Raw bytes and boxes travel to the training process.
- The training process decodes a batch's JPEGs in one call of `torchvision.io.decode_jpeg(..., device=cuda)`
  (nvJPEG), cuts and resizes every view on the device (`roi_align` with adaptive sampling: a box-filtered
  bilinear resize, one call per image size), flips, and hands uint8 views to the photometric step the PIL
  path uses. Samples that are not JPEG, or that nvJPEG refuses, are decoded on the CPU (PIL) and counted
  (`NvjpegStats.cpu_decoded`); a sample no decoder reads is replaced by another of its batch and counted as
  skipped, with the PIL loader's threshold.
Without CUDA the same path runs with torchvision's CPU decoder (how the tests run it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from stream_ssl.data.augment import ViewSpec, decode_rgb
from stream_ssl.data.encoded import GPU_DECODE_MAX_PIXELS, UNDECODABLE, EncodedBatch, EncodedDataset, ViewDraws
from stream_ssl.data.loader import Batch
from stream_ssl.data.plan import Plan
from stream_ssl.data.streaming import StreamingDataLoader, TooManySkipped

JPEG_SOI = b"\xff\xd8\xff"


@dataclass
class NvjpegStats:
    batches: int = 0
    images: int = 0
    cpu_decoded: int = 0  # not JPEG, or refused by nvJPEG: decoded by PIL on the CPU
    replaced: int = 0  # no decoder could read it: replaced by another sample of its batch


class NvjpegDataset(EncodedDataset):
    """Encoded batches with their crop draws; the colour draws are the trainer's (on the device). Images over
    GPU_DECODE_MAX_PIXELS are scaled down here, so one huge image cannot take the GPU's memory."""

    photometric = False
    max_pixels = GPU_DECODE_MAX_PIXELS


def decode_images(datas: list[np.ndarray], device: torch.device, stats: NvjpegStats) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) on `device` for each encoded image; None where no decoder reads it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(datas)
    jpeg = [i for i, d in enumerate(datas) if d[:3].tobytes() == JPEG_SOI]
    if jpeg:
        inputs = [torch.from_numpy(datas[i] if datas[i].flags.writeable else datas[i].copy()) for i in jpeg]
        with warnings.catch_warnings():  # torchvision >= 0.29 points at TorchCodec; its decoder is what we use
            warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
            try:
                images = decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad image fails the batched call: decode one by one to find it
                images = [_one_jpeg(x, device) for x in inputs]
        for i, im in zip(jpeg, images):
            out[i] = im
    for i, im in enumerate(out):
        if im is None:
            out[i] = _cpu_decode(datas[i], device)
            stats.cpu_decoded += out[i] is not None
    return out


def _one_jpeg(x: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(x, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _cpu_decode(data: np.ndarray, device: torch.device) -> torch.Tensor | None:
    try:
        rgb = np.asarray(decode_rgb(data.tobytes()))
    except UNDECODABLE:
        return None
    rgb = rgb if rgb.flags.writeable else rgb.copy()  # PIL's arrays are read-only; torch wants to own writable memory
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(device)


def crop_resize(images: list[torch.Tensor], draws: ViewDraws, size: int, rows: list[int]) -> torch.Tensor:
    """uint8 (len(rows), 3, size, size): view `draws` of images[i] for i in rows: the box cut and resized
    (bilinear, averaging ceil(box / size) samples per output pixel, like an antialiased resize), flipped where
    drawn. One `roi_align` per image size."""
    from torchvision.ops import roi_align

    device = images[rows[0]].device
    out = torch.empty(len(rows), 3, size, size, dtype=torch.uint8, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, i in enumerate(rows):
        groups.setdefault(tuple(images[i].shape[1:]), []).append(j)
    boxes = np.concatenate([draws.roi_start[:, ::-1], draws.roi_end[:, ::-1]], axis=1)  # left, top, right, bottom
    for js in groups.values():
        stack = torch.stack([images[rows[j]] for j in js]).float()
        b = torch.from_numpy(np.concatenate([np.arange(len(js))[:, None], boxes[[rows[j] for j in js]]], axis=1))
        y = roi_align(stack, b.to(device=device, dtype=torch.float32), (size, size), sampling_ratio=-1, aligned=True)
        flip = torch.from_numpy(draws.flip[[rows[j] for j in js]].astype(bool)).to(device)
        y = torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)
        out[js] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


class NvjpegLoader:
    """The batches of one rank, decoded on `device` (cuda, or cpu in tests); views are uint8 on the device."""

    def __init__(self, plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0, num_workers: int = 0,
                 storage_options: dict | None = None, seed: int = 0, device: torch.device | str = "cpu",
                 prefetch: int = 2, skip_fraction: float = 0.01, skip_grace: int = 32, **dataset_options):

        self.dataset = NvjpegDataset(plan, rank, views, start_step, storage_options, seed,
                                     skip_fraction=skip_fraction, skip_grace=skip_grace, **dataset_options)
        self.loader = StreamingDataLoader(self.dataset, num_workers=num_workers, prefetch_factor=prefetch)
        self.views, self.rank, self.device = views, rank, torch.device(device)
        self.skip_fraction, self.skip_grace = skip_fraction, skip_grace
        self.stats = NvjpegStats()

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        for enc in self.loader:
            yield self.decode(enc)

    def decode(self, enc: EncodedBatch) -> Batch:
        images = decode_images(enc.data, self.device, self.stats)
        good = [i for i, im in enumerate(images) if im is not None]
        if not good:
            raise RuntimeError(f"step {enc.step}: no decodable image among {len(images)} samples")
        views = [crop_resize(images, d, spec.size, good) for d, spec in zip(enc.draws, self.views)]
        bad = len(images) - len(good)
        keys, labels = enc.keys, enc.labels
        if bad:  # keep the batch full: a sample nothing decodes becomes another of the batch (listed twice)
            extra = [j % len(good) for j in range(bad)]  # rows of `views`
            views = [torch.cat([v, v[extra]]) for v in views]
            order = good + [good[j] for j in extra]
            keys, labels = [enc.keys[i] for i in order], enc.labels[order]
        self._count(len(images), bad)
        return Batch(enc.step, views, labels, keys, enc.skipped + bad, enc.io, enc.worker, enc.micro)

    def _count(self, images: int, bad: int) -> None:
        s = self.stats
        s.batches, s.images, s.replaced = s.batches + 1, s.images + images, s.replaced + bad
        if s.replaced > self.skip_grace + self.skip_fraction * s.images:
            raise TooManySkipped(f"rank {self.rank}: {s.replaced} of {s.images} samples could not be decoded "
                                 f"(threshold {self.skip_grace} + {self.skip_fraction:.1%})")


def make_nvjpeg_loader(plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0, num_workers: int = 0,
                       **options) -> NvjpegLoader:
    return NvjpegLoader(plan, rank, views, start_step, num_workers, **options)
