"""Check encoded images cheaply, and re-encode the large ones down when asked.

The default check reads headers only (format, size, pixel cap) plus a structural end check per format
(a JPEG must carry an end-of-image marker after its first scan, a PNG's chunks and CRCs must be whole,
a WebP's RIFF size must fit), which catches truncated and garbage files without decoding pixels. A full
decode (`decode=True`) also catches damaged compressed data, at the cost of decoding every image.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_PIXELS = 100_000_000  # larger images are refused as possible decompression bombs (PIL refuses > ~179M)

# We enforce our own cap before any decode; PIL's warning between its two limits is noise here.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An image that cannot be packed. `kind` is a stable reason name; `detail` says more."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclass
class Checked:
    ext: str
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int

    @property
    def resized(self) -> bool:
        return (self.width, self.height) != (self.original_width, self.original_height)


_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # frame headers (C4 DHT, C8 JPG, CC DAC are not)
_SOF_SUPPORTED = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman): what decoders take


def jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, offset of the first start-of-scan) from the JPEG segments, which are walked by their
    lengths up to the first scan (no pixel is decoded). Raises ImageError on a broken or unusual file."""
    i, n = 2, len(data)
    size = None
    while True:
        if i + 4 > n:
            raise ImageError("corrupt image", "truncated JPEG header")
        if data[i] != 0xFF:
            raise ImageError("corrupt image", f"JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:
            if size is None:
                raise ImageError("corrupt image", "JPEG: scan before the frame header")
            return size[0], size[1], i
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD8, 0xD9):
            raise ImageError("corrupt image", "JPEG: image ends before its first scan")
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            raise ImageError("corrupt image", "truncated JPEG header")
        if marker in _SOF:
            if marker not in _SOF_SUPPORTED:
                raise ImageError("unsupported format", f"JPEG SOF{marker - 0xC0} (lossless, arithmetic or "
                                                       "hierarchical coding)")
            if length < 8:
                raise ImageError("corrupt image", "JPEG: short frame header")
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            if w == 0 or h == 0:
                raise ImageError("corrupt image", f"JPEG size {w}x{h}")
            if data[i + 9] not in (1, 3, 4):
                raise ImageError("unsupported format", f"JPEG with {data[i + 9]} components")
            size = (w, h)
        i += 2 + length


def _structural_check(fmt: str, data: bytes, im: Image.Image) -> None:
    if fmt == "PNG":
        try:
            im.verify()  # walks every chunk to IEND, checking CRCs; does not inflate pixels
        except Exception as e:  # PIL raises SyntaxError, OSError, struct.error ...
            raise ImageError("corrupt image", f"PNG: {e}") from None
    elif fmt == "WEBP":
        if len(data) < 12 or data[:4] != b"RIFF" or struct.unpack("<I", data[4:8])[0] + 8 > len(data):
            raise ImageError("corrupt image", "truncated WebP")


def check_image(data: bytes, max_pixels: int = MAX_PIXELS, decode: bool = False, max_side: int | None = None,
                quality: int = 90) -> Checked:
    """Validate an encoded image; re-encode it as JPEG when `max_side` is set and it is larger.

    Raises ImageError with kinds: empty file, not an image, unsupported format, over pixel cap, corrupt image.
    """
    if not data:
        raise ImageError("empty file")
    data = data if isinstance(data, bytes) else bytes(data)  # a memoryview of a memory-mapped shard
    if data[:3] == b"\xff\xd8\xff":  # JPEG, the common case: checked without PIL
        w, h, sos = jpeg_header(data)
        if w * h > max_pixels:
            raise ImageError("over pixel cap", f"{w}x{h} > {max_pixels} pixels")
        if data.rfind(b"\xff\xd9", sos) < 0:
            raise ImageError("corrupt image", "truncated JPEG (no end-of-image marker)")
        if not decode and (max_side is None or max(w, h) <= max_side):
            return Checked("jpg", data, w, h, w, h)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("over pixel cap", str(e).split(".")[0]) from None
    except UnidentifiedImageError:
        raise ImageError("not an image") from None
    except Exception as e:  # a recognised format whose header is broken
        raise ImageError("corrupt image", f"{type(e).__name__}: {e}") from None
    with im:
        fmt, (w, h) = im.format, im.size
        if fmt not in FORMATS:
            raise ImageError("unsupported format", str(fmt))
        if w < 1 or h < 1:
            raise ImageError("corrupt image", f"size {w}x{h}")
        if w * h > max_pixels:
            raise ImageError("over pixel cap", f"{w}x{h} > {max_pixels} pixels")
        resize = max_side is not None and max(w, h) > max_side
        if not resize:
            if decode:
                _decode(im)
            else:
                _structural_check(fmt, data, im)
            return Checked(FORMATS[fmt], data, w, h, w, h)
        return _reencode(im, max_side, quality, w, h)


def _decode(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as e:
        raise ImageError("corrupt image", f"{type(e).__name__}: {e}") from None


def target_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    """Aspect-preserving size whose longer side is `max_side` (the shorter one at least 1)."""
    if w >= h:
        return max_side, max(1, round(h * max_side / w))
    return max(1, round(w * max_side / h)), max_side


def _reencode(im: Image.Image, max_side: int, quality: int, w: int, h: int) -> Checked:
    size = target_size(w, h, max_side)
    try:
        if im.format == "JPEG":
            im.draft("RGB" if im.mode != "L" else "L", size)  # let libjpeg scale down by 1/2..1/8 while decoding
        im.load()
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGBA").convert("RGB") if "transparency" in im.info else im.convert("RGB")
        small = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    except Exception as e:
        raise ImageError("corrupt image", f"{type(e).__name__}: {e}") from None
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return Checked("jpg", buf.getvalue(), size[0], size[1], w, h)
