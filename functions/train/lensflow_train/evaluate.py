"""Score a ``.tflite`` artifact on labelled images, exactly as the predict function sees them.

``lensflow_core.imaging.decode_image`` decodes every image and ``lensflow_core.runtime``
feeds it to LiteRT, the same two steps the predict function takes, quantized models
included. A round's holdout arrives already decoded and resized to the model's input
(``dataset.load``, the same decode and resize): ``evaluate_pictures``. No TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from lensflow_core.imaging import decode_image
from lensflow_core.runtime import DEFAULT_OFFSET, DEFAULT_SCALE, LiteModel
from lensflow_core.settings import default

DEFAULT_MAX_PIXELS = int(default("LENSFLOW_MAX_IMAGE_PIXELS"))


@dataclass
class Evaluation:
    """Metrics of one model on one labelled set; ``labels`` orders the confusion matrix."""

    labels: list[str]
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)  # rows: truth, columns: predicted
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """What a version's metadata and its flip keep: the headline figures and each
        class's F1 (the serving model's score across versions, per class)."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "n": self.n,
            "per_class_f1": {label: m["f1"] for label, m in self.per_class.items()},
        }


def predict_classes(
    model: bytes,
    blobs: Sequence[bytes],
    *,
    scale: float = DEFAULT_SCALE,
    offset: float = DEFAULT_OFFSET,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int = 2,
) -> np.ndarray:
    """Class indices LiteRT predicts for encoded images ``blobs``, the predict function's way.

    Raises ``lensflow_core.imaging.ImageError`` for an image that does not decode.
    """
    runtime = LiteModel(model, scale=scale, offset=offset, num_threads=num_threads)
    side = max(runtime.spec.height, runtime.spec.width)
    predicted = np.empty(len(blobs), dtype=np.int64)
    for i, data in enumerate(blobs):
        image = decode_image(data, (side, side), max_pixels=max_pixels)
        predicted[i] = int(np.argmax(runtime.classify(image)))
    return predicted


def predict_pictures(
    model: bytes,
    images: np.ndarray,
    *,
    scale: float = DEFAULT_SCALE,
    offset: float = DEFAULT_OFFSET,
    num_threads: int = 2,
) -> np.ndarray:
    """Class indices LiteRT predicts for uint8 RGB ``images`` [n, height, width, 3] already
    at the model's input size (what ``dataset.load`` makes)."""
    runtime = LiteModel(model, scale=scale, offset=offset, num_threads=num_threads)
    if images.shape[1:3] != (runtime.spec.height, runtime.spec.width):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]}, the model takes "
            f"{runtime.spec.height}x{runtime.spec.width}"
        )
    predicted = np.empty(len(images), dtype=np.int64)
    for i, pixels in enumerate(images):
        predicted[i] = int(np.argmax(runtime.classify(Image.fromarray(pixels))))
    return predicted


def score(truth: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> Evaluation:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        cm[t, p] += 1
    n = int(cm.sum())
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, label in enumerate(labels):
        tp = cm[i, i]
        predicted_i, actual_i = cm[:, i].sum(), cm[i, :].sum()
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(actual_i),
        }
        if actual_i:
            f1s.append(f1)
    return Evaluation(
        labels=list(labels),
        n=n,
        accuracy=round(float(np.trace(cm) / n), 4) if n else 0.0,
        macro_f1=round(float(np.mean(f1s)), 4) if f1s else 0.0,
        per_class=per_class,
        confusion=cm.tolist(),
    )


def evaluate_tflite(
    model: bytes,
    model_labels: Sequence[str],
    blobs: Sequence[bytes],
    classes: Sequence[str],
    *,
    scale: float = DEFAULT_SCALE,
    offset: float = DEFAULT_OFFSET,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Evaluation:
    """Score ``model`` on encoded images ``blobs`` whose true class names are ``classes``.

    The model's output index i means ``model_labels[i]``; a holdout class the model does
    not know counts as a miss. Metrics are reported over the union of both label sets.
    """
    start = time.perf_counter()
    predicted = predict_classes(model, blobs, scale=scale, offset=offset, max_pixels=max_pixels)
    return _evaluation(predicted, model_labels, classes, start)


def evaluate_pictures(
    model: bytes,
    model_labels: Sequence[str],
    images: np.ndarray,
    classes: Sequence[str],
    *,
    scale: float = DEFAULT_SCALE,
    offset: float = DEFAULT_OFFSET,
) -> Evaluation:
    """``evaluate_tflite`` on images decoded and resized to the model's input already."""
    start = time.perf_counter()
    predicted = predict_pictures(model, images, scale=scale, offset=offset)
    return _evaluation(predicted, model_labels, classes, start)


def _evaluation(
    predicted: np.ndarray, model_labels: Sequence[str], classes: Sequence[str], start: float
) -> Evaluation:
    labels = list(model_labels) + sorted(set(classes) - set(model_labels))
    index = {label: i for i, label in enumerate(labels)}
    truth = [index[c] for c in classes]
    result = score(truth, [int(p) for p in predicted], labels)
    result.seconds = round(time.perf_counter() - start, 3)
    return result
