"""Training rounds against the real S3 server: promote when better, never otherwise.

Training is kept to seconds: few images, few epochs. Champions that must lose are
untrained models (about chance) published straight into the store.
"""

from __future__ import annotations

import random

import pytest

from lensflow import scenes
from lensflow.seeding import seed_training_data
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_model_store import ModelStore, layout
from lensflow_model_store.rounds import RoundLog, summary
from lensflow_train import dataset
from lensflow_train.round import run_round

LABELS = sorted(scenes.CLASSES)


@pytest.fixture(scope="module")
def untrained_tflite() -> bytes:
    """A model of the right shape that has learnt nothing: any trained challenger beats it."""
    from lensflow_train import model as M

    return M.to_tflite(M.build_model(len(LABELS), seed=3))


def train_config(env: dict[str, str], **extra: str) -> Config:
    return Config.from_env({**env, "LENSFLOW_TRAIN_EPOCHS": "6", **extra})


def publish_champion(store: ModelStore, tflite: bytes, labeled_images: int = 0) -> str:
    info = store.publish(
        tflite, LABELS, metrics={"labeled_images": labeled_images}, created_by="test"
    )
    store.flip(info.version, reason="test champion", by="test")
    return info.version


def stored_rounds(store: ModelStore) -> list[dict]:
    """The round reports the model store keeps (``<name>/rounds/``), oldest first."""
    return RoundLog(store.objects, store.name).latest()


def test_no_holdout_changes_nothing(env):
    config = train_config(env)
    s3 = s3_client(config)
    dataset.upload(s3, config.train_bucket, layout.LABELED, scenes.labelled_set(3, 1), "x")
    report = run_round(config, force=True)
    assert report.outcome == "skipped" and "no holdout" in report.reason
    assert report.data["labeled_total"] == 3 * len(scenes.CLASSES)
    store = ModelStore.from_config(config)
    assert store.current() is None and store.list_versions() == []
    # even a round that did not train says why, in the model store
    [kept] = stored_rounds(store)
    assert kept["round_id"] == report.round_id and kept["decision"] == "refused: no data"
    assert "no holdout" in kept["reason"]


def test_missing_train_bucket_is_no_data(env):
    config = train_config(env, LENSFLOW_TRAIN_BUCKET="no-such-bucket-here")
    report = run_round(config)
    assert report.outcome == "skipped" and "no holdout" in report.reason


def test_seeding_is_additive_and_listing_counts_per_class(config):
    s3 = s3_client(config)
    seed_training_data(config, 2, 1, seed=4)
    seed_training_data(config, 3, 1, seed=4)
    labeled = dataset.list_split(s3, config.train_bucket, layout.LABELED)
    assert labeled.counts == {cls: 3 for cls in LABELS}
    assert labeled.labels == LABELS
    pictures = dataset.load(
        s3,
        config.train_bucket,
        labeled,
        [(96, 96)],
        config.max_image_pixels,
        config.max_image_bytes,
    )
    assert pictures.classes == labeled.classes and pictures.undecodable == []
    array = pictures.arrays[(96, 96)]
    assert array.shape == (len(labeled), 96, 96, 3) and array.dtype.name == "uint8"
    assert all(image.std() > 0 for image in array)  # every row holds a decoded scene


@pytest.mark.slow
def test_too_little_new_data_changes_nothing_unless_forced(env, untrained_tflite):
    config = train_config(env, LENSFLOW_TRAIN_MIN_NEW="20")
    store = ModelStore.from_config(config)
    seed_training_data(config, 5, 3, seed=1)  # 30 labelled images
    champion = publish_champion(store, untrained_tflite, labeled_images=20)  # 10 new

    report = run_round(config)
    assert report.outcome == "skipped"
    # a champion published by hand has no fingerprint: compared by count
    assert "10 labelled entries new or changed since" in report.reason
    assert report.data["new_since_champion"] == 10
    assert [v.version for v in store.list_versions()] == [champion]
    assert store.current().version == champion
    assert stored_rounds(store)[-1]["decision"] == "refused: no new data"

    forced = run_round(config, force=True)
    assert forced.outcome != "skipped"
    assert len(store.list_versions()) == 2


