"""The pretrained MobileNetV2 backbone as the train image uses it: its architecture and
its weights, ported from torchvision's ImageNet ones.

- ``build_mobilenet_v2``: a Keras model laid out exactly like torchvision's MobileNetV2,
  so the ported weights give the same logits (checked to 1e-4 against torch's own output
  by tests/test_backbone.py). Where Keras and torch differ:
  * stride-2 3x3 convolutions get a symmetric 1-pixel ``ZeroPadding2D`` and ``valid``
    padding (Keras ``same`` pads only bottom/right for even inputs);
  * BatchNorm epsilon 1e-5 (Keras defaults to 1e-3), momentum 0.9 (torch's 0.1);
  * inputs are ImageNet-normalised RGB (``MEAN``/``STD``), not [-1, 1] like Keras'
    own MobileNetV2.
- ``load_backbone_npz`` and ``load_weights``: the weights as the model store keeps them
  (``<name>/backbones/mobilenet_v2_imagenet/``: one ``.npz`` of torch-named arrays plus the
  source file's sha256), checked against the architecture, into a built model;
  ``build_classifier`` and ``set_trainable_blocks`` for fine-tuning.

Getting the weights there (reading torch checkpoints, Keras' own weights, storing them) is
the operator's job: ``lensflow.backbone_import`` (``lensflow models backbone import``), never
in this image. numpy and the standard library at import; TensorFlow only inside the builders.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

NAME = "mobilenet_v2_imagenet"
NPZ_FILE = "weights.npz"
FEATURES = 1280  # width of the pooled feature vector

# ImageNet normalisation torchvision's weights were trained with, on RGB in [0, 1].
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# torchvision's MobileNetV2 inverted-residual settings: expansion t, channels c, repeats n,
# first stride s. Blocks are features.1 .. features.17; features.0 is the stem conv and
# features.18 the 1x1 conv to 1280.
BLOCK_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
NUM_BLOCKS = sum(n for _, _, n, _ in BLOCK_SETTINGS)  # 17
BN_EPSILON = 1e-5


def preprocessing() -> dict[str, Any]:
    """How to feed the backbone, for a version's metadata.

    ``scale`` and ``offset`` are per channel (R, G, B) on 8-bit pixel values:
    ``(p / 255 - mean) / std == p * scale + offset``.
    """
    return {
        "color": "RGB",
        "mean": list(MEAN),
        "std": list(STD),
        "scale": [1.0 / (255.0 * s) for s in STD],
        "offset": [-m / s for m, s in zip(MEAN, STD, strict=True)],
    }


def normalize(images: np.ndarray) -> np.ndarray:
    """RGB float images in [0, 1], channels last, to the backbone's input (float32)."""
    x = np.asarray(images, dtype=np.float32)
    return (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def load_backbone_npz(file: str | os.PathLike | IO[bytes]) -> tuple[dict[str, np.ndarray], str]:
    """(weights, source sha256) from a file written by ``save_backbone_npz``."""
    with np.load(file, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "source_sha256" not in arrays:
        raise ValueError("not a backbone file: no source_sha256")
    sha = str(arrays.pop("source_sha256"))
    check_weights(arrays, include_top=False)
    return arrays, sha


# --- the architecture ------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    index: int  # features.<index>
    inp: int
    out: int
    stride: int
    expand: int

    @property
    def hidden(self) -> int:
        return self.inp * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.inp == self.out


def _blocks() -> list[_Block]:
    blocks, inp, index = [], STEM_CHANNELS, 1
    for t, c, n, s in BLOCK_SETTINGS:
        for i in range(n):
            blocks.append(_Block(index, inp, c, s if i == 0 else 1, t))
            inp, index = c, index + 1
    return blocks


def expected_shapes(include_top: bool = True, num_classes: int = 1000) -> dict[str, tuple]:
    """Every tensor torchvision's MobileNetV2 state dict holds, with its torch shape."""
    shapes: dict[str, tuple] = {}

    def conv_bn(prefix: str, out: int, inp: int, k: int) -> None:
        shapes[f"{prefix}.0.weight"] = (out, inp, k, k)
        bn(f"{prefix}.1", out)

    def bn(prefix: str, ch: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{p}"] = (ch,)

    conv_bn("features.0", STEM_CHANNELS, 3, 3)
    for b in _blocks():
        p, i = f"features.{b.index}.conv", 0
        if b.expand != 1:
            conv_bn(f"{p}.0", b.hidden, b.inp, 1)
            i = 1
        conv_bn(f"{p}.{i}", b.hidden, 1, 3)  # depthwise: (C, 1, 3, 3)
        shapes[f"{p}.{i + 1}.weight"] = (b.out, b.hidden, 1, 1)
        bn(f"{p}.{i + 2}", b.out)
    conv_bn(f"features.{NUM_BLOCKS + 1}", FEATURES, BLOCK_SETTINGS[-1][1], 1)
    if include_top:
        shapes["classifier.1.weight"] = (num_classes, FEATURES)
        shapes["classifier.1.bias"] = (num_classes,)
    return shapes


def check_weights(weights: dict[str, np.ndarray], include_top: bool = True) -> None:
    """Raise ``ValueError`` unless ``weights`` holds every backbone tensor, shaped right."""
    num_classes = 1000
    if include_top and "classifier.1.bias" in weights:
        num_classes = int(weights["classifier.1.bias"].shape[0])
    shapes = expected_shapes(include_top, num_classes)
    missing = sorted(k for k in shapes if k not in weights)
    wrong = sorted(
        f"{k} {tuple(weights[k].shape)} != {shape}"
        for k, shape in shapes.items()
        if k in weights and tuple(weights[k].shape) != shape
    )
    if missing or wrong:
        raise ValueError(
            "not torchvision MobileNetV2 weights: "
            + "; ".join(
                ([f"missing {', '.join(missing[:5])}"] if missing else [])
                + ([f"shape {', '.join(wrong[:5])}"] if wrong else [])
            )
        )


def _layer(torch_prefix: str) -> str:
    return torch_prefix.replace(".", "_")


def build_mobilenet_v2(
    weights: dict[str, np.ndarray] | None,
    num_classes: int = 1000,
    include_top: bool = True,
    input_size: int = 224,
):
    """torchvision's MobileNetV2 as a ``keras.Model``, loaded with ``weights`` if given.

    Input: ``[batch, input_size, input_size, 3]`` float32, ImageNet-normalised RGB
    (``normalize``). With ``include_top``: dropout 0.2 and a linear layer to
    ``num_classes`` logits (no softmax, like torch). Without: the global average pooled
    1280-d feature vector. Layer names are the torch module paths with ``_`` for ``.``
    (``features_3_conv_1_0``), so ``set_trainable_blocks`` can find the blocks.
    """
    import keras

    layers = keras.layers

    def conv_bn_relu(x, prefix: str, filters: int, kernel: int, stride: int, depthwise: bool):
        name = _layer(prefix)
        if kernel == 3 and stride == 2:  # torch pads 1 on every side
            x = layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same"  # symmetric for stride 1
        if depthwise:
            x = layers.DepthwiseConv2D(
                kernel, stride, padding=padding, use_bias=False, name=f"{name}_0"
            )(x)
        else:
            x = layers.Conv2D(
                filters, kernel, stride, padding=padding, use_bias=False, name=f"{name}_0"
            )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.9, name=f"{name}_1")(x)
        return layers.ReLU(6.0, name=f"{name}_relu6")(x)

    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="image")
    x = conv_bn_relu(inputs, "features.0", STEM_CHANNELS, 3, 2, depthwise=False)
    for b in _blocks():
        p = f"features.{b.index}.conv"
        shortcut, i = x, 0
        if b.expand != 1:
            x = conv_bn_relu(x, f"{p}.0", b.hidden, 1, 1, depthwise=False)
            i = 1
        x = conv_bn_relu(x, f"{p}.{i}", b.hidden, 3, b.stride, depthwise=True)
        x = layers.Conv2D(b.out, 1, use_bias=False, name=_layer(f"{p}.{i + 1}"))(x)
        x = layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=0.9, name=_layer(f"{p}.{i + 2}")
        )(x)
        if b.residual:
            x = layers.Add(name=_layer(f"features.{b.index}.add"))([shortcut, x])
    x = conv_bn_relu(x, f"features.{NUM_BLOCKS + 1}", FEATURES, 1, 1, depthwise=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if include_top:
        x = layers.Dropout(0.2, name="classifier_0")(x)
        x = layers.Dense(num_classes, name="classifier_1")(x)
    model = keras.Model(inputs, x, name="mobilenet_v2" if include_top else "mobilenet_v2_features")
    if weights is not None:
        load_weights(model, weights, include_top=include_top)
    return model


def load_weights(model, weights: dict[str, np.ndarray], include_top: bool = True) -> None:
    """Copy torch-layout ``weights`` into a model from ``build_mobilenet_v2``.

    conv OIHW -> HWIO, depthwise (C, 1, H, W) -> (H, W, C, 1), BatchNorm
    (gamma, beta, running mean, running var), linear (out, in) -> (in, out).
    """
    num_classes = int(weights["classifier.1.bias"].shape[0]) if include_top else 1000
    shapes = expected_shapes(include_top, num_classes)
    check_weights(weights, include_top)
    prefixes = {k.rsplit(".", 1)[0] for k in shapes}
    for prefix in sorted(prefixes):
        layer = model.get_layer(_layer(prefix))
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":
            values = [weights[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
        elif kind == "Conv2D":
            values = [weights[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
        elif kind == "BatchNormalization":
            values = [
                weights[f"{prefix}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")
            ]
        elif kind == "Dense":
            values = [weights[f"{prefix}.weight"].T, weights[f"{prefix}.bias"]]
        else:  # pragma: no cover - the builder makes no other weighted layer
            raise TypeError(f"{layer.name}: unexpected layer type {kind}")
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])


def build_classifier(
    weights: dict[str, np.ndarray] | None,
    num_classes: int,
    input_size: int = 224,
    dropout: float = 0.2,
    seed: int = 0,
):
    """The pooled backbone under a new head: dropout and a softmax layer of ``num_classes``.

    The backbone starts frozen (``set_trainable_blocks(model, 0)``): only the head trains.
    """
    import keras

    keras.utils.set_random_seed(seed)
    backbone = build_mobilenet_v2(weights, include_top=False, input_size=input_size)
    x = keras.layers.Dropout(dropout, name="head_dropout")(backbone.output)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(backbone.input, outputs, name="mobilenet_v2_classifier")
    set_trainable_blocks(model, 0)
    return model


def set_trainable_blocks(model, top_blocks: int, train_batchnorm: bool = False) -> None:
    """Freeze the backbone except its top ``top_blocks`` inverted-residual blocks.

    0 freezes the whole backbone; with 1 or more the final 1x1 conv to 1280 trains too
    (it sits above every block); the stem conv never trains. Layers not from the backbone
    (a new head) are left as they are. Compile the model again afterwards: Keras fixes
    the trainable set at compile time.
    BatchNorm layers stay frozen, in inference mode, unless ``train_batchnorm``: with few
    labels and small batches, updating ImageNet's statistics hurts more than it helps.
    """
    if not 0 <= top_blocks <= NUM_BLOCKS:
        raise ValueError(f"top_blocks must be within 0..{NUM_BLOCKS}")
    first = NUM_BLOCKS + 1 - top_blocks if top_blocks else NUM_BLOCKS + 2
    for layer in model.layers:
        match = re.match(r"features_(\d+)_", layer.name)
        if match is None:
            continue
        trainable = int(match.group(1)) >= first
        if type(layer).__name__ == "BatchNormalization" and not train_batchnorm:
            trainable = False
        layer.trainable = trainable
