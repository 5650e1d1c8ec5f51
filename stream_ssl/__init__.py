"""stream-ssl: self-supervised pretraining on images streamed from WebDataset shards, with exact control of how
many unique samples feed a fixed budget of samples seen.

The Python API (docs/python-api.md):

    from stream_ssl import StreamingDataLoader, StreamingDataset

    dataset = StreamingDataset("shards/pool", unique_samples="10%", budget_samples="1M", batch_size=256)
    loader = StreamingDataLoader(dataset, num_workers=8)

The commands (`stream-ssl train | plan | evaluate | distance | sweep`) are built on the same classes. Importing
this package is cheap: the classes are loaded (with torch) when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["StreamingDataLoader", "StreamingDataset", "TooManySkipped", "collate_samples"]

if TYPE_CHECKING:
    from stream_ssl.data.streaming import StreamingDataLoader, StreamingDataset, TooManySkipped, collate_samples


def __getattr__(name: str):
    if name in __all__:
        from stream_ssl.data import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module 'stream_ssl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
