"""Dead letters: the event that could not be delivered, annotated the way Knative does.

A dead letter is the same CloudEvent plus ``knativeerrordest`` (the sink), and, when the
sink answered, ``knativeerrorcode`` (its status) and ``knativeerrordata`` (base64 of at
most the first 1024 bytes of its reply). After a network error there is no code and no
data. It is written to the dead-letter topic as a binary-mode Kafka CloudEvent, keyed by
the original record's key so a partitioned dead-letter topic keeps per-key order.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

from cloudevents.abstract import AnyCloudEvent
from cloudevents.kafka import KafkaMessage
from cloudevents.kafka import to_binary as kafka_to_binary

MAX_ERROR_DATA_BYTES = 1024


class DeadLetterError(RuntimeError):
    """The dead-letter topic did not take the event: its offset must not be committed."""


def raw_data(data: Any) -> bytes:
    """The event's data as it travels: bytes as they are, anything parsed back to JSON."""
    if data is None:
        return b""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode()
    return json.dumps(data, separators=(",", ":")).encode()


def annotate(event: AnyCloudEvent, dest: str, status: int | None, reply: bytes) -> AnyCloudEvent:
    """Add the ``knativeerror*`` extensions to ``event`` (in place) and return it."""
    event["knativeerrordest"] = dest
    if status is not None:
        event["knativeerrorcode"] = str(status)
        event["knativeerrordata"] = base64.b64encode(reply[:MAX_ERROR_DATA_BYTES]).decode()
    return event


def kafka_binary(event: AnyCloudEvent, key: bytes | str | None) -> KafkaMessage:
    """The binary-mode Kafka message of ``event``, keyed ``key``.

    ``cloudevents.kafka.to_binary`` reads ``event["datacontenttype"]`` unconditionally and
    raises KeyError when the attribute is absent, which is the normal case for events
    made from MinIO records. For those the headers are built here, the same way: one
    ``ce_<attribute>`` header each, and no content-type header.
    """
    attributes = event.get_attributes()
    if attributes.get("datacontenttype"):
        return kafka_to_binary(event, data_marshaller=raw_data, key_mapper=lambda _: key)
    headers = {
        f"ce_{name}": str(value).encode()
        for name, value in attributes.items()
        if name not in ("data", "partitionkey", "datacontenttype") and value is not None
    }
    return KafkaMessage(headers=headers, key=key, value=raw_data(event.get_data()))


def produce_and_wait(producer, topic: str, message: KafkaMessage, timeout_s: float) -> None:
    """Produce one message and wait for the broker's acknowledgement, or raise.

    Safe from many threads at once: whichever thread's ``poll`` serves a delivery report,
    it only sets that message's own flag.
    """
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def on_delivery(err, _msg) -> None:
        outcome["error"] = err
        done.set()

    try:
        producer.produce(
            topic,
            key=message.key,
            value=message.value,
            headers=list(message.headers.items()),
            on_delivery=on_delivery,
        )
    except Exception as exc:  # noqa: BLE001 - BufferError, KafkaException: all mean "not written"
        raise DeadLetterError(f"could not produce to {topic}: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while not done.is_set():
        if time.monotonic() > deadline:
            raise DeadLetterError(f"no acknowledgement from {topic} after {timeout_s:.0f} s")
        producer.poll(0.05)
    if outcome.get("error") is not None:
        raise DeadLetterError(f"could not produce to {topic}: {outcome['error']}")
