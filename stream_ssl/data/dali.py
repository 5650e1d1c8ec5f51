"""DALI decoding and augmentation (`--decoder dali`): our plan and reader feed encoded bytes to a DALI pipeline
through `fn.external_source`, so the plan, resume and S3 streaming stay ours.

    loader = make_dali_loader(plan, rank, views, start_step, num_workers, seed=seed, device_id=0)
    for batch in loader:          # stream_ssl.data.loader.Batch; batch.views: normalized float (B, 3, S, S)
        ...                       # on cuda:device_id (device_id=None: CPU-only pipeline, CPU tensors)

Who does what:
- DataLoader workers (a `PlanDataset` subclass) read the plan's samples, check every image cheaply
  (`shard_tools.images.check_image`: header, pixel cap, JPEG end-of-image marker, PNG chunk CRCs, WebP size),
  replace the ones that fail by another view of a good sample of the same batch (counted in
  `Batch.skipped`, with the PIL loader's threshold), and draw every random parameter: crop box and flip per
  view (`draw_geometry`, from the header size) and the photometric parameters (`sample_params`), turned
  into the per-sample 3x3 matrices of the fused color jitter (`jitter_affine`).
- The DALI graph, per view: decode once (`device='mixed'`, nvJPEG, with a GPU; 'cpu' with device_id=None),
  `fn.resize` of the crop box (region of interest) to S x S, color jitter as `fn.coord_transform` with the
  per-sample matrices (y = A x + P mean(x)), clamp, grayscale / Gaussian blur / solarize under per-sample
  conditionals, then `fn.crop_mirror_normalize` (flip, ImageNet normalization, CHW float). The same graph
  runs on the CPU and the GPU; it computes what `augment.apply_photometric` computes (fused mode) for the
  same draws, up to resampling differences.
- A decode error that the check missed does not abort the run: the batch is retried with the samples PIL
  cannot decode replaced (counted), and a batch DALI still refuses is augmented by the PIL/torch path
  (`decode_views` + `photometric`), counted in `DaliStats.pil_batches`.

Determinism: every random draw comes from (seed, step, rank) in the workers (numpy for geometry, a torch
generator for photometric draws); the pipeline's own RNG (seeded by (seed, rank)) is not used. So a resumed
run gets exactly the crops, flips and color parameters an uninterrupted one would, on any number of workers.
Pixels are reproducible on the same hardware and DALI version; they differ slightly between the CPU and
GPU backends, between nvJPEG's hardware and CUDA decoders, and from the PIL path (resampling filters).

DALI is optional: `pip install nvidia-dali-cuda130` (or `-cuda120`, `-cuda110` to match your CUDA; the
`nvidia-dali` name itself is a placeholder). It is imported only when this path is used.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from shard_tools.images import ImageError, check_image
from stream_ssl.data.augment import (
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_DECODE_PIXELS,
    ViewSpec,
    decode_views,
    draw_geometry,
    photometric,
    to_chw,
)
from stream_ssl.data.encoded import GPU_DECODE_MAX_PIXELS, UNDECODABLE, EncodedBatch, EncodedDataset, ViewDraws
from stream_ssl.data.loader import Batch
from stream_ssl.data.plan import Plan
from stream_ssl.data.rng import FALLBACK, REPLACEMENT, batch_generator, batch_rng
from stream_ssl.data.streaming import StreamingDataLoader, TooManySkipped

DALI_PACKAGES = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")


def require_dali():
    """Import DALI (nvidia.dali, nvidia.dali.fn, nvidia.dali.types, nvidia.dali.math), or explain how to
    install it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
    except ImportError as e:
        raise ImportError(
            "--decoder dali needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130 "
            "(or nvidia-dali-cuda120 / nvidia-dali-cuda110 to match your CUDA version; the plain "
            f"'nvidia-dali' package is a placeholder). Import error: {e}"
        ) from e
    return dali, fn, types, dmath


def dali_available() -> bool:
    try:
        require_dali()
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# The pipeline.


MAX_FALLBACKS_IN_A_ROW = 8  # batches in a row that DALI refuses before the run stops (a broken pipeline, not data)