@pytest.mark.slow
def test_relabelling_is_new_data_though_the_count_stays(env):
    """Rounds compare the labelled set by (key, ETag, class): moving images between class
    folders, or replacing an image's bytes, counts; the same set does not."""
    config = train_config(env, LENSFLOW_TRAIN_EPOCHS="1", LENSFLOW_TRAIN_MIN_NEW="3")
    s3 = s3_client(config)
    store = ModelStore.from_config(config)
    seed_training_data(config, 4, 3, seed=1)
    first = run_round(config, force=True)
    version = first.challenger["version"]
    meta = store.get_version(version).metadata
    assert meta["metrics"]["labeled_fingerprint"] == first.data["fingerprint"]
    assert "fingerprint.json" in meta["files"]

    same = run_round(config)
    assert same.outcome == "skipped", same.reason
    assert "0 labelled entries new or changed" in same.reason

    bucket = config.train_bucket
    keys = dataset.list_split(s3, bucket, layout.LABELED).keys
    moved = [k for k in keys if k.startswith("labeled/field/")][:2]  # field -> forest
    for key in moved:
        new_key = key.replace("labeled/field/", "labeled/forest/was-field-")
        s3.copy_object(Bucket=bucket, Key=new_key, CopySource={"Bucket": bucket, "Key": key})
        s3.delete_object(Bucket=bucket, Key=key)
    two = run_round(config)
    assert two.data["labeled_total"] == first.data["labeled_total"]
    assert two.data["new_since_last_round"] == 2 and two.data["removed_since_last_round"] == 2
    assert two.outcome == "skipped" and "2 labelled entries" in two.reason

    # one more: an image replaced in place (same key, new bytes)
    key = dataset.list_split(s3, bucket, layout.LABELED).keys[-1]
    s3.put_object(Bucket=bucket, Key=key, Body=scenes.scene_jpeg("water", 77))
    three = run_round(config)
    assert three.data["new_since_last_round"] == 3
    assert three.outcome != "skipped", three.reason
    assert three.data["fingerprint"] != first.data["fingerprint"]


@pytest.mark.slow
def test_first_round_then_better_challenger_is_promoted(env):
    config = train_config(env)
    store = ModelStore.from_config(config)
    seed_training_data(config, 10, 15, seed=1)
    first = run_round(config)
    assert first.outcome == "promoted", first.reason
    assert "no champion yet" in first.reason
    v1 = first.challenger["version"]
    assert store.current().version == v1

    seed_training_data(config, 60, 15, seed=1)  # six times the data
    second = run_round(config)
    assert second.outcome == "promoted", second.reason
    v2 = second.challenger["version"]
    assert second.champion["version"] == v1
    assert second.challenger["warm_start"] == f"warm start from {v1}"
    champ = second.champion["evaluation"]
    chall = second.challenger["evaluation"]
    assert chall["macro_f1"] >= champ["macro_f1"] + config.train_margin
    assert set(chall["per_class"]) == set(LABELS)
    assert sum(map(sum, chall["confusion"])) == 15 * len(LABELS)

    pointer = store.current()
    assert pointer.version == v2 and pointer.flipped_by == "train"
    meta = store.get_version(v2).metadata
    assert meta["parent"] == v1 and meta["created_by"] == "train"
    assert meta["metrics"]["labeled_images"] == 60 * len(LABELS)
    assert {"keras.weights.h5", "report.json"} <= set(meta["files"])
    assert [h["version"] for h in store.history()] == [v1, v2]
    # the rounds as people see them: both models on the round's holdout, the decision
    kept = [summary(r) for r in stored_rounds(store)]
    assert [(r["round_id"], r["decision"]) for r in kept] == [
        (first.round_id, "promoted"),
        (second.round_id, "promoted"),
    ]
    assert kept[1]["champion"]["version"] == v1 and kept[1]["challenger"]["version"] == v2
    assert kept[1]["challenger"]["macro_f1"] == chall["macro_f1"]
    assert kept[1]["challenger"]["per_class_f1"] == {c: chall["per_class"][c]["f1"] for c in LABELS}
    assert kept[1]["champion"]["confusion"] == champ["confusion"]
    assert kept[1]["holdout_size"] == 15 * len(LABELS)
    assert kept[1]["labels_used"] == 60 * len(LABELS)
    assert pointer.metrics["per_class_f1"] == kept[1]["challenger"]["per_class_f1"]


