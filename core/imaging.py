"""Decode untrusted image bytes into an RGB picture of about the size a model needs.

Robust to what cameras and people upload: EXIF orientation, grayscale, CMYK, alpha,
palette, 16-bit, animated (first frame), WebP. JPEGs are decoded in draft mode, so a
12-megapixel photo is decoded at 1/2, 1/4 or 1/8 scale when the model only needs 224x224.
Every failure is an ``ImageError`` carrying the HTTP status a function should answer.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """A permanent problem with the image: ``status`` is 413, 415 or 422."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def decode_image(
    data: bytes,
    size: tuple[int, int],
    *,
    max_pixels: int,
    draft: bool = True,
) -> Image.Image:
    """An RGB image of at least ``size`` (width, height) where the source allows it.

    ``max_pixels`` bounds width x height as declared by the header, checked before any
    pixel is decoded (the decompression-bomb guard).
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
    try:
        if draft and image.format == "JPEG":
            side = max(size)  # orientation may swap width and height
            image.draft("RGB", (side, side))
        image.load()  # first frame of an animation; raises on truncated data
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(422, f"the image data is truncated or corrupt: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        gray = np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
