"""``lensflow upload``: put files in S3 and publish the record MinIO would write for each.

Locally (moto has no notification targets) and for tools that upload through lensflow,
this stands in for MinIO's Kafka notification target
(``eventing.producer.publish_object_event``).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import Producer

from eventing.contracts import OBJECT_CREATED_PUT, ObjectEvent
from eventing.producer import make_producer, publish_object_event, wait_acked
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config


def object_key(path: Path, prefix: str) -> str:
    """``<prefix>/<file name>``; a prefix is a folder, so one ``/`` joins them."""
    prefix = prefix.strip("/")
    return f"{prefix}/{path.name}" if prefix else path.name


def guess_content_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def upload_files(
    config: Config,
    paths: Iterable[str | Path],
    bucket: str | None = None,
    prefix: str = "",
    *,
    producer: Producer | None = None,
    s3=None,
    timeout_s: float = 30.0,
) -> list[ObjectEvent]:
    """Put each file in S3, publish its notification record, and confirm delivery.

    ``bucket`` defaults to the first image bucket. Objects are uploaded one by one with a
    single PUT (so the event is ``s3:ObjectCreated:Put``, and the ETag is the one S3
    returned). Raises ``eventing.producer.ProduceError`` if any record was not
    acknowledged by the broker: the objects are in S3 then, but nothing will predict them
    until they are re-published.
    """
    bucket = bucket or config.image_buckets[0]
    s3 = s3 or s3_client(config)
    own_producer = producer is None
    producer = producer or make_producer(config.kafka)
    events: list[ObjectEvent] = []
    acks = []
    try:
        for raw in paths:
            path = Path(raw)
            body = path.read_bytes()
            key = object_key(path, prefix)
            content_type = guess_content_type(path)
            reply = s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
            event = ObjectEvent(
                event_name=OBJECT_CREATED_PUT,
                bucket=bucket,
                key=key,
                etag=reply["ETag"].strip('"'),
                size=len(body),
                content_type=content_type,
            )
            acks.append(publish_object_event(producer, config.topic_images, event))
            events.append(event)
        wait_acked(producer, acks, timeout_s)
    finally:
        if own_producer:
            producer.flush(0)
    return events
