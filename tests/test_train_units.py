"""Pieces of the train function without S3: metrics, preprocessing parity, the model."""

from __future__ import annotations

import numpy as np
import pytest

from lensflow import scenes
from lensflow_core.imaging import decode_image
from lensflow_core.runtime import to_input
from lensflow_train.evaluate import score


def prepare(blobs: list[bytes], height: int, width: int) -> np.ndarray:
    """float32 inputs, decoded and normalised the way the runtime does it."""
    side = max(height, width)
    return np.concatenate(
        [
            to_input(decode_image(b, (side, side), max_pixels=64_000_000), height, width)
            for b in blobs
        ]
    )


def test_score_counts_a_known_confusion():
    labels = ["a", "b", "c"]
    truth = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 1, 0]
    ev = score(truth, predicted, labels)
    assert ev.n == 6 and ev.accuracy == round(4 / 6, 4)
    assert ev.confusion == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert ev.per_class["a"] == {"precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3}
    assert ev.per_class["b"]["precision"] == 0.6667 and ev.per_class["b"]["recall"] == 1.0
    assert ev.per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert ev.macro_f1 == round((2 / 3 + 0.8 + 0) / 3, 4)


def test_to_input_shape_range_and_normalisation():
    img = scenes.render_scene("water", 1, (640, 480))
    x = to_input(img, 96, 96, 1 / 255, 0.0)
    assert x.shape == (1, 96, 96, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    y = to_input(img.convert("L"), 96, 96, 2 / 255, -1.0)  # grayscale becomes RGB
    assert y.shape == (1, 96, 96, 3) and y.min() >= -1.0


@pytest.mark.slow
def test_model_exports_a_softmax_tflite_with_the_documented_input():
    from ai_edge_litert.interpreter import Interpreter

    from lensflow_train import model as M

    keras_model = M.build_model(len(scenes.CLASSES))
    assert 5_000 < keras_model.count_params() < 100_000
    x = prepare([scenes.scene_jpeg(c, 1) for c in scenes.CLASSES], *M.INPUT_SIZE)
    M.train(keras_model, x, np.arange(len(scenes.CLASSES)), epochs=1)
    interpreter = Interpreter(model_content=M.to_tflite(keras_model))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert list(inp["shape"]) == [1, 96, 96, 3] and inp["dtype"] == np.float32
    interpreter.set_tensor(inp["index"], x[:1])
    interpreter.invoke()
    probabilities = interpreter.get_tensor(out["index"])[0]
    assert probabilities.shape == (len(scenes.CLASSES),)
    assert abs(float(probabilities.sum()) - 1.0) < 1e-4
    keras_probabilities = np.asarray(keras_model(x[:1], training=False))[0]
    assert np.allclose(probabilities, keras_probabilities, atol=1e-4)

    copy = M.build_model(len(scenes.CLASSES), seed=9)
    M.load_weights(copy, M.weights_bytes(keras_model))
    assert np.allclose(np.asarray(copy(x[:1], training=False))[0], keras_probabilities, atol=1e-6)
