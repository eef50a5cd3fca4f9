"""The one LiteRT runtime: float and full-integer (uint8) models read the same pictures."""

from __future__ import annotations

import numpy as np
import pytest

from lensflow import scenes
from lensflow_core.imaging import decode_image
from lensflow_core.runtime import InputSpec, LiteModel, ModelError, describe, to_input
from tests.tflite_models import tiny_classifier


@pytest.fixture(scope="module")
def twins() -> tuple[bytes, bytes]:
    """One network, converted twice: float32, and full-integer with uint8 input and output."""
    return tiny_classifier(seed=5), tiny_classifier(seed=5, full_integer=True)


def test_describe_says_what_a_model_takes_and_gives(twins):
    floating, integer = twins
    assert describe(floating)["input_dtype"] == "float32"
    quantized = describe(integer)
    assert (quantized["input_dtype"], quantized["output_dtype"]) == ("uint8", "uint8")
    assert quantized["input_shape"] == [1, 32, 32, 3] and quantized["output_size"] == 3
    with pytest.raises(ModelError, match="does not load"):
        describe(b"not a flatbuffer")


def test_a_full_integer_model_scores_like_its_float_twin(twins):
    floating, integer = LiteModel(twins[0]), LiteModel(twins[1])
    images = [scenes.render_scene(c, i, (64, 48)) for i, c in enumerate(scenes.CLASSES)]
    for image in images:
        batch = integer.tensor(image)
        assert batch.dtype == np.uint8 and batch.shape == (1, 32, 32, 3)
        expected = floating.classify(image)
        got = integer.classify(image)  # dequantized: probabilities again
        assert got.dtype == np.float32 and abs(float(got.sum()) - 1.0) < 0.05
        assert np.allclose(got, expected, atol=0.05), (got, expected)


def test_float_input_is_the_decoded_picture_normalised():
    blob = scenes.scene_jpeg("road", 5, (4000, 3000))
    model = LiteModel(tiny_classifier(size=32, seed=1), InputSpec(32, 32, scale=2 / 255, offset=-1))
    image = decode_image(blob, (32, 32), max_pixels=64_000_000)
    assert np.array_equal(model.tensor(image), to_input(image, 32, 32, 2 / 255, -1.0))
