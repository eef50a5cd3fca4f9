"""The one LiteRT runtime: float and full-integer (uint8) models read the same pictures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lensflow import scenes
from lensflow_core.imaging import decode_image
from lensflow_core.runtime import InputSpec, LiteModel, ModelError, describe, quantize, to_input
from tests.support.tflite_models import tiny_classifier


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


def _pictures(count: int) -> list:
    return [scenes.render_scene(scenes.CLASSES[i % 6], i, (64, 48)) for i in range(count)]


def test_a_batch_scores_each_picture_as_it_scores_alone(twins):
    for model_bytes in twins:  # float32, and uint8 in and out
        model = LiteModel(model_bytes)
        assert model.batchable
        tensors = [model.tensor(image) for image in _pictures(7)]
        alone = np.stack([model.scores(t) for t in tensors])
        for size in (2, 3, 7):
            batched = model.scores_batch(np.concatenate(tensors[:size]))
            assert batched.shape == (size, 3) and batched.dtype == np.float32
            assert np.allclose(batched, alone[:size], atol=1e-5), (batched, alone[:size])


def test_a_model_whose_batch_is_fixed_runs_batches_one_picture_at_a_time():
    from tests.support.tflite_models import fixed_batch_classifier

    model = LiteModel(fixed_batch_classifier(seed=3))
    assert not model.batchable  # its signature says batch 1, not -1
    tensors = [model.tensor(image) for image in _pictures(4)]
    alone = np.stack([model.scores(t) for t in tensors])
    assert np.array_equal(model.scores_batch(np.concatenate(tensors)), alone)
    assert len({tuple(np.round(row, 4)) for row in alone}) > 1  # the pictures differ


def test_models_the_runtime_cannot_feed_are_refused_with_the_reason():
    from tests.support.tflite_models import unfeedable_classifiers

    models = unfeedable_classifiers()
    with pytest.raises(ModelError, match="input type int16 is not one the runtime can feed"):
        describe(models["int16"])
    with pytest.raises(ModelError, match="uint8 without a quantization scale"):
        describe(models["no_scale"])
    with pytest.raises(ModelError, match="int16"):
        LiteModel(models["int16"])  # and never loaded for serving or scoring either


def test_a_quantized_input_is_the_normalised_picture_quantized(twins):
    """The 256-entry table gives exactly what normalising and then quantizing gives."""
    model = LiteModel(twins[1], InputSpec(32, 32, "uint8", scale=2 / 255, offset=-1.0))
    details = model._input  # the tensor's own scale and zero point
    for image in _pictures(3):
        expected = quantize(
            to_input(image, 32, 32, 2 / 255, -1.0), np.uint8, details["quantization"]
        )
        assert np.array_equal(model.tensor(image), expected)


def test_an_input_that_takes_the_pixels_unchanged_is_fed_them_directly(twins):
    """pixels / 255 into a uint8 tensor of scale 1/255: the same numbers, without a lookup."""
    model = LiteModel(twins[1], InputSpec(32, 32, "uint8", scale=1 / 255, offset=0.0))
    details = model._input
    assert details["quantization"] == pytest.approx((1 / 255, 0), rel=1e-4)  # calibrated
    for image in _pictures(3):
        expected = quantize(
            to_input(image, 32, 32, 1 / 255, 0.0), np.uint8, details["quantization"]
        )
        tensor = model.tensor(image)
        assert tensor.dtype == np.uint8 and np.array_equal(tensor, expected)
        assert np.array_equal(
            tensor[0], np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR))
        )
