"""Topics, ``lensflow upload`` and ``lensflow predictions tail`` against Tansu and moto."""

from __future__ import annotations

import json
import time

import pytest
from cloudevents.conversion import to_json
from cloudevents.kafka import KafkaMessage, to_binary
from confluent_kafka import Consumer, Producer

from lensflow.cli import main
from lensflow.upload import upload_files
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import OBJECT_CREATED_PUT, ObjectEvent, prediction_event
from lensflow_eventing.producer import ProduceError, make_producer, send
from lensflow_eventing.topics import ensure_topics, topic_specs
from tests.support.kafka_reading import read_topic


def test_ensure_topics_creates_once_with_the_partition_counts(kafka_config):
    first = ensure_topics(kafka_config.kafka_bootstrap, topic_specs(*kafka_config.topics))
    assert set(first.values()) == {"created"}
    again = ensure_topics(kafka_config.kafka_bootstrap, topic_specs(*kafka_config.topics))
    assert again == dict.fromkeys(first, "exists")
    admin_topics = Consumer(
        {"bootstrap.servers": kafka_config.kafka_bootstrap, "group.id": "x"}
    ).list_topics(timeout=10)
    counts = {
        name: len(admin_topics.topics[name].partitions)
        for name in (
            kafka_config.topic_images,
            kafka_config.topic_predictions,
            kafka_config.topic_dlq,
        )
    }
    assert list(counts.values()) == [6, 3, 1]


def test_upload_is_a_plain_put_and_publishes_nothing_itself(kafka_config, tmp_path):
    """The event is the bucket notification's job (tests/test_s3_notify.py); this S3
    server announces nothing, so nothing may reach the topic."""
    config = kafka_config
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    image = tmp_path / "img 01+x.jpg"
    image.write_bytes(b"\xff\xd8\xff fake jpeg")
    [uploaded] = upload_files(config, [image], prefix="flight 7/day 1/")
    bucket = config.image_buckets[0]
    key = "flight 7/day 1/img 01+x.jpg"
    head = s3_client(config).head_object(Bucket=bucket, Key=key)
    assert (uploaded.bucket, uploaded.key, uploaded.size) == (bucket, key, 13)
    assert uploaded.etag == head["ETag"].strip('"') and head["ContentType"] == "image/jpeg"
    assert read_topic(config, config.topic_images, 1, timeout_s=2) == []


