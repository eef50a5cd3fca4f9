"""The serving model under threads, and the predict path's imports."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lensflow.scenes import CLASSES, render_scene
from lensflow_core.runtime import InputSpec
from lensflow_predict.serving_model import ServingModel
from tests.support.env import LABELS


def test_concurrent_predictions_equal_sequential_ones(tiny_models):
    model = ServingModel(
        "m",
        "v1",
        "-",
        tiny_models["random"],
        LABELS,
        InputSpec(32, 32, "float32", 1 / 255, 0.0),
        max_interpreters=3,
    )
    images = [render_scene(CLASSES[i % len(CLASSES)], i, (64, 48)) for i in range(24)]
    sequential = [model.predict(image) for image in images]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(model.predict, images * 4))
    assert concurrent == sequential * 4
    assert model.runtime.created <= 3  # never more interpreters than allowed


def test_labels_must_match_outputs(tiny_models):
    with pytest.raises(ValueError, match="2 labels for a model with 3 outputs"):
        ServingModel(
            "m",
            "v1",
            "-",
            tiny_models["random"],
            LABELS[:2],
            InputSpec(32, 32, "float32", 1 / 255, 0.0),
        )


def test_predict_path_never_imports_tensorflow():
    code = (
        "import sys, lensflow_predict.main, lensflow_predict.app; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
