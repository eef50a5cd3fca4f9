"""The predict function as Knative runs it: a real server, real S3, a real broker."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
import requests
from cloudevents.http import from_http
from PIL import Image

from lensflow.scenes import scene_jpeg
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, notification_record
from lensflow_eventing.topics import ensure_topics, topic_specs
from lensflow_model_store import ModelStore
from tests.support.env import LABELS, make_env
from tests.support.functions_harness import FunctionServer, knative_post, put_and_notify
from tests.support.images import png_with_declared_size
from tests.support.kafka_reading import read_topic
from tests.support.predict import start_stack


@pytest.fixture(scope="module")
def served(s3_server, kafka_broker, tiny_models, tmp_path_factory):
    """One predict replica for the input tests: small limits to test them cheaply."""
    from lensflow_core.s3 import ensure_buckets

    env = make_env(
        s3_server.endpoint,
        kafka_broker.bootstrap,
        LENSFLOW_MAX_IMAGE_BYTES="200000",
        LENSFLOW_MAX_IMAGE_PIXELS="4000000",
    )
    config = Config.from_env(env)
    ensure_buckets(s3_client(config), [*config.buckets, "private"])
    config, store = start_stack(env, tiny_models)
    log = tmp_path_factory.mktemp("predict") / "predict.log"
    with FunctionServer("predict", env, log) as server:
        yield server, config, s3_client(config)


def test_upload_event_becomes_a_prediction_event_on_the_topic(served):
    server, config, s3 = served
    bucket = config.image_buckets[0]
    reply = put_and_notify(
        server.url,
        config,
        s3,
        bucket,
        "flights/day 1/a.jpg",
        scene_jpeg("water", 3, (320, 240), 85),
    )
    assert reply.status_code == 200, reply.text
    event = from_http(reply.headers, reply.content)
    assert event["type"] == "io.lensflow.image.predicted"
    assert event["source"] == "/lensflow/predict"
    assert event["subject"] == f"{bucket}/flights/day 1/a.jpg"
    data = event.data
    assert data["model"]["version"] == "v1" and data["model"]["name"] == "aerial"
    assert data["predictions"][0]["label"] == "field"  # the always-class-0 model
    assert data["image"]["key"] == "flights/day 1/a.jpg" and data["image"]["etag"]
    assert data["source_event_id"] == "partition:0/offset:0"
    messages = read_topic(config, config.topic_predictions, 1, timeout_s=20)
    assert [m.key() for m in messages] == [f"{bucket}/flights/day 1/a.jpg".encode()]
    produced = json.loads(messages[0].value())
    assert produced["model"]["sha256"] == data["model"]["sha256"]


def png(size) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


BAD_OBJECTS = {
    "empty": (b"", 422),
    "not-an-image": (b"%PDF-1.4 not an image" * 20, 415),
    "truncated": (scene_jpeg("road", 1, (320, 240), 90)[:1500], 422),
    "bomb": (png_with_declared_size(50_000, 50_000), 413),
    "too-many-pixels": (None, 413),  # filled in below: 2500x2000 > 4 MP limit, small file
    "too-many-bytes": (png((400, 400)), 413),  # noise: ~480 kB > 200 kB
}


@pytest.mark.parametrize("case", sorted(BAD_OBJECTS))
def test_bad_images_answer_a_permanent_4xx_and_the_function_keeps_serving(served, case):
    server, config, s3 = served
    data, status = BAD_OBJECTS[case]
    if data is None:
        buffer = io.BytesIO()
        Image.new("L", (2500, 2000)).save(buffer, "PNG")
        data = buffer.getvalue()
    reply = put_and_notify(server.url, config, s3, config.image_buckets[0], f"bad/{case}", data)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]
    ok = put_and_notify(
        server.url,
        config,
        s3,
        config.image_buckets[0],
        "good.jpg",
        scene_jpeg("forest", 2, (160, 120), 85),
    )
    assert ok.status_code == 200


def test_bad_events_answer_400_or_422_or_skip(served):
    server, config, s3 = served
    bucket = config.image_buckets[0]
    assert knative_post(server.url, config, b"{not json").status_code == 400
    assert knative_post(server.url, config, b'{"Records": []}').status_code == 400
    assert knative_post(server.url, config, b'{"Records": [{"eventName": 1}]}').status_code == 400
    no_ce = requests.post(server.url, data=b"{}", timeout=10)
    assert no_ce.status_code == 400 and "CloudEvent" in no_ce.json()["error"]
    _, missing = notification_record(
        ObjectEvent("s3:ObjectCreated:Put", bucket, "gone.jpg", "e", 10)
    )
    assert knative_post(server.url, config, missing).status_code == 422
    s3.put_object(Bucket="private", Key="x.jpg", Body=scene_jpeg("road", 1, (64, 64), 80))
    _, private = notification_record(
        ObjectEvent("s3:ObjectCreated:Put", "private", "x.jpg", "e", 10)
    )
    reply = knative_post(server.url, config, private)
    assert reply.status_code == 422 and "not in LENSFLOW_IMAGE_BUCKETS" in reply.json()["error"]
    _, removed = notification_record(ObjectEvent("s3:ObjectRemoved:Delete", bucket, "a.jpg"))
    reply = knative_post(server.url, config, removed)
    assert reply.status_code == 200 and "skipped" in reply.json()
    s3.put_object(Bucket=bucket, Key="big/m.jpg", Body=scene_jpeg("road", 2, (64, 64), 80))
    _, multipart = notification_record(
        ObjectEvent("s3:ObjectCreated:CompleteMultipartUpload", bucket, "big/m.jpg", "e", 100)
    )
    assert knative_post(server.url, config, multipart).status_code == 200
    own = ((config.train_bucket, "to-label/v1/x.json"), (config.model_bucket, "aerial/lock.json"))
    for own_bucket, own_key in own:  # what lensflow wrote, announced by a shared bucket
        _, value = notification_record(ObjectEvent("s3:ObjectCreated:Put", own_bucket, own_key))
        reply = knative_post(server.url, config, value)
        assert reply.status_code == 200, reply.text
        assert "lensflow's own object" in reply.json()["skipped"]
    _, drones = notification_record(ObjectEvent("s3:ObjectCreated:Put", bucket, "labeled/x.jpg"))
    assert knative_post(server.url, config, drones).status_code == 422  # a drone's: no skip
    metrics = server.stats()
    assert metrics["requests"]["400"] >= 4 and metrics["skipped"] >= 3


def test_no_model_yet_and_store_unreachable_answer_503(kafka_broker, tiny_models, tmp_path):
    from lensflow.servers import S3Server
    from lensflow_core.s3 import ensure_buckets

    with S3Server() as s3_server:
        env = make_env(s3_server.endpoint, kafka_broker.bootstrap)
        config = Config.from_env(env)
        s3 = s3_client(config)
        ensure_buckets(s3, config.buckets)
        config, store = start_stack(env, tiny_models, flip=None)
        with FunctionServer("predict", env, tmp_path / "predict.log") as server:
            image = scene_jpeg("water", 1, (96, 96), 85)
            reply = put_and_notify(server.url, config, s3, config.image_buckets[0], "a.jpg", image)
            assert reply.status_code == 503 and "no model" in reply.json()["error"]
            _, again = notification_record(
                ObjectEvent(
                    "s3:ObjectCreated:Put", config.image_buckets[0], "a.jpg", "e", len(image)
                )
            )
            store.flip("v2")
            deadline = time.monotonic() + 5
            while server.stats()["model"] is None and time.monotonic() < deadline:
                time.sleep(0.1)
            reply = knative_post(server.url, config, again)
            assert reply.status_code == 200 and reply.json()["model"]["version"] == "v2"
            s3_server.stop()
            reply = knative_post(server.url, config, again)
            assert reply.status_code == 503, reply.text
            assert server.stats()["model"]["version"] == "v2"  # still serving


def test_a_prediction_the_broker_refuses_answers_503_and_counts_only_once_acknowledged(
    s3_server, kafka_broker, tiny_models, tmp_path
):
    """The ack is awaited on the event loop: a refused produce still answers 503 (retried),
    never 200, and a prediction counts only once the broker has it."""
    from lensflow_core.s3 import ensure_buckets
    from lensflow_eventing.topics import TopicSpec

    env = make_env(s3_server.endpoint, kafka_broker.bootstrap)
    config, store = start_stack(env, tiny_models)
    missing = f"{config.topic_predictions}-not-yet"
    env = {**env, "LENSFLOW_TOPIC_PREDICTIONS": missing}
    s3 = s3_client(config)
    ensure_buckets(s3, config.buckets)
    with FunctionServer("predict", env, tmp_path / "predict.log") as server:
        image = scene_jpeg("water", 2, (96, 96), 85)
        bucket = config.image_buckets[0]
        reply = put_and_notify(server.url, config, s3, bucket, "refused.jpg", image)
        assert reply.status_code == 503, reply.text
        assert missing in reply.json()["error"]
        _, again = notification_record(
            ObjectEvent("s3:ObjectCreated:Put", bucket, "refused.jpg", "e", len(image))
        )
        assert server.stats()["predictions"] == 0
        assert server.stats()["requests"].get("503") == 1
        ensure_topics(config.kafka_bootstrap, [TopicSpec(missing, 1, 1)])
        deadline = time.monotonic() + 60  # as the dispatcher would: again, until it is seen
        while (reply := knative_post(server.url, config, again)).status_code == 503:
            assert time.monotonic() < deadline, reply.text
            time.sleep(1)
        assert reply.status_code == 200, reply.text
        refused = server.stats()["requests"]["503"]
        assert server.stats()["predictions"] == 1 and refused >= 1
        assert server.stats()["requests"].get("200") == 1
        [record] = read_topic(config, missing, 1)
        assert json.loads(record.value())["image"]["key"] == "refused.jpg"


@pytest.mark.parametrize("batch_delay_ms", ["0", "20"])
def test_live_swap_under_concurrent_load_drops_nothing(
    kafka_env, tiny_models, tmp_path, batch_delay_ms
):
    """With micro-batching on too: a batch never mixes versions, and every answer is its
    version's."""
    kafka_env = {**kafka_env, "LENSFLOW_BATCH_DELAY_MS": batch_delay_ms}
    config, store = start_stack(kafka_env, tiny_models, flip="first")
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    s3.put_object(Bucket=bucket, Key="p.jpg", Body=scene_jpeg("field", 1, (200, 150), 85))
    _, value = notification_record(ObjectEvent("s3:ObjectCreated:Put", bucket, "p.jpg", "e", 100))
    expected_label = {"v1": LABELS[0], "v2": LABELS[2]}
    results: list[tuple[float, int, str | None, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            reply = knative_post(server.url, config, value, session=session)
            data = reply.json() if reply.status_code == 200 else {}
            version = data.get("model", {}).get("version")
            label = data.get("predictions", [{}])[0].get("label")
            results.append((time.monotonic(), reply.status_code, version, label))

    ttl = config.pointer_ttl_s
    with FunctionServer("predict", kafka_env, tmp_path / "predict.log") as server:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        flipped_at = time.monotonic()
        store.flip("v2", expect="v1", reason="swap under load")
        time.sleep(ttl + 1.5)
        stop.set()
        for t in threads:
            t.join()
        metrics = server.stats()
    assert len(results) > 20
    assert all(status == 200 for _, status, _, _ in results), {r[1] for r in results}
    assert all(
        version in ("v1", "v2") and label == expected_label[version]
        for _, _, version, label in results
    )
    late = [version for at, _, version, _ in results if at > flipped_at + ttl + 1.0]
    assert late and set(late) == {"v2"}
    assert metrics["model_swaps"] == 2 and metrics["model_refusals"] == 0
    if batch_delay_ms != "0":  # batches of more than one did run
        assert metrics["batches"]["images"] > metrics["batches"]["batches"]


def test_corrupt_or_mismatched_models_are_refused_and_the_old_one_keeps_serving(
    kafka_env, tiny_models, tmp_path
):
    config, store = start_stack(kafka_env, tiny_models, flip="first")
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    with FunctionServer("predict", kafka_env, tmp_path / "predict.log") as server:
        # v2's bytes replaced behind the store's back, pointer written directly (no flip check)
        s3.put_object(
            Bucket=config.model_bucket,
            Key="aerial/versions/v2/model.tflite",
            Body=tiny_models["random"],
        )
        pointer = store.current()
        from dataclasses import replace

        store.pointer.write(
            replace(
                pointer,
                version="v2",
                sha256=store.get_version("v2").sha256,
                sequence=pointer.sequence + 1,
            ),
            replacing=pointer,
        )
        deadline = time.monotonic() + 5
        while server.stats()["model_refusals"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics = server.stats()
        assert metrics["model_refusals"] == 1 and "v2" in metrics["last_refusal"]
        reply = put_and_notify(
            server.url, config, s3, bucket, "a.jpg", scene_jpeg("water", 1, (96, 96), 85)
        )
        assert reply.status_code == 200 and reply.json()["model"]["version"] == "v1"
        # a pointer whose digest names other bytes than the version's
        pointer = store.current()
        store.pointer.write(
            replace(pointer, version="v1", sha256="0" * 64, sequence=pointer.sequence + 1),
            replacing=pointer,
        )
        deadline = time.monotonic() + 5
        while server.stats()["model_refusals"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.stats()["model"]["version"] == "v1"
        assert server.stats()["model_refusals"] == 2


def test_a_full_integer_model_is_served_through_the_function(kafka_env, tmp_path):
    """A uint8-in/uint8-out version (what LENSFLOW_TRAIN_QUANTIZATION=int8 publishes) is
    served like any other: same answer over HTTP as the runtime gives for the picture."""
    from lensflow_core.imaging import decode_image
    from lensflow_core.runtime import LiteModel
    from tests.support.tflite_models import tiny_classifier

    config = Config.from_env(kafka_env)
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    store = ModelStore.from_config(config)
    quantized = tiny_classifier(len(LABELS), seed=4, full_integer=True)  # scores vary
    info = store.publish(quantized, LABELS)
    assert info.metadata["input"]["dtype"] == "uint8"
    store.flip(info.version, reason="test")
    photo = scene_jpeg("forest", 2, (320, 240), 85)
    scores = LiteModel(quantized).classify(decode_image(photo, (32, 32), max_pixels=10**8))
    with FunctionServer("predict", kafka_env, tmp_path / "predict.log") as server:
        s3 = s3_client(config)
        reply = put_and_notify(server.url, config, s3, config.image_buckets[0], "q.jpg", photo)
    assert reply.status_code == 200, reply.text
    top = from_http(reply.headers, reply.content).data["predictions"][0]
    assert top["label"] == LABELS[int(scores.argmax())]
    assert 0.34 < float(scores.max()) < 0.99  # not a constant answer
    assert top["score"] == pytest.approx(float(scores.max()), abs=1e-5)