@dataclass
class DaliStats:
    batches: int = 0
    retried_batches: int = 0  # batches DALI refused, retried with PIL-undecodable samples replaced
    replaced: int = 0  # samples replaced after a DALI decode error
    pil_batches: int = 0  # batches DALI refused even then, augmented by the PIL/torch path
    rebuilds: int = 0  # pipelines rebuilt after a refused batch (a failed batch can leave one broken)
    fallbacks_in_a_row: int = 0
    last_error: str = ""


class DaliAugment:
    """A DALI pipeline that decodes and augments batches of encoded images with given draws.

    device_id=None: CPU-only pipeline (decoders 'cpu'), outputs CPU tensors. Otherwise decoding is 'mixed'
    (nvJPEG) and everything runs on GPU `device_id`; outputs are CUDA tensors there."""

    def __init__(self, specs: list[ViewSpec], batch_size: int, device_id: int | None = None, num_threads: int = 2,
                 seed: int = 0, hw_decoder_load: float | None = None):
        self.specs, self.batch_size, self.device_id = list(specs), batch_size, device_id
        self.stats = DaliStats()
        self._settings = (num_threads, seed, hw_decoder_load)
        # GPU outputs are copied on a stream of their own: the copy waits for DALI, not for the training queue.
        self.copy_stream = torch.cuda.Stream(device_id) if device_id is not None else None
        self._build()

    def _build(self) -> None:
        dali, fn, types, dmath = require_dali()
        num_threads, seed, hw_decoder_load = self._settings
        batch_size, device_id = self.batch_size, self.device_id
        decoder_device = "cpu" if device_id is None else "mixed"
        mean = [255 * m for m in IMAGENET_MEAN]
        std = [255 * s for s in IMAGENET_STD]
        gray_matrix = np.tile(np.array(GRAY_WEIGHTS, dtype=np.float32), (3, 1))
        specs = self.specs
        decoder_args = {} if hw_decoder_load is None or device_id is None else {"hw_decoder_load": hw_decoder_load}

        def graph():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1, no_copy=False)
            img = fn.decoders.image(enc, device=decoder_device, output_type=types.RGB, adjust_orientation=False,
                                    **decoder_args)
            outs = []
            for i, spec in enumerate(specs):
                x = {name: fn.external_source(name=f"{name}{i}", dtype=dtype, ndim=ndim) for name, dtype, ndim in (
                    ("roi_start", types.FLOAT, 1), ("roi_end", types.FLOAT, 1), ("flip", types.INT32, 0),
                    ("a", types.FLOAT, 2), ("p", types.FLOAT, 2), ("gray", types.BOOL, 0),
                    ("blur", types.BOOL, 0), ("sigma", types.FLOAT, 0), ("solarize", types.BOOL, 0))}
                v = fn.resize(img, size=[spec.size, spec.size], roi_start=x["roi_start"], roi_end=x["roi_end"],
                              dtype=types.FLOAT, antialias=True, interp_type=types.INTERP_LINEAR)
                m = fn.reshape(fn.reductions.mean(v, axes=[0, 1]), shape=[1, 3])
                v = fn.coord_transform(v, M=x["a"]) + fn.coord_transform(m, M=x["p"])
                v = dmath.clamp(v, 0.0, 255.0)
                if x["gray"]:
                    v = fn.coord_transform(v, M=gray_matrix.flatten().tolist())
                if x["blur"]:
                    v = fn.gaussian_blur(v, sigma=x["sigma"], window_size=_dali_kernel(spec))
                if x["solarize"]:
                    v = v + (v >= 255.0 * spec.solarize_threshold) * (255.0 - 2.0 * v)
                outs.append(fn.crop_mirror_normalize(v, mirror=x["flip"], mean=mean, std=std, output_layout="CHW",
                                                     dtype=types.FLOAT))
            return tuple(outs)

        # exec_dynamic: a failed batch leaves the pipeline usable; prefetch 1: each run is the batch just fed.
        self.pipe = dali.pipeline_def(graph, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                      seed=seed % (2**31), enable_conditionals=True, exec_dynamic=True,
                                      prefetch_queue_depth=1)()
        self.pipe.build()

    def run(self, data: list[np.ndarray], draws: list[ViewDraws]) -> list[torch.Tensor]:
        """Decode + augment one batch; raises what DALI raises (e.g. RuntimeError on a decode error)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if len(data) > self.batch_size:
            raise ValueError(f"batch of {len(data)} > the pipeline's batch size {self.batch_size}")
        self.pipe.feed_input("enc", data)
        for i, d in enumerate(draws):
            for name, value in vars(d).items():
                self.pipe.feed_input(f"{name}{i}", value)
        outs = self.pipe.run()
        device = torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)
        stream = self.copy_stream
        views = []
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for out in outs:
                t = out.as_tensor()
                views.append(feed_ndarray(t, torch.empty(t.shape(), dtype=torch.float32, device=device), stream))
        if stream is not None:
            stream.synchronize()  # this stream only: the copies are done before DALI reuses its buffers
            for v in views:  # made on the copy stream, used on the training one: keep the allocator honest
                v.record_stream(torch.cuda.current_stream(device))
        self.stats.batches += 1
        return views

    def __call__(self, batch: EncodedBatch, seed: int = 0, rank: int = 0) -> tuple[list[torch.Tensor], int]:
        """Views of an EncodedBatch and the number of samples replaced here (decode errors the check missed)."""
        try:
            views = self.run(batch.data, batch.draws)
            self.stats.fallbacks_in_a_row = 0
            return views, 0
        except RuntimeError as e:
            self._failed(batch.step, e)
        # Find what PIL cannot decode, replace it by another view of a good sample, and try once more.
        self.stats.retried_batches += 1
        good = [i for i, d in enumerate(batch.data) if _pil_decodes(d)]
        if not good:
            raise RuntimeError(f"step {batch.step}: no decodable image in the batch")
        data, draws, replaced = _replace_bad(batch, good, batch_rng(seed, batch.step, rank, batch.micro, REPLACEMENT),
                                             self.specs)
        self.stats.replaced += replaced
        if replaced:
            try:
                views = self.run(data, draws)
                self.stats.fallbacks_in_a_row = 0
                return views, replaced
            except RuntimeError as e:
                self._failed(batch.step, e)
        self.stats.pil_batches += 1
        self.stats.fallbacks_in_a_row += 1
        if self.stats.fallbacks_in_a_row >= MAX_FALLBACKS_IN_A_ROW:
            raise RuntimeError(f"DALI refused {self.stats.fallbacks_in_a_row} batches in a row, rebuilt or not "
                               f"(last: {self.stats.last_error}); use --decoder nvjpeg or pil")
        warnings.warn(f"DALI refused a batch that PIL decodes; augmented it with the PIL/torch path instead "
                      f"({self.stats.pil_batches} so far). DALI said: {self.stats.last_error}", stacklevel=2)
        return self._pil_views(data, batch.step, batch.micro, seed, rank), replaced

    def _failed(self, step: int, error: Exception) -> None:
        """Note a refused batch and rebuild the pipeline: after a failed batch it may stay broken."""
        self.stats.last_error = f"step {step}: {str(error).strip().splitlines()[0][:300]}"
        self.stats.rebuilds += 1
        self._build()

    def _pil_views(self, data: list[np.ndarray], step: int, micro: int, seed: int, rank: int) -> list[torch.Tensor]:
        rng = batch_rng(seed, step, rank, micro, FALLBACK)
        crops = [decode_views(d.tobytes(), self.specs, rng) for d in data]
        g = batch_generator(seed, step, rank, micro, FALLBACK)
        device = torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)
        out = []
        for v, spec in enumerate(self.specs):
            x = to_chw([c[v] for c in crops])
            out.append(photometric(x, spec, g).to(device))
        return out


def _dali_kernel(spec: ViewSpec) -> int:
    return min(spec.kernel_size(), 2 * spec.size - 1)


def _pil_decodes(data: np.ndarray) -> bool:
    try:
        check_image(data.tobytes(), max_pixels=MAX_DECODE_PIXELS, decode=True)
    except (ImageError, *UNDECODABLE):
        return False
    return True


def _replace_bad(batch: EncodedBatch, good: list[int], rng: np.random.Generator, specs: list[ViewSpec]):
    """(data, draws, count): samples outside `good` replaced by good ones with fresh geometry for their size."""
    n = len(batch.data)
    bad = [i for i in range(n) if i not in set(good)]
    data = list(batch.data)
    src = [good[j % len(good)] for j in range(len(bad))]
    fresh = [draw_geometry(*batch.sizes[k], specs, rng) for k in src]
    draws = [d.take(np.arange(n)) for d in batch.draws]  # copies
    for i, k, geo in zip(bad, src, fresh):
        data[i] = batch.data[k]
        for v, d in enumerate(draws):
            left, top, right, bottom = geo[v].box
            d.roi_start[i] = (top, left)
            d.roi_end[i] = (bottom, right)
            d.flip[i] = int(geo[v].flip)
    return data, draws, len(bad)


# ----------------------------------------------------------------------------------------------------------
# The loader.


class DaliLoader:
    """The batches of one rank, decoded and augmented by DALI: an iterable of loader.Batch whose views are
    normalized float (B, 3, S, S) tensors (on cuda:device_id, or CPU). Reading, checking and drawing run in
    `num_workers` DataLoader workers; the pipeline runs on a background thread (`background`), `prefetch`
    batches ahead."""

    def __init__(self, plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0, num_workers: int = 0,
                 storage_options: dict | None = None, seed: int = 0, device_id: int | None = None,
                 num_threads: int = 2, prefetch: int = 2, background: bool = True, skip_fraction: float = 0.01,
                 skip_grace: int = 32, **dataset_options):

        self.dataset = EncodedDataset(plan, rank, views, start_step, storage_options, seed,
                                      skip_fraction=skip_fraction, skip_grace=skip_grace, **dataset_options)
        if device_id is not None:  # nvJPEG decodes in DALI's own memory pool: bound what one image can take
            self.dataset.max_pixels = GPU_DECODE_MAX_PIXELS
        self.loader = StreamingDataLoader(self.dataset, num_workers=num_workers, prefetch_factor=prefetch)
        self.augment = DaliAugment(views, plan.batch_size // self.dataset.micro_batches, device_id, num_threads,
                                   seed=int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
        self.seed, self.rank = seed, rank
        self.prefetch, self.background = max(1, prefetch), background
        self.skip_fraction, self.skip_grace = skip_fraction, skip_grace
        self.seen = self.replaced = 0

    @property
    def stats(self) -> DaliStats:
        return self.augment.stats

    def __len__(self) -> int:
        return len(self.dataset)

    def _decode(self, enc: EncodedBatch) -> Batch:
        views, replaced = self.augment(enc, seed=self.seed, rank=self.rank)
        self.seen += len(enc.data)
        self.replaced += replaced
        if self.replaced > self.skip_grace + self.skip_fraction * self.seen:
            raise TooManySkipped(f"rank {self.rank}: DALI could not decode {self.replaced} of {self.seen} samples "
                                 f"(threshold {self.skip_grace} + {self.skip_fraction:.1%})")
        return Batch(enc.step, views, enc.labels, enc.keys, enc.skipped + replaced, enc.io, enc.worker, enc.micro)

    def __iter__(self):
        batches = iter(self.loader)
        if not self.background:
            for enc in batches:
                yield self._decode(enc)
            return
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce():
            try:
                for enc in batches:
                    item = self._decode(enc)
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                out.put(done)
            except BaseException as e:  # handed to the consumer
                out.put(e)

        thread = threading.Thread(target=produce, name="stream-ssl-dali", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.1)


def make_dali_loader(plan: Plan, rank: int, views: list[ViewSpec], start_step: int = 0, num_workers: int = 0,
                     storage_options: dict | None = None, seed: int = 0, device_id: int | None = None,
                     num_threads: int = 2, prefetch: int = 2, **options) -> DaliLoader:
    """The DALI loader of one rank (same plan arguments as `loader.make_loader`, plus the GPU `device_id`,
    None for a CPU-only pipeline, and DALI's `num_threads`)."""
    return DaliLoader(plan, rank, views, start_step, num_workers, storage_options, seed, device_id, num_threads,
                      prefetch, **options)
