"""Reading a whole topic in tests: every partition from the start, no consumer group join."""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from lensflow.config import Config


def read_topic(config: Config, topic: str, count: int, timeout_s: float = 15.0) -> list:
    """The first ``count`` records of ``topic`` (fewer if they do not come in time)."""
    consumer = Consumer(
        {
            "bootstrap.servers": config.kafka_bootstrap,
            "group.id": "test-reader",  # required by the client; never joined or committed
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found: list = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            found += [m for m in consumer.consume(count - len(found), 0.2) if m.error() is None]
    finally:
        consumer.close()
    return found