@pytest.mark.slow
def test_worse_challenger_is_published_but_not_promoted(env):
    config = train_config(env)
    s3 = s3_client(config)
    store = ModelStore.from_config(config)
    seed_training_data(config, 40, 15, seed=1)
    first = run_round(config)
    assert first.outcome == "promoted", first.reason
    champion = first.challenger["version"]

    # The same number of images, but every label is a lie.
    for key in dataset.list_split(s3, config.train_bucket, layout.LABELED).keys:
        s3.delete_object(Bucket=config.train_bucket, Key=key)
    rng = random.Random(0)
    lies = [(rng.choice(LABELS), body) for _, body in scenes.labelled_set(40, seed=9)]
    dataset.upload(s3, config.train_bucket, layout.LABELED, lies, "shuffled")

    report = run_round(config, force=True)
    assert report.outcome == "not_promoted", report.reason
    assert "not better" in report.reason
    assert stored_rounds(store)[-1]["decision"] == "refused: margin"
    assert report.challenger["evaluation"]["macro_f1"] < report.champion["evaluation"]["macro_f1"]
    assert store.current().version == champion
    assert [v.version for v in store.list_versions()][-1] == report.challenger["version"]
    assert len(store.history()) == 1

    # The next tick does not retrain the loser on the same data.
    again = run_round(config)
    assert again.outcome == "skipped"
    assert f"the last round, which challenged {champion}" in again.reason
    assert len(store.list_versions()) == 2


@pytest.mark.slow
def test_pinned_pointer_is_respected(env, untrained_tflite):
    config = train_config(env)
    store = ModelStore.from_config(config)
    champion = publish_champion(store, untrained_tflite)
    store.set_pinned(True, reason="freeze for the demo", by="operator")
    seed_training_data(config, 20, 10, seed=1)
    s3_client(config).put_object(
        Bucket=config.train_bucket, Key="labeled/forest/broken.jpg", Body=b"not a jpeg"
    )

    report = run_round(config)
    assert report.outcome == "not_promoted"
    assert report.reason.startswith("not promoted: pinned")
    assert stored_rounds(store)[-1]["decision"] == "pinned"
    assert report.data["skipped_undecodable"]["labeled"] == ["labeled/forest/broken.jpg"]
    pointer = store.current()
    assert pointer.version == champion and pointer.pinned
    assert store.get_version(report.challenger["version"]).metadata["parent"] == champion


@pytest.mark.slow
def test_operator_flip_during_training_wins(env, untrained_tflite):
    config = train_config(env)
    store = ModelStore.from_config(config)
    champion = publish_champion(store, untrained_tflite)
    other = store.publish(untrained_tflite, LABELS, created_by="operator").version
    seed_training_data(config, 20, 10, seed=1)

    def operator(event):
        if event.stage == "train" and event.done == 1:  # mid-round, after the champion was read
            store.flip(other, expect=champion, reason="manual", by="operator")

    report = run_round(config, progress=operator)
    assert report.outcome == "not_promoted"
    assert report.reason.startswith("not promoted: pointer moved")
    assert stored_rounds(store)[-1]["decision"] == "refused: pointer moved"
    assert report.champion["version"] == champion
    assert store.current().version == other == report.pointer
    assert report.challenger["version"] not in {champion, other}


@pytest.mark.slow
def test_a_full_integer_champion_is_scored_on_the_holdout_like_any_other(env):
    """A uint8-in/uint8-out champion is judged on the holdout, not skipped as unreadable
    (which would let any challenger that beats chance replace it)."""
    from tests.support.tflite_models import tiny_classifier

    config = train_config(env, LENSFLOW_TRAIN_EPOCHS="1")
    store = ModelStore.from_config(config)
    seed_training_data(config, 3, 4, seed=1)
    always = LABELS.index("water")
    quantized = tiny_classifier(len(LABELS), size=96, seed=2, bias=always, full_integer=True)
    champion = publish_champion(store, quantized)
    assert store.get_version(champion).metadata["input"]["dtype"] == "uint8"

    report = run_round(config, force=True)
    assert report.champion["version"] == champion
    assert report.champion["problem"] is None
    evaluation = report.champion["evaluation"]
    assert evaluation["n"] == 4 * len(LABELS)
    # It always answers "water": right on exactly the water quarter of the holdout.
    assert evaluation["per_class"]["water"]["recall"] == 1.0
    assert evaluation["accuracy"] == round(1 / len(LABELS), 4)
    assert f"champion {champion}" in report.reason and "chance" not in report.reason


