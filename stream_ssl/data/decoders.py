"""The decoders a run can use (`--decoder`), found by name: each builds the loader of one training process.

    loader = DECODERS[cfg.decoder].loader(plan, rank, views, start_step, workers, device, cfg, **reading)

- `pil`: workers decode with PIL and crop on uint8 (loader.py); the colour part runs on the training device.
- `nvjpeg`: workers send JPEG bytes and crop boxes, the training process decodes on the GPU (nvjpeg.py).
- `dali`: an NVIDIA DALI pipeline fed from our reader (dali.py); on a machine without GPUs a CPU-only pipeline.

A decoder's loader may have `stats` (its counters: batches, fallbacks, replaced samples), which the run's
summary reports. The modules of the GPU decoders are imported only when they are used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (config.py reads this registry for --help: no torch import here)
    import torch


@dataclass(frozen=True)
class Decoder:
    name: str
    help: str
    loader: Callable  # (plan, rank, views, start_step, workers, device, cfg, **reading) -> a loader of Batches
    check: Callable[[], None] = lambda: None  # raises ImportError naming what to install when unavailable


def _pil(plan, rank, views, start_step, workers, device: torch.device, cfg, **reading):
    from stream_ssl.data.loader import make_loader

    return make_loader(plan, rank, views, start_step, workers, pin_memory=device.type == "cuda", **reading)


def _nvjpeg(plan, rank, views, start_step, workers, device: torch.device, cfg, **reading):
    from stream_ssl.data.nvjpeg import make_nvjpeg_loader

    return make_nvjpeg_loader(plan, rank, views, start_step, workers, device=device, **reading)


def _dali(plan, rank, views, start_step, workers, device: torch.device, cfg, **reading):
    from stream_ssl.data.dali import make_dali_loader

    device_id = (device.index or 0) if device.type == "cuda" else None  # None: a CPU-only pipeline
    return make_dali_loader(plan, rank, views, start_step, workers, device_id=device_id,
                            num_threads=cfg.dali_threads, **reading)


def _require_dali() -> None:
    from stream_ssl.data.dali import require_dali

    require_dali()


DECODERS: dict[str, Decoder] = {d.name: d for d in (
    Decoder("pil", "workers decode and crop, colour augmentation batched on the device", _pil),
    Decoder("nvjpeg", "workers send JPEG bytes and crop boxes, the GPU decodes (torchvision, no extra package)",
            _nvjpeg),
    Decoder("dali", "an NVIDIA DALI pipeline", _dali, _require_dali),
)}
