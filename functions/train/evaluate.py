"""Score a ``.tflite`` artifact on labelled images, exactly as the predict function sees them.

LiteRT runs the model; ``lensflow.imaging.decode_image`` and ``lensflow.preprocess.to_input``
prepare every image, the same two calls the predict function makes. No TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from lensflow.config import SETTINGS
from lensflow.imaging import decode_image
from lensflow.preprocess import to_input

DEFAULT_MAX_PIXELS = int(next(s.default for s in SETTINGS if s.name == "LENSFLOW_MAX_IMAGE_PIXELS"))


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

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "n": self.n}


def predict_tflite(
    model: bytes,
    inputs: np.ndarray,
    num_threads: int = 2,
) -> np.ndarray:
    """Class indices LiteRT predicts for each float32 input of shape [n, h, w, 3]."""
    interpreter = Interpreter(model_content=model, num_threads=num_threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    predicted = np.empty(len(inputs), dtype=np.int64)
    for i in range(len(inputs)):
        interpreter.set_tensor(inp["index"], inputs[i : i + 1])
        interpreter.invoke()
        predicted[i] = int(np.argmax(interpreter.get_tensor(out["index"])[0]))
    return predicted


def input_shape(model: bytes) -> tuple[int, int]:
    """(height, width) of the model's input."""
    interpreter = Interpreter(model_content=model)
    _, h, w, _ = (int(d) for d in interpreter.get_input_details()[0]["shape"])
    return h, w


def prepare(
    blobs: Sequence[bytes],
    height: int,
    width: int,
    scale: float = 1 / 255,
    offset: float = 0.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Encoded images -> float32 [n, height, width, 3], exactly the predict function's way.

    Raises ``lensflow.imaging.ImageError`` for an image that does not decode.
    """
    out = np.empty((len(blobs), height, width, 3), np.float32)
    side = max(height, width)
    for i, data in enumerate(blobs):
        image = decode_image(data, (side, side), max_pixels=max_pixels)
        out[i] = to_input(image, height, width, scale, offset)[0]
    return out


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
    scale: float = 1 / 255,
    offset: float = 0.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Evaluation:
    """Score ``model`` on encoded images ``blobs`` whose true class names are ``classes``.

    The model's output index i means ``model_labels[i]``; a holdout class the model does
    not know counts as a miss. Metrics are reported over the union of both label sets.
    """
    start = time.perf_counter()
    h, w = input_shape(model)
    predicted_idx = predict_tflite(model, prepare(blobs, h, w, scale, offset, max_pixels))
    labels = list(model_labels) + sorted(set(classes) - set(model_labels))
    index = {label: i for i, label in enumerate(labels)}
    truth = [index[c] for c in classes]
    result = score(truth, [int(p) for p in predicted_idx], labels)
    result.seconds = round(time.perf_counter() - start, 3)
    return result