@pytest.mark.slow
@pytest.mark.parametrize("quantization,dtype", [("float16", "float32"), ("int8", "uint8")])
def test_a_quantized_challenger_is_judged_and_served_as_published(env, quantization, dtype):
    """The round converts as LENSFLOW_TRAIN_QUANTIZATION says, scores that very artifact,
    publishes it, and the predict function's runtime serves it with the same answers."""
    from lensflow_core.imaging import decode_image
    from lensflow_core.runtime import InputSpec
    from lensflow_predict.serving_model import ServingModel
    from lensflow_train.evaluate import evaluate_tflite

    config = train_config(env, LENSFLOW_TRAIN_QUANTIZATION=quantization, LENSFLOW_TRAIN_EPOCHS="3")
    store = ModelStore.from_config(config)
    seed_training_data(config, 12, 4, seed=1)
    report = run_round(config, force=True)
    assert report.challenger["quantization"] == quantization
    info = store.get_version(report.challenger["version"])
    assert info.metadata["input"]["dtype"] == dtype
    assert info.metadata["metrics"]["quantization"] == quantization

    stored = store.read_file(info.version, "model.tflite")
    s3 = s3_client(config)
    holdout = dataset.list_split(s3, config.train_bucket, layout.HOLDOUT)
    blobs = [s3.get_object(Bucket=config.train_bucket, Key=k)["Body"].read() for k in holdout.keys]
    again = evaluate_tflite(stored, info.labels, blobs, holdout.classes)
    assert again.confusion == report.challenger["evaluation"]["confusion"]

    served = ServingModel(
        config.model_name,
        info.version,
        info.sha256,
        stored,
        info.labels,
        InputSpec.from_metadata(info.metadata),
    )
    tops = [
        served.predict(decode_image(blob, (96, 96), max_pixels=10**8), top_k=1)[0]["label"]
        for blob in blobs
    ]
    right = sum(top == truth for top, truth in zip(tops, holdout.classes, strict=True))
    assert right / len(tops) == pytest.approx(again.accuracy, abs=1e-4)


@pytest.mark.slow
def test_a_round_publishes_its_fastest_artifact_that_keeps_the_quality(env, monkeypatch):
    """Every form is built, scored on the holdout and timed; the int8, faster and as good
    as float32 (within LENSFLOW_TRAIN_TOLERANCE), is what the round publishes and what the
    predict runtime serves; the report says which artifact and why."""
    from lensflow_core.runtime import InputSpec
    from lensflow_predict.serving_model import ServingModel
    from lensflow_train import artifacts

    measured = {}

    def pinned_speeds(built, *args):
        """The round's own timing runs, then speeds proportional to size are pinned: on a
        tiny model under a loaded machine int8 and float32 can time alike, and which is
        faster in earnest is `bench quant`'s to say (1.5x and more on MobileNetV2)."""
        real_time_artifacts(built, *args)
        for artifact in built:
            measured[artifact.name] = artifact.cpu_ms
            artifact.cpu_ms = len(artifact.tflite) / 1e5

    real_time_artifacts = artifacts.time_artifacts
    monkeypatch.setattr(artifacts, "time_artifacts", pinned_speeds)
    config = train_config(env, LENSFLOW_TRAIN_EPOCHS="4")
    store = ModelStore.from_config(config)
    seed_training_data(config, 24, 10, seed=1)
    report = run_round(config, force=True)
    assert sorted(measured) == ["float16", "float32", "int8"]
    assert all(ms > 0 for ms in measured.values()), measured  # the round did time them
    built = {a["name"]: a for a in report.challenger["artifacts"]}
    assert sorted(built) == ["float16", "float32", "int8"]  # no normalisation layer to fold
    best = max(a["macro_f1"] for a in built.values())
    int8, float32 = built["int8"], built["float32"]
    assert int8["macro_f1"] >= best - config.train_tolerance / 100, built
    assert int8["cpu_ms_per_image"] < float32["cpu_ms_per_image"], built
    assert report.challenger["artifact"] == "int8"
    assert report.challenger["artifact_reason"].startswith("int8: ")
    assert report.challenger["quantization"] == "int8"
    assert report.challenger["evaluation"]["macro_f1"] == int8["macro_f1"]
    info = store.get_version(report.challenger["version"])
    assert info.metadata["input"]["dtype"] == "uint8"
    assert info.metadata["metrics"]["artifact"] == "int8"
    assert report.outcome == "promoted" and store.current().version == info.version
    stored = store.read_file(info.version, "model.tflite")
    assert len(stored) == int8["size_bytes"] < float32["size_bytes"]
    served = ServingModel(
        "m", info.version, info.sha256, stored, info.labels, InputSpec.from_metadata(info.metadata)
    )
    assert served.runtime.spec.dtype == "uint8"
