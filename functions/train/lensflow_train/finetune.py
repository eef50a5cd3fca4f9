"""Rounds on the pretrained backbone (``LENSFLOW_TRAIN_BACKBONE=mobilenet_v2_imagenet``).

The model: RGB in [0, 1] like the small CNN (``pixels / 255``: the version's metadata says
``scale`` 1/255, ``offset`` 0, and the predict function applies exactly that), then a
``Normalization`` layer holding the backbone's own mean and std, torchvision's MobileNetV2
at 96x96 (small enough to train on 2 cores: about 55 MFLOPs a picture, a quarter of
224x224), a new softmax head.

Two phases:

1. **Head** (no backbone champion to start from): the backbone is frozen, so its pooled
   features are computed once per picture and orientation (the 8 turns and flips of an
   aerial photo), and only the head trains, on those features: seconds, not minutes.
2. **Fine-tune** (the champion is a backbone model with the same labels): start from the
   champion's weights, unfreeze the top ``TOP_BLOCKS`` blocks (BatchNorm stays on
   ImageNet's statistics) and train end to end with small steps.
"""

from __future__ import annotations

import numpy as np

from lensflow_train import backbone as B
from lensflow_train import model as M

keras = M.keras

INPUT_SIZE = (96, 96)  # height, width
ARCH = f"{B.NAME}-96-v1"  # bump when build changes: old weights no longer fit
TOP_BLOCKS = 2  # blocks unfrozen when fine-tuning from a backbone champion
HEAD_LEARNING_RATE = 3e-3
FINETUNE_LEARNING_RATE = 2e-4
HEAD_PASSES = 4  # passes over every (picture, orientation) feature per epoch


def input_spec(preprocessing: dict) -> dict:
    """The version's ``input`` metadata: pixels / 255 as for every lensflow model; the
    backbone's normalisation, recorded for readers, is the model's first layer."""
    return {
        **M.INPUT_SPEC,
        "normalisation": {**preprocessing, "in_model": True, "backbone": B.NAME},
    }


def build(num_classes: int, weights: dict[str, np.ndarray] | None, preprocessing: dict, seed=0):
    """(model, classifier): ``model`` takes RGB in [0, 1]; ``classifier`` is the
    normalised-input backbone-and-head inside it (``set_trainable_blocks`` works on it)."""
    h, w = INPUT_SIZE
    classifier = B.build_classifier(weights, num_classes, input_size=h, seed=seed)
    mean = list(preprocessing["mean"])
    variance = [s**2 for s in preprocessing["std"]]
    inputs = keras.Input((h, w, 3), dtype="float32", name="image")
    x = keras.layers.Normalization(mean=mean, variance=variance, name="backbone_normalisation")(
        inputs
    )
    model = keras.Model(inputs, classifier(x), name="lensflow_backbone")
    return model, classifier


ORIENTATIONS = tuple((k, flip) for k in range(4) for flip in (False, True))  # 8 symmetries


def _orient(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    turned = np.rot90(images, k, axes=(1, 2))
    return turned[:, :, ::-1] if flip else turned


def features(model, classifier, images: np.ndarray, batch_size: int = 96) -> np.ndarray:
    """The backbone's pooled features (inference mode) of uint8 ``images`` in each of the 8
    orientations of a square picture (an aerial photo has no "up"): ``[8 * n, 1280]``,
    orientation-major. Computed a batch at a time (never a float copy of the whole set)
    with one traced graph: about twice as fast as ``Model.predict`` here."""
    import tensorflow as tf

    normalise = model.get_layer("backbone_normalisation")
    pooled = keras.Model(classifier.input, classifier.get_layer("pool").output)
    spec = tf.TensorSpec([None, *images.shape[1:]], tf.float32)
    run = tf.function(
        lambda batch: pooled(normalise(batch), training=False), input_signature=[spec]
    )
    out = np.empty((len(ORIENTATIONS) * len(images), B.FEATURES), np.float32)
    row = 0
    for k, flip in ORIENTATIONS:
        for i in range(0, len(images), batch_size):
            batch = M.as_input(np.ascontiguousarray(_orient(images[i : i + batch_size], k, flip)))
            out[row : row + len(batch)] = run(batch).numpy()
            row += len(batch)
    return out


def train_head(
    model,
    classifier,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    progress: M.EpochProgress | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Phase 1: the backbone frozen, the head trained on cached pooled features."""
    B.set_trainable_blocks(classifier, 0)
    feats = features(model, classifier, images)
    ys = np.tile(labels, len(ORIENTATIONS))
    f_in = keras.Input((B.FEATURES,), name="features")
    dropout, dense = classifier.get_layer("head_dropout"), classifier.get_layer("probabilities")
    head = keras.Model(f_in, dense(dropout(f_in)), name="head")
    M.compile_model(head, learning_rate=HEAD_LEARNING_RATE)
    rng = np.random.default_rng(seed)
    history = []
    batch = max(16, min(64, len(feats) // 20))
    for epoch in range(epochs):
        order = rng.permutation(len(feats))
        fit = head.fit(
            feats[order], ys[order], batch_size=batch, epochs=HEAD_PASSES, verbose=0, shuffle=True
        )
        logs = {k: float(v[-1]) for k, v in fit.history.items()}
        history.append(logs)
        if progress is not None:
            progress(epoch + 1, epochs, logs)
    M.compile_model(model)  # so weights_bytes/train see a compiled model
    return history


def fine_tune(
    model,
    classifier,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    progress: M.EpochProgress | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Phase 2: the top blocks and the head, end to end, small steps."""
    B.set_trainable_blocks(classifier, TOP_BLOCKS)
    M.compile_model(model, learning_rate=FINETUNE_LEARNING_RATE)
    return M.train(model, images, labels, epochs, progress, seed=seed)


def fold_normalisation(model):
    """``model`` with its ``Normalization`` layer folded into the stem convolution and
    its batch norm: conv(W, (x - m) / s) = conv(W / s, x) - conv(W, m / s), the second
    term moved into the batch norm's moving mean. Exact but for the stem's one-pixel
    border (padding is now zero pixels rather than the mean); the holdout judges it.
    None when ``model`` has no such layer. Shares every other layer with ``model``."""
    norm = next((la for la in model.layers if isinstance(la, keras.layers.Normalization)), None)
    inner = next((la for la in model.layers if isinstance(la, keras.Model)), None)
    if norm is None or inner is None:
        return None
    folded = keras.models.clone_model(inner)
    folded.set_weights(inner.get_weights())
    conv, batchnorm = folded.get_layer("features_0_0"), folded.get_layer("features_0_1")
    (w,) = conv.get_weights()  # [kh, kw, in, out], no bias: the batch norm follows
    mean = np.asarray(norm.mean, np.float32).reshape(-1)
    std = np.sqrt(np.asarray(norm.variance, np.float32).reshape(-1))
    conv.set_weights([w / std[None, None, :, None]])
    gamma, beta, moving_mean, moving_var = batchnorm.get_weights()
    shift = np.einsum("hwio,i->o", w, mean / std)
    batchnorm.set_weights([gamma, beta, moving_mean + shift, moving_var])
    x = inputs = keras.Input(model.input.shape[1:], dtype="float32", name="image")
    for layer in model.layers[1:]:  # the graph is a chain: input, normalisation, inner...
        x = folded(x) if layer is inner else x if layer is norm else layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_folded")
