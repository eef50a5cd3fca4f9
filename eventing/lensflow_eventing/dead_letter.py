"""Dead letters: the event that could not be delivered, annotated the way Knative does.

A dead letter is the same CloudEvent plus ``knativeerrordest`` (the sink), and, when the
sink answered, ``knativeerrorcode`` (its status) and ``knativeerrordata`` (base64 of at
most the first 1024 bytes of its reply). After a network error there is no code and no
data. It is written to the dead-letter topic as a binary-mode Kafka CloudEvent, keyed by
the original record's key so a partitioned dead-letter topic keeps per-key order
(``lensflow_eventing.producer.produce_and_wait`` writes it).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cloudevents.abstract import AnyCloudEvent
from cloudevents.kafka import KafkaMessage
from cloudevents.kafka import to_binary as kafka_to_binary

MAX_ERROR_DATA_BYTES = 1024


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
    raises KeyError when the attribute is absent (cloudevents/sdk-python#304), which is
    the normal case for events made from MinIO records. For those the headers are built
    here, the same way: one ``ce_<attribute>`` header each, and no content-type header.
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
