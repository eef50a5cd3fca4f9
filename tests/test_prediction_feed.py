"""PredictionFeed: the one background reader of the predictions topic (demo, dashboard, bench)."""

from __future__ import annotations

import time

from cloudevents.kafka import to_binary
from confluent_kafka import Producer

from lensflow_eventing.contracts import OBJECT_CREATED_PUT, ObjectEvent, prediction_event
from lensflow_eventing.predictions import Prediction, PredictionFeed
from lensflow_eventing.topics import ensure_topics, topic_specs


def produce(producer: Producer, topic: str, key: str, label: str) -> None:
    event = prediction_event(
        image=ObjectEvent(OBJECT_CREATED_PUT, "images", key, etag="e1"),
        model={"name": "aerial", "version": "v3", "sha256": "0" * 64},
        predictions=[{"label": label, "score": 0.9}],
        source_event_id="partition:0/offset:1",
    )
    message = to_binary(event)
    headers = list(message.headers.items())
    producer.produce(topic, key=message.key, value=message.value, headers=headers)


def until(check, timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_the_feed_hands_over_new_predictions_in_order_and_skips_other_records(kafka_config):
    config = kafka_config
    topic = config.topic_predictions
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    producer = Producer({"bootstrap.servers": config.kafka_bootstrap})
    produce(producer, topic, "before.jpg", "roof")  # before the feed: not seen from the end
    assert producer.flush(10) == 0
    seen: list[tuple[str, str | None, int]] = []
    opened: list[str] = []

    def got(prediction: Prediction, produced_ms: int) -> None:
        seen.append((prediction.subject, prediction.label, produced_ms))

    feed = PredictionFeed(
        config.kafka, topic, got, from_end=True, on_open=lambda r: opened.append(r.topic)
    ).start()
    try:
        assert opened == [topic]  # placed before start returned
        producer.produce(topic, key=b"junk", value=b"not a cloudevent")
        for i in range(3):
            produce(producer, topic, f"after/{i}.jpg", f"label{i}")
        assert producer.flush(10) == 0
        assert until(lambda: len(seen) >= 3)
        time.sleep(0.5)  # nothing more arrives: the junk record was skipped
        assert [(s, label) for s, label, _ in seen] == [
            (f"images/after/{i}.jpg", f"label{i}") for i in range(3)
        ]
        assert all(ms > 1_000_000_000_000 for _, _, ms in seen)  # record timestamps
    finally:
        feed.stop()


def test_a_topic_made_after_the_feed_started_is_read(kafka_config):
    config = kafka_config
    seen: list[str] = []
    feed = PredictionFeed(
        config.kafka,
        config.topic_predictions,
        lambda prediction, _ms: seen.append(prediction.subject),
        retry_s=0.2,
    ).start(open_timeout_s=5)
    try:
        ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
        producer = Producer({"bootstrap.servers": config.kafka_bootstrap})
        produce(producer, config.topic_predictions, "late.jpg", "roof")
        assert producer.flush(10) == 0
        assert until(lambda: seen == ["images/late.jpg"])
    finally:
        feed.stop()
