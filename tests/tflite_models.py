"""Small real TFLite models for tests, made with TensorFlow once per session."""

from __future__ import annotations

import numpy as np


def tiny_classifier(
    num_classes: int = 3, size: int = 32, seed: int = 0, bias: int | None = None
) -> bytes:
    """A random-weight image classifier; with ``bias`` it always prefers that class."""
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
    return converter.convert()
