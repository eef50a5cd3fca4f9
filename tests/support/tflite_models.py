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


def fixed_batch_classifier(num_classes: int = 3, size: int = 32, seed: int = 0) -> bytes:
    """A classifier whose batch dimension is fixed at 1 (a flatten to [1, -1] inside):
    its input cannot be resized to a batch of several pictures."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    conv = tf.keras.layers.Conv2D(4, 3, strides=4, activation="relu")
    dense = tf.keras.layers.Dense(num_classes, activation="softmax")
    dense.build((None, 4 * ((size - 3) // 4 + 1) ** 2))
    conv.build((None, size, size, 3))

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32)])
    def serve(x):
        return dense(tf.reshape(conv(x), [1, -1]))

    return tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()]
    ).convert()


def unfeedable_classifiers(num_classes: int = 3, size: int = 32) -> dict[str, bytes]:
    """Models the runtime cannot feed: int16 input (16x8 quantization), and uint8 input
    without a quantization scale (a cast inside: nobody says what the integers mean)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((size, size, 3), dtype="float32")
    x = tf.keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes, activation="softmax")(x))

    rng = np.random.default_rng(0)

    def representative():
        for _ in range(8):
            yield [rng.random((1, size, size, 3), dtype=np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
    ]
    converter.inference_input_type = tf.int16
    converter.inference_output_type = tf.int16
    int16 = converter.convert()

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8)])
    def raw(pixels):
        return model(tf.cast(pixels, tf.float32) / 255.0)

    no_scale = tf.lite.TFLiteConverter.from_concrete_functions(
        [raw.get_concrete_function()], model
    ).convert()
    return {"int16": int16, "no_scale": no_scale}
