"""Helpers for the augmentation and DALI tests: small photo-like JPEGs and in-place corruptions."""

from __future__ import annotations

import io
import shutil

import numpy as np
from PIL import Image

from shard_tools.shardset import load_shard_set


def photo_like(w: int = 96, h: int = 72, seed: int = 0, quality: int = 92, fmt: str = "JPEG") -> bytes:
    """Smooth random colours plus a bright and a dark block: saturated, gray-ish, clipped-ish pixels."""
    rng = np.random.default_rng([seed, 7])
    small = rng.random((max(2, h // 12), max(2, w // 12), 3))
    im = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)).copy()
    im[: h // 4, : w // 4] = 250
    im[-h // 5:, -w // 5:] = 8
    out = io.BytesIO()
    Image.fromarray(im).save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def image_batch(n: int, size: int, seed: int = 0, lo: float = 0.0, hi: float = 1.0):
    """(n, 3, size, size) float images in [lo, hi]: smooth colours (photo-like statistics), torch."""
    import torch

    rng = np.random.default_rng([seed, 11])
    out = []
    for _ in range(n):
        small = rng.random((4, 4, 3)).astype(np.float32)
        im = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255)
    return torch.from_numpy(np.stack(out)) * (hi - lo) + lo


def undefined_qtable(jpeg: bytes) -> bytes:
    """The same JPEG with its first component pointing at quantization table 3, which is not defined: the
    header and end-of-image checks pass, every decoder refuses it. Same length (in-place edit)."""
    b = bytearray(jpeg)
    i = 2
    while i + 4 <= len(b):
        marker, length = b[i + 1], (b[i + 2] << 8) | b[i + 3]
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 12] = 3  # Tq of component 1 (after P, Y, X, Nf, C1, H/V)
            return bytes(b)
        i += 2 + length
    raise ValueError("no frame header")


def corrupt_copy(folder, tmp_path, corruptions: dict[tuple[int, int], str]):
    """A copy of a shard set with samples {(shard, sample): how} corrupted in place (same sizes):
    'zeros' zeroes the JPEG after 20 bytes (fails the header check), 'qtable' keeps a valid structure that no
    decoder accepts (`undefined_qtable`), 'header' writes a wrong size into the JPEG member's tar header."""
    from stream_ssl.data.reader import ShardReader

    out = tmp_path / ("corrupt-" + "-".join(f"{s}.{i}{h}" for (s, i), h in sorted(corruptions.items())))
    shutil.copytree(folder, out)
    sset = load_shard_set(str(out))
    reader = ShardReader((sset,))
    for (shard, sample), how in corruptions.items():
        members = reader.index(0, shard).members[sample]
        ext, offset, size, _ = next(m for m in members if m[0] in ("jpg", "jpeg"))
        path = out / sset.shards[shard].path
        data = bytearray(path.read_bytes())
        if how == "zeros":
            data[offset + 20: offset + size] = bytes(size - 20)
        elif how == "qtable":
            data[offset: offset + size] = undefined_qtable(bytes(data[offset: offset + size]))
        elif how == "header":
            data[offset - 512 + 124: offset - 512 + 136] = b"00000000001\0"
        else:
            raise ValueError(how)
        path.write_bytes(bytes(data))
    return load_shard_set(str(out))
