"""Decoding what cameras and people really upload, and refusing what they should not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lensflow.scenes import render_scene
from lensflow_core.imaging import ImageError, decode_image
from tests.support.images import encode, png_with_declared_size

LIMIT = 50_000_000


def scene(size=(120, 80)) -> Image.Image:
    return render_scene("field", seed=7, size=size)


def test_exif_orientation_is_applied():
    wide = scene((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(wide, "JPEG", exif=exif), (32, 32), max_pixels=LIMIT, draft=False)
    assert decoded.size == (80, 120)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P", "I;16", "1"])
def test_every_pixel_mode_becomes_rgb(mode):
    image = (
        scene().convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.arange(120 * 80, dtype="<u2").reshape(80, 120) * 7)
    )
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    decoded = decode_image(encode(image, fmt), (32, 32), max_pixels=LIMIT, draft=False)
    assert decoded.mode == "RGB" and decoded.size == (120, 80)
    if mode == "I;16":  # scaled from 16 bits, not clipped to white
        assert 0 < np.asarray(decoded).mean() < 250


def test_transparent_pixels_are_composited_on_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"), (8, 8), max_pixels=LIMIT)
    assert np.asarray(decoded).min() == 255


def test_animated_images_use_the_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    red, _, blue = np.asarray(decode_image(data, (8, 8), max_pixels=LIMIT))[10, 10]
    assert red > 200 and blue < 50


def test_webp_decodes():
    assert decode_image(encode(scene(), "WEBP"), (32, 32), max_pixels=LIMIT).size == (120, 80)


def test_jpeg_draft_mode_decodes_a_large_photo_at_reduced_scale():
    data = encode(scene((4000, 3000)), "JPEG", quality=85)
    reduced = decode_image(data, (224, 224), max_pixels=LIMIT)
    full = decode_image(data, (224, 224), max_pixels=LIMIT, draft=False)
    assert full.size == (4000, 3000)
    assert reduced.size == (500, 375)  # 1/8 scale, still above 224 on both sides


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 422),
        (b"hello, I am a text file\n" * 10, 415),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:300], 422),
        (encode(scene(), "PNG")[:2000], 422),
        (png_with_declared_size(100_000, 100_000), 413),
    ],
    ids=["empty", "not-an-image", "truncated-jpeg", "truncated-png", "bomb"],
)
def test_bad_images_raise_with_the_status_to_answer(data, status):
    with pytest.raises(ImageError) as caught:
        decode_image(data, (32, 32), max_pixels=LIMIT)
    assert caught.value.status == status


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(encode(scene(), "PNG"), (32, 32), max_pixels=120 * 80 - 1)
