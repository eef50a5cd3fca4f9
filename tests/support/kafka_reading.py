"""Reading a whole topic in tests: every partition from the start, no consumer group join."""

from __future__ import annotations

import time

from lensflow_core.settings import Config
from lensflow_eventing.predictions import TopicReader


def read_topic(config: Config, topic: str, count: int, timeout_s: float = 15.0) -> list:
    """The first ``count`` records of ``topic`` (fewer if they do not come in time)."""
    found: list = []
    with TopicReader(config.kafka_bootstrap, topic, group="test-reader") as reader:
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            found += reader.poll(0.2, max_records=count - len(found))
    return found
