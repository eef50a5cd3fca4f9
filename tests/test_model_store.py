"""The model store against a real S3 server: publish, pointer CAS, rollback, pin, verify."""

from __future__ import annotations

import threading

import pytest

from lensflow_core.s3 import s3_client
from lensflow_model_store import (
    ConflictError,
    IntegrityError,
    InvalidModelError,
    ModelStore,
    NotFoundError,
    PinnedError,
)
from tests.support.env import LABELS


@pytest.fixture
def store(config) -> ModelStore:
    return ModelStore.from_config(config)


def test_publish_stores_immutable_numbered_versions(store, tiny_models):
    v1 = store.publish(tiny_models["random"], LABELS, metrics={"accuracy": 0.5})
    v2 = store.publish(tiny_models["first"], LABELS)
    assert (v1.version, v2.version) == ("v1", "v2")
    assert [v.version for v in store.list_versions()] == ["v1", "v2"]
    meta = store.get_version("v1").metadata
    assert meta["labels"] == LABELS and meta["metrics"] == {"accuracy": 0.5}
    assert meta["input"]["height"] == 32 and meta["input"]["scale"] == pytest.approx(1 / 255)
    assert store.read_file("v1", "model.tflite") == tiny_models["random"]
    key = "aerial/versions/v1/model.tflite"
    with pytest.raises(ConflictError):  # never overwritten
        store.objects.put(key, b"other", if_absent=True)


def test_publish_refuses_models_that_do_not_load_or_fit_their_labels(store, tiny_models):
    with pytest.raises(InvalidModelError, match="does not load"):
        store.publish(b"not a flatbuffer at all", LABELS)
    with pytest.raises(InvalidModelError, match="2 labels for a model with 3 outputs"):
        store.publish(tiny_models["random"], LABELS[:2])
    with pytest.raises(InvalidModelError, match="unique"):
        store.publish(tiny_models["random"], ["a", "a", "b"])
    assert store.list_versions() == []


def test_publish_refuses_a_model_the_runtime_cannot_feed_saying_why(store):
    from tests.support.tflite_models import unfeedable_classifiers

    models = unfeedable_classifiers()
    with pytest.raises(InvalidModelError, match="input type int16 is not one the runtime"):
        store.publish(models["int16"], LABELS)
    with pytest.raises(InvalidModelError, match="uint8 without a quantization scale"):
        store.publish(models["no_scale"], LABELS)
    assert store.list_versions() == []


def test_concurrent_publishers_get_distinct_versions(store, tiny_models):
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(store.publish(tiny_models["random"], LABELS).version)
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["v1", "v2", "v3", "v4"]


def test_flip_is_compare_and_swap_and_recorded(store, tiny_models):
    store.publish(tiny_models["random"], LABELS)
    store.publish(tiny_models["first"], LABELS)
    first = store.flip("v1", reason="seed", by="alice")
    assert (first.version, first.previous, first.sequence) == ("v1", None, 1)
    with pytest.raises(ConflictError, match="not v2"):
        store.flip("v2", expect="v2")
    second = store.flip("v2", expect="v1", reason="better", by="bob")
    assert (second.version, second.previous) == ("v2", "v1")
    back = store.rollback(reason="regression", by="carol")
    assert back.version == "v1" and back.action == "rollback"
    history = store.history()
    assert [(h["version"], h["from"], h["flipped_by"], h["action"]) for h in history] == [
        ("v1", None, "alice", "flip"),
        ("v2", "v1", "bob", "flip"),
        ("v1", "v2", "carol", "rollback"),
    ]


def test_two_flips_with_the_same_expect_exactly_one_wins(store, tiny_models):
    for model in ("random", "first", "last"):
        store.publish(tiny_models[model], LABELS)
    store.flip("v1")
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def flip(target: str) -> None:
        barrier.wait()
        try:
            outcomes[target] = store.flip(target, expect="v1").version
        except ConflictError as exc:
            outcomes[target] = exc

    threads = [threading.Thread(target=flip, args=(v,)) for v in ("v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v in outcomes.values() if isinstance(v, str)]
    assert len(winners) == 1
    assert store.current().version == winners[0]
    assert len(store.history()) == 2


def test_pointer_cas_refuses_a_stale_etag_written_by_someone_else(store, tiny_models):
    store.publish(tiny_models["random"], LABELS)
    store.publish(tiny_models["first"], LABELS)
    stale = store.flip("v1")
    store.flip("v2")
    with pytest.raises(ConflictError):
        store.pointer.write(stale, replacing=stale)  # its ETag is no longer current
    assert store.current().version == "v2"


def test_pin_blocks_automatic_promotion_but_not_operators(store, tiny_models):
    store.publish(tiny_models["random"], LABELS)
    store.publish(tiny_models["first"], LABELS)
    store.flip("v1")
    store.set_pinned(True, reason="investigating", by="ops")
    with pytest.raises(PinnedError):
        store.flip("v2", expect="v1", honour_pin=True)
    assert store.flip("v2", expect="v1", by="ops").pinned  # an operator may still flip
    assert not store.set_pinned(False).pinned
    assert store.flip("v1", expect="v2", honour_pin=True).version == "v1"


def test_verify_detects_tampering_and_flip_refuses_it(store, tiny_models, config):
    store.publish(tiny_models["random"], LABELS)
    assert store.verify("v1")["ok"]
    s3_client(config).put_object(
        Bucket=config.model_bucket, Key="aerial/versions/v1/model.tflite", Body=tiny_models["first"]
    )
    with pytest.raises(IntegrityError):
        store.verify("v1")
    with pytest.raises(IntegrityError):
        store.flip("v1")
    assert store.current() is None
    with pytest.raises(NotFoundError):
        store.flip("v9")


def test_read_if_changed_is_a_conditional_get(store, tiny_models):
    store.publish(tiny_models["random"], LABELS)
    pointer = store.flip("v1")
    assert store.pointer.read_if_changed(pointer.etag) is None
    store.publish(tiny_models["first"], LABELS)
    store.flip("v2")
    changed = store.pointer.read_if_changed(pointer.etag)
    assert changed is not None and changed.version == "v2"


def test_expect_no_pointer_fails_once_someone_flipped(store, tiny_models):
    from lensflow_model_store import NO_POINTER

    store.publish(tiny_models["random"], LABELS)
    store.publish(tiny_models["first"], LABELS)
    assert store.flip("v1", expect=NO_POINTER).version == "v1"
    with pytest.raises(ConflictError, match="pointer is at v1, not empty"):
        store.flip("v2", expect=NO_POINTER)