def test_upload_cli_prints_what_it_stored(env, config, tmp_path, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    files = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for f in files:
        f.write_bytes(b"x" * 5)
    assert main(["upload", *map(str, files), "--prefix", "p", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["key"], r["content_type"], r["size"]) for r in rows] == [
        ("p/a.png", "image/png", 5),
        ("p/b.jpg", "image/jpeg", 5),
    ]
    listed = s3_client(config).list_objects_v2(Bucket=config.image_buckets[0])["Contents"]
    assert {o["Key"] for o in listed} == {"p/a.png", "p/b.jpg"}

    assert main(["upload", str(tmp_path / "missing.jpg"), "--json"]) == 1
    assert "no such file" in json.loads(capsys.readouterr().out)["error"]
    assert main(["upload", str(files[0]), "--bucket", "no-such-bucket", "--json"]) == 1
    assert "upload failed" in json.loads(capsys.readouterr().out)["error"]


def publish_prediction(producer: Producer, config: Config, key: str, label: str, score: float):
    image = ObjectEvent(OBJECT_CREATED_PUT, config.image_buckets[0], key, etag="e1")
    event = prediction_event(
        image=image,
        model={"name": "aerial", "version": "v7", "sha256": "0" * 64},
        predictions=[{"label": label, "score": score}, {"label": "other", "score": 0.01}],
        source_event_id="partition:0/offset:1",
    )
    message = to_binary(event)
    producer.produce(
        config.topic_predictions,
        key=message.key,
        value=message.value,
        headers=list(message.headers.items()),
    )


def test_predictions_tail(kafka_env, kafka_config, monkeypatch, capsys):
    for name, value in kafka_env.items():
        monkeypatch.setenv(name, value)
    config = kafka_config
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    producer = Producer({"bootstrap.servers": config.kafka_bootstrap})
    for i in range(5):
        publish_prediction(producer, config, f"f/{i}.jpg", f"label{i}", 0.5 + i / 10)
    assert producer.flush(10) == 0
    assert main(["predictions", "tail", "--from-beginning", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    bucket = config.image_buckets[0]
    assert sorted(r["subject"] for r in rows) == [f"{bucket}/f/{i}.jpg" for i in range(5)]
    row = next(r for r in rows if r["subject"].endswith("/3.jpg"))
    assert (row["label"], row["score"], row["model_version"]) == ("label3", 0.8, "v7")

    assert main(["predictions", "tail", "-n", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("model v7" in line for line in lines)


def test_structured_prediction_is_read_too(kafka_config):
    from lensflow_eventing.predictions import read_predictions

    config = kafka_config
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    image = ObjectEvent(OBJECT_CREATED_PUT, "b", "k.jpg")
    event = prediction_event(
        image=image,
        model={"name": "aerial", "version": "v1", "sha256": ""},
        predictions=[{"label": "roof", "score": 0.9}],
        source_event_id="x",
    )
    producer = Producer({"bootstrap.servers": config.kafka_bootstrap})
    producer.produce(
        config.topic_predictions,
        key=b"b/k.jpg",
        value=to_json(event),
        headers=[("content-type", b"application/cloudevents+json")],
    )
    assert producer.flush(10) == 0
    [prediction] = list(
        read_predictions(config.kafka_bootstrap, config.topic_predictions, from_beginning=True)
    )
    assert (prediction.subject, prediction.label, prediction.model_version) == (
        "b/k.jpg",
        "roof",
        "v1",
    )


def test_predictions_follow_yields_new_ones(kafka_config):
    import threading

    from lensflow_eventing.predictions import read_predictions

    config = kafka_config
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    producer = Producer({"bootstrap.servers": config.kafka_bootstrap})
    publish_prediction(producer, config, "old.jpg", "roof", 0.9)
    assert producer.flush(10) == 0
    seen: list[str] = []

    def follow():
        for prediction in read_predictions(
            config.kafka_bootstrap, config.topic_predictions, follow=True, last=5
        ):
            seen.append(prediction.subject)
            if len(seen) == 2:
                return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    deadline = time.monotonic() + 15
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    publish_prediction(producer, config, "new.jpg", "road", 0.7)
    assert producer.flush(10) == 0
    reader.join(15)
    bucket = config.image_buckets[0]
    assert seen == [f"{bucket}/old.jpg", f"{bucket}/new.jpg"]


def test_with_a_poller_many_threads_wait_on_their_own_acks(kafka_config):
    """The predict function's way: one thread serves delivery reports, waiters sleep."""
    import threading

    from lensflow_eventing.producer import Poller, produce_and_wait, wait_acked

    ensure_topics(kafka_config.kafka_bootstrap, topic_specs(*kafka_config.topics))
    topic = kafka_config.topic_predictions
    producer = make_producer(kafka_config.kafka_bootstrap, **{"linger.ms": 0})
    poller = Poller(producer)
    errors: list[Exception] = []

    def produce(worker: int) -> None:
        try:
            for i in range(10):
                message = KafkaMessage(None, f"{worker}/{i}".encode(), b"{}")
                produce_and_wait(producer, topic, message, 10, polled=True)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    keys = {m.key().decode() for m in read_topic(kafka_config, topic, 40)}
    assert keys == {f"{w}/{i}" for w in range(4) for i in range(10)}
    send(producer, topic, b"solo", b"{}").result(timeout=10)  # nobody else polls
    missing = send(producer, "no-such-topic-" + topic, b"k", b"{}")
    with pytest.raises(ProduceError, match="does not exist"):
        wait_acked(producer, [missing], 10, polled=True)
    poller.stop()
