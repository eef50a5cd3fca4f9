"""The one image-to-tensor step shared by the predict function and training evaluation.

numpy and Pillow only: the predict path must never import TensorFlow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_input(
    image: Image.Image, height: int, width: int, scale: float = 1 / 255, offset: float = 0.0
) -> np.ndarray:
    """``image`` as a float32 batch of one, shape ``[1, height, width, 3]``.

    RGB, resized (bilinear) to the model's input, then ``pixels * scale + offset``
    (``scale`` and ``offset`` come from the model version's metadata).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    return (pixels * np.float32(scale) + np.float32(offset))[np.newaxis, ...]
