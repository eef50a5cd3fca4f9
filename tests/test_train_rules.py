"""A round's rules, without TensorFlow: whether it trains at all, and which artifact it serves."""

from __future__ import annotations

import pytest

from lensflow_core.settings import Config
from lensflow_model_store import VersionInfo
from lensflow_train import dataset
from lensflow_train.artifacts import Artifact, choose
from lensflow_train.evaluate import Evaluation
from lensflow_train.round import _Data, _refusal


def artifact(name: str, macro_f1: float, cpu_ms: float) -> Artifact:
    quantization, _, folded = name.partition("+")
    evaluation = Evaluation(["a", "b"], 100, macro_f1, macro_f1)
    return Artifact(quantization, bool(folded), b"tflite", evaluation, cpu_ms)


def test_the_fastest_artifact_within_the_tolerance_of_the_best_is_published():
    built = [
        artifact("float32", 0.950, 7.6),
        artifact("float16", 0.950, 7.7),
        artifact("int8", 0.942, 4.0),
        artifact("int8+folded", 0.935, 3.5),  # 1.5 points below the best: too far
    ]
    chosen, best, why = choose(built, "macro_f1", 1.0)
    assert (chosen.name, best.name) == ("int8", "float32")
    assert "int8: 4.00 ms an image against float32's 7.60 (1.90x)" in why
    assert "within 1 points of the best (float32 0.9500)" in why
    chosen, _, why = choose(built, "macro_f1", 2.0)
    assert chosen.name == "int8+folded"
    chosen, best, why = choose(built, "macro_f1", 0.0)  # no loss allowed: the faster equal
    assert chosen is best and chosen.name == "float32"
    assert "the faster int8, int8+folded lose more than 0 points" in why


def test_the_best_and_fastest_needs_no_trade():
    built = [artifact("float32", 0.90, 7.6), artifact("int8", 0.93, 4.0)]
    chosen, best, why = choose(built, "accuracy", 1.0)
    assert chosen is best and chosen.name == "int8"
    assert why.startswith("int8: the best accuracy (0.9300) and the fastest")


def split(name: str, per_class: dict[str, int]) -> dataset.Split:
    out = dataset.Split(name)
    for cls, n in per_class.items():
        out.classes += [cls] * n
        out.keys += [f"{name}/{cls}/{i}.jpg" for i in range(n)]
    return out


@pytest.mark.parametrize(
    "labeled, holdout, new, force, settings, reason",
    [
        ({"a": 5, "b": 5}, {}, 10, False, {}, "no holdout images"),
        ({"a": 5}, {"a": 2}, 10, False, {}, "at least two classes"),
        ({"a": 5, "b": 5}, {"a": 2}, 3, False, {}, "3 labelled entries new or changed since v1"),
        ({"a": 5, "b": 5}, {"a": 2}, 3, True, {}, ""),  # forced
        ({"a": 5, "b": 5}, {"a": 2}, 50, False, {}, ""),
        (
            {"a": 5, "b": 5},
            {"a": 2},
            50,
            False,
            {"LENSFLOW_TRAIN_MAX_IMAGES": "11"},
            "12 labelled and holdout images, over LENSFLOW_TRAIN_MAX_IMAGES (11)",
        ),
    ],
)
def test_whether_a_round_trains(labeled, holdout, new, force, settings, reason):
    config = Config.from_env({"LENSFLOW_TRAIN_MIN_NEW": "20", **settings})
    champion = VersionInfo("v1", "ab" * 32, {"labels": ["a", "b"]})
    data = _Data(split("labeled", labeled), split("holdout", holdout), champion, [])
    refusal = _refusal(config, data, champion, new, force)
    assert (reason in refusal) if reason else refusal == ""
