"""The classifier: a small Keras CNN, its training loop, warm start and TFLite export.

Input: float32 RGB in [0, 1], shape [1, 96, 96, 3] (``INPUT_SPEC``: the predict function
computes ``pixels * scale + offset``). Output: softmax over the labels.
The train image's TensorFlow lives here, in ``finetune`` (the backbone's fine-tuning) and in
``backbone`` (MobileNetV2's architecture); the predict function never imports it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf


def _bind_threads() -> None:
    """TensorFlow's pools sized as the training Job's CPU allows (``job.bind_threads`` sets
    these variables from the Job's CPU limit before this module is imported)."""
    for name, setter in (
        ("TF_NUM_INTRAOP_THREADS", tf.config.threading.set_intra_op_parallelism_threads),
        ("TF_NUM_INTEROP_THREADS", tf.config.threading.set_inter_op_parallelism_threads),
    ):
        try:
            setter(int(os.environ[name]))
        except (KeyError, ValueError):
            pass
        except RuntimeError:  # TensorFlow already ran in this process: its pools stay
            pass


_bind_threads()

INPUT_SIZE = (96, 96)  # height, width
INPUT_SPEC = {"scale": 1 / 255, "offset": 0.0}
ARCH = "cnn4-96-v1"  # bump when build_model changes: old weights no longer fit
WEIGHTS_FILE = "keras.weights.h5"

# progress(epoch, epochs, logs): called after every epoch.
EpochProgress = Callable[[int, int, dict[str, float]], None]


def build_model(num_classes: int, seed: int = 0) -> keras.Model:
    """Four conv blocks (16-32-64-64 filters), global average pooling, softmax; ~60k params."""
    keras.utils.set_random_seed(seed)
    h, w = INPUT_SIZE
    inputs = keras.Input(shape=(h, w, 3), dtype="float32", name="image")
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    for filters in (32, 64, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="lensflow_aerial")
    compile_model(model)
    return model


def compile_model(model: keras.Model, learning_rate: float = 2e-3) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random quarter turns and flips: an aerial photo has no "up"."""
    out = images.copy()
    turns = rng.integers(0, 4, len(images))
    for k in (1, 2, 3):
        idx = np.flatnonzero(turns == k)
        out[idx] = np.rot90(out[idx], k, axes=(1, 2))
    flip = np.flatnonzero(rng.random(len(images)) < 0.5)
    out[flip] = out[flip, :, ::-1]
    return out


def as_input(images: np.ndarray) -> np.ndarray:
    """Pictures as the model takes them (float32): uint8 pixels (``dataset.load``) become
    ``pixels * scale + offset``; float pictures are taken as already normalised."""
    if images.dtype == np.uint8:
        scale, offset = np.float32(INPUT_SPEC["scale"]), np.float32(INPUT_SPEC["offset"])
        return images.astype(np.float32) * scale + offset
    return images.astype(np.float32, copy=False)


def batches(
    images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int, rng
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Augmented float32 batches of ``images`` in ``order``: one batch of floats at a
    time, never a float copy of the whole set."""
    for start in range(0, len(order), batch_size):
        idx = np.sort(order[start : start + batch_size])  # sorted: a faster gather
        yield as_input(augment(images[idx], rng)), labels[idx]


def train(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    progress: EpochProgress | None = None,
    *,
    batch_size: int | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Fit ``model`` on ``images`` [n, 96, 96, 3] (uint8 pixels, or float pictures as the
    model takes them: ``as_input``) and int ``labels``; per-epoch logs.

    The default batch size is 32, smaller for small sets (at least ~10 steps per epoch).
    """
    rng = np.random.default_rng(seed)
    batch_size = batch_size or max(8, min(32, len(images) // 10))
    history: list[dict[str, float]] = []
    peak = float(model.optimizer.learning_rate.numpy())
    for epoch in range(epochs):
        # cosine decay: big steps first, small ones at the end (a steadier final model)
        model.optimizer.learning_rate.assign(
            peak * (0.55 + 0.45 * math.cos(math.pi * epoch / epochs))
        )
        order = rng.permutation(len(images))
        steps = math.ceil(len(images) / batch_size)
        result = model.fit(
            batches(images, labels, order, batch_size, rng),
            epochs=1,
            steps_per_epoch=steps,
            verbose=0,
            shuffle=False,  # shuffled by ``order`` already
        )
        logs = {k: float(v[-1]) for k, v in result.history.items()}
        history.append(logs)
        if progress is not None:
            progress(epoch + 1, epochs, logs)
    model.optimizer.learning_rate.assign(peak)
    return history


def weights_bytes(model: keras.Model) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, WEIGHTS_FILE)
        model.save_weights(path)
        with open(path, "rb") as f:
            return f.read()


def load_weights(model: keras.Model, data: bytes) -> None:
    """Load weights saved by ``weights_bytes``; raises if the architecture differs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, WEIGHTS_FILE)
        with open(path, "wb") as f:
            f.write(data)
        with warnings.catch_warnings():  # the saved optimizer state is not wanted
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(path)


REPRESENTATIVE_IMAGES = 200  # calibration pictures for full-integer quantization


def to_tflite(
    model: keras.Model, quantization: str = "float32", representative: np.ndarray | None = None
) -> bytes:
    """The TFLite flatbuffer to serve: input [1, 96, 96, 3], softmax output.

    ``quantization``: ``float32``; ``float16`` (weights stored as float16, float32 in and
    out); ``int8`` (full-integer: int8 weights and activations, uint8 input and output,
    calibrated on ``representative``: pictures as ``train`` takes them).
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 quantization needs representative pictures")
        picks = np.random.default_rng(0).permutation(len(representative))[:REPRESENTATIVE_IMAGES]

        def calibration():
            for i in picks:
                yield [as_input(representative[i : i + 1])]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    elif quantization != "float32":
        raise ValueError(f"unknown quantization {quantization!r}")
    with contextlib.redirect_stdout(io.StringIO()):  # keras prints "Saved artifact at ..."
        return converter.convert()
