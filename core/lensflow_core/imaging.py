"""Decode untrusted image bytes into an RGB picture of about the size a model needs.

Robust to what cameras and people upload: EXIF orientation, grayscale, CMYK, alpha,
palette, 16-bit, animated (first frame), WebP. JPEGs are decoded in draft mode, so a
12-megapixel photo is decoded at 1/2, 1/4 or 1/8 scale when the model only needs 224x224.
Every failure is an ``ImageError`` carrying the HTTP status a function should answer.

Memory is bounded, because a small file can be a huge image (a 124 KB PNG of 7999x7999
16-bit pixels is 128 MB decoded):

- ``decode_peak_bytes`` estimates a decode's peak from the header alone (size, mode),
  before a pixel is decoded; ``DecodeBudget`` makes concurrent decodes share a fixed
  number of bytes, so a replica's decodes never need more than its budget at once.
- Large images are reduced (integer box reduction, ``Image.reduce``) right after the
  decode, before any conversion copies them; 16-bit and 32-bit images go to 8 bits in
  strips of rows, each reduced at once, so no full-size float or 8-bit copy exists.
  The arithmetic per mode is in docs/autoscaling.md.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """A permanent problem with the image: ``status`` is 413, 415 or 422."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Bytes per pixel Pillow keeps in memory: multi-band modes are 4 bytes wide.
_ONE_BYTE = {"1", "L", "P"}
_TWO_BYTES = {"I;16", "I;16B", "I;16L", "I;16N"}
# Reduce after decoding only above this size: smaller images cost little, and keep
# exactly the pixels they had.
REDUCE_ABOVE_PIXELS = 4_000_000
_REDUCIBLE = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F"}
_STRIP_BYTES = 4 * 1024 * 1024
_OVERHEAD_BYTES = 8 * 1024 * 1024  # decoder buffers, the reduced result, numpy strips


def bytes_per_pixel(mode: str) -> int:
    if mode in _ONE_BYTE:
        return 1
    if mode in _TWO_BYTES:
        return 2
    return 4


def decode_peak_bytes(mode: str, width: int, height: int) -> int:
    """The most memory decoding a ``mode`` image of ``width`` x ``height`` takes here:
    the decoded pixels, plus a full-size converted copy where one is unavoidable (a
    palette image with transparency becomes RGBA before it can be reduced)."""
    pixels = width * height
    peak = pixels * bytes_per_pixel(mode)
    if mode == "P":
        peak += pixels * 4
    return peak + _OVERHEAD_BYTES


class DecodeBudget:
    """Bytes that concurrent decodes share: ``reserve(n)`` waits until ``n`` are free.

    A decode that needs more than the whole budget is refused (413) rather than waiting
    forever; with the default settings every image under the pixel limit fits.
    """

    def __init__(self, total_bytes: int):
        self.total = total_bytes
        self._free = total_bytes
        self._cond = threading.Condition()
        self.waits = 0  # decodes that had to wait for memory (a metric)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if nbytes > self.total:
            raise ImageError(
                413,
                f"decoding needs about {nbytes >> 20} MB, over this replica's decode budget "
                f"of {self.total >> 20} MB",
            )
        with self._cond:
            if self._free < nbytes:
                self.waits += 1
            self._cond.wait_for(lambda: self._free >= nbytes)
            self._free -= nbytes
        try:
            yield
        finally:
            with self._cond:
                self._free += nbytes
                self._cond.notify_all()


def decode_image(
    data: bytes,
    size: tuple[int, int],
    *,
    max_pixels: int,
    draft: bool = True,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """An RGB image of at least ``size`` (width, height) where the source allows it.

    ``max_pixels`` bounds width x height as declared by the header, checked before any
    pixel is decoded (the decompression-bomb guard). ``draft``: decode JPEGs at reduced
    scale and box-reduce large images (False keeps every pixel). ``budget``: wait for
    the decode's estimated peak memory to be free first.
    """
    if not data:
        raise ImageError(422, "the object is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError(415, "the object is not an image in a supported format") from None
        raise ImageError(413, "the image has too many pixels (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(422, f"the image header is corrupt: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(422, "the image has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            413, f"the image is {width}x{height}, over the limit of {max_pixels} pixels"
        )
    side = max(size)  # orientation may swap width and height
    reserve = budget.reserve if budget is not None else _no_budget
    try:
        if draft and image.format == "JPEG":
            image.draft("RGB", (side, side))  # the header is enough to pick the scale
        with reserve(decode_peak_bytes(image.mode, *image.size)):
            image.load()  # first frame of an animation; raises on truncated data
            orientation = image.getexif().get(_ORIENTATION)
            factor = _reduction(image.size, side) if draft else 1
            image = _to_rgb(image, factor)
            method = _TRANSPOSE.get(orientation)  # after reducing: fewer pixels to move
            return image.transpose(method) if method is not None else image
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(422, f"the image data is truncated or corrupt: {exc}") from None


_ORIENTATION = 0x0112  # EXIF tag: how the camera was held
_TRANSPOSE = {  # as ImageOps.exif_transpose applies them
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@contextmanager
def _no_budget(_nbytes: int) -> Iterator[None]:
    yield


def _reduction(image_size: tuple[int, int], side: int) -> int:
    """The box-reduction factor keeping both sides at least ``side`` (1: keep as is)."""
    width, height = image_size
    if width * height <= REDUCE_ABOVE_PIXELS:
        return 1
    return max(1, min(width, height) // max(side, 1))


def _to_rgb(image: Image.Image, factor: int = 1) -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_gray(image, factor).convert("RGB")
    if image.mode in ("P", "PA", "1"):  # Image.reduce does not take these
        alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")
    if factor > 1:
        if image.mode not in _REDUCIBLE:
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        image = image.reduce(factor)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_gray(image: Image.Image, factor: int) -> Image.Image:
    """A 16/32-bit or float image as 8-bit gray, reduced by ``factor``, in strips.

    Values are scaled from 16 bits when any exceeds 255 (else kept). Each strip of rows
    is converted and reduced on its own, so memory beyond the decoded image stays a few
    MB instead of a float copy of every pixel.
    """
    width, height = image.size
    rows = max(factor, (_STRIP_BYTES // max(width * 4, 1)) // factor * factor)
    top = 0.0
    for y in range(0, height, rows):
        strip = np.asarray(image.crop((0, y, width, min(y + rows, height))))
        top = max(top, float(strip.max(initial=0)))
    shift_16 = top > 255
    out = Image.new("L", (-(-width // factor), -(-height // factor)))  # ceil, as reduce
    for y in range(0, height, rows):
        strip = np.asarray(image.crop((0, y, width, min(y + rows, height))))
        if shift_16:
            strip = np.clip(strip, 0, 65535).astype(np.uint16) >> 8
        gray = Image.fromarray(np.clip(strip, 0, 255).astype(np.uint8), "L")
        out.paste(gray.reduce(factor) if factor > 1 else gray, (0, y // factor))
    return out
