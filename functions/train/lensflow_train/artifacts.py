"""A round's artifacts: the challenger in every form it may be served in, and which one wins.

The round converts its Keras model to each form ``LENSFLOW_TRAIN_QUANTIZATION`` names
(float32, float16, int8); a model that holds the ImageNet normalisation as a layer (the
pretrained backbone's) is also converted with the normalisation folded into its stem
convolution, for float32 and int8 (two elementwise operations fewer per picture: ~0.5 ms
of an int8 MobileNetV2 at 224, docs/benchmarks.md). Every artifact is scored on the
holdout and timed on this machine (input tensor + invoke, one thread, CPU time): the
fastest whose score is within ``LENSFLOW_TRAIN_TOLERANCE`` points of the best one's is
the one published. ``choose`` needs no TensorFlow; ``convert`` does.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lensflow_core.runtime import LiteModel
from lensflow_train.evaluate import Evaluation

FOLDED = ("float32", "int8")  # forms also built folded (float16 computes as float32)
TIMING_ROUNDS = 5  # the artifacts take turns, so that drifting load hits all alike
TIMING_S = 0.1  # per artifact and round


@dataclass
class Artifact:
    """One ``.tflite`` form of the challenger, its holdout evaluation and its speed."""

    quantization: str
    folded: bool
    tflite: bytes = field(repr=False)
    evaluation: Evaluation | None = None
    cpu_ms: float = float("nan")  # per picture: input tensor + invoke, one thread

    @property
    def name(self) -> str:
        return f"{self.quantization}+folded" if self.folded else self.quantization

    def score(self, metric: str) -> float:
        return float(getattr(self.evaluation, metric))

    def to_dict(self, metric: str) -> dict:
        return {
            "name": self.name,
            "quantization": self.quantization,
            "normalisation_folded": self.folded,
            "size_bytes": len(self.tflite),
            metric: self.score(metric) if self.evaluation else None,
            "cpu_ms_per_image": round(self.cpu_ms, 3),
        }


def convert(keras_model, quantizations, representative: np.ndarray, fold) -> list[Artifact]:
    """Every artifact of ``keras_model``: each of ``quantizations``, and folded too where
    ``fold`` (the model with its normalisation folded into the stem, or None) is given."""
    from lensflow_train import model as M  # TensorFlow

    built = []
    for folded, source in ((False, keras_model), (True, fold)):
        for quantization in quantizations:
            if folded and (source is None or quantization not in FOLDED):
                continue
            tflite = M.to_tflite(source, quantization, representative=representative)
            built.append(Artifact(quantization, folded, tflite))
    return built


def time_artifacts(
    artifacts: list[Artifact], pictures: np.ndarray, scale: float, offset: float
) -> None:
    """Set each artifact's ``cpu_ms``: input tensor + invoke of ``pictures`` (uint8 at the
    input size), one interpreter and thread each, taking turns; medians of thread CPU time
    (what other work on the machine takes from the core is not counted)."""
    images = [Image.fromarray(p) for p in pictures[:16]]
    runtimes = [LiteModel(a.tflite, scale=scale, offset=offset) for a in artifacts]
    runs: list[list[float]] = [[] for _ in artifacts]
    for runtime in runtimes:  # warm: first invokes set XNNPACK up
        runtime.classify(images[0])
    for _ in range(TIMING_ROUNDS):
        for i, runtime in enumerate(runtimes):
            count, started, cpu = 0, time.perf_counter(), time.thread_time()
            while time.perf_counter() - started < TIMING_S:
                runtime.classify(images[count % len(images)])
                count += 1
            runs[i].append((time.thread_time() - cpu) * 1000 / count)
    for artifact, cpu_ms in zip(artifacts, runs, strict=True):
        artifact.cpu_ms = statistics.median(cpu_ms)


def choose(
    artifacts: list[Artifact], metric: str, tolerance_points: float
) -> tuple[Artifact, Artifact, str]:
    """(published, best, why): ``best`` has the highest holdout ``metric`` (the faster of
    equals); ``published`` is the fastest artifact within ``tolerance_points`` (x 0.01 of
    the metric) of it."""
    best = max(artifacts, key=lambda a: (a.score(metric), -a.cpu_ms))
    floor = best.score(metric) - tolerance_points / 100
    eligible = [a for a in artifacts if a.score(metric) >= floor - 1e-9]
    chosen = min(eligible, key=lambda a: a.cpu_ms)
    if chosen is best:
        others = [a for a in artifacts if a is not best]
        faster = [a.name for a in others if a.cpu_ms < best.cpu_ms]
        why = (
            f"{best.name}: the best {metric} ({best.score(metric):.4f}) and the fastest "
            f"({best.cpu_ms:.2f} ms an image)"
            if not faster
            else f"{best.name}: the best {metric} ({best.score(metric):.4f}); the faster "
            f"{', '.join(faster)} lose more than {tolerance_points:g} points"
        )
        return chosen, best, why
    why = (
        f"{chosen.name}: {chosen.cpu_ms:.2f} ms an image against {best.name}'s "
        f"{best.cpu_ms:.2f} ({best.cpu_ms / chosen.cpu_ms:.2f}x), {metric} "
        f"{chosen.score(metric):.4f} within {tolerance_points:g} points of the best "
        f"({best.name} {best.score(metric):.4f})"
    )
    return chosen, best, why
