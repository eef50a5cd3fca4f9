"""Small real TFLite models for tests, made with TensorFlow once per session."""

from __future__ import annotations

import numpy as np


def tiny_classifier(
    num_classes: int = 3,
    size: int = 32,
    seed: int = 0,
    bias: int | None = None,
    full_integer: bool = False,
) -> bytes:
    """A random-weight image classifier; with ``bias`` it always prefers that class.

    ``full_integer``: quantized to uint8 input and output (TFLite's full-integer
    conversion, calibrated on random pictures normalised to 0..1), as edge accelerators
    want them.
    """
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((size, size, 3), dtype="float32")
    x = tf.keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    logits = tf.keras.layers.Dense(num_classes)(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Softmax()(logits))
    if bias is not None:
        dense = model.layers[-2]
        kernel, b = dense.get_weights()
        b = np.zeros_like(b)
        b[bias] = 10.0
        dense.set_weights([kernel * 0, b])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if full_integer:
        rng = np.random.default_rng(seed)

        def representative():
            for _ in range(16):
                yield [rng.random((1, size, size, 3), dtype=np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()
