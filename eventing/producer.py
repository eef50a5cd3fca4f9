"""Upload images and publish the bucket-notification record MinIO would write for them.

Locally (moto has no notification targets) and for tools that upload through lensflow,
this stands in for MinIO's Kafka notification target: the record is byte-for-byte what
``eventing.contracts.notification_record`` says MinIO writes, keyed ``<bucket>/<key>``,
with no headers, so the dispatcher and the predict function cannot tell the difference.
"""

from __future__ import annotations

import mimetypes
import threading
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer

from eventing.contracts import OBJECT_CREATED_PUT, ObjectEvent, notification_record
from lensflow.config import Config


class PublishError(RuntimeError):
    """An event could not be written to Kafka: the upload happened, its event did not."""


def make_producer(config: Config, **overrides: str | int | float | bool) -> Producer:
    """A producer that waits for all in-sync replicas and gives up after 15 s.

    The short delivery timeout is deliberate: a person running ``lensflow upload``
    against an unreachable broker should hear about it in seconds, not minutes.
    """
    settings: dict[str, str | int | float | bool] = {
        "bootstrap.servers": config.kafka_bootstrap,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 15000,
        "client.id": "lensflow-producer",
    }
    settings.update(overrides)
    return Producer(settings)


class DeliveryTracker:
    """Collects delivery reports so a caller can check that every record was written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending = 0
        self.errors: list[str] = []

    def expect(self) -> None:
        with self._lock:
            self.pending += 1

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            self.pending -= 1
            if err is not None:
                self.errors.append(f"{msg.topic()} key {msg.key()!r}: {err.str()}")

    def wait(self, producer: Producer, timeout_s: float) -> None:
        """Flush and raise ``PublishError`` unless every expected record was delivered."""
        left = producer.flush(timeout_s)
        with self._lock:
            if self.errors:
                raise PublishError("; ".join(self.errors))
            if self.pending or left:
                raise PublishError(
                    f"{max(self.pending, left)} record(s) not confirmed by the broker "
                    f"after {timeout_s:.0f} s"
                )


def publish_object_event(
    producer: Producer,
    config: Config,
    event: ObjectEvent,
    on_delivery: DeliveryTracker | None = None,
) -> None:
    """Produce ``notification_record(event)`` to the images topic (no flush)."""
    key, value = notification_record(event)
    if on_delivery is not None:
        on_delivery.expect()
    producer.produce(config.topic_images, key=key, value=value, on_delivery=on_delivery)
    producer.poll(0)


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
    returned). Raises ``PublishError`` if any record was not acknowledged by the broker:
    the objects are in S3 then, but nothing will predict them until they are re-published.
    """
    from lensflow.s3 import s3_client

    bucket = bucket or config.image_buckets[0]
    s3 = s3 or s3_client(config)
    own_producer = producer is None
    producer = producer or make_producer(config)
    tracker = DeliveryTracker()
    events: list[ObjectEvent] = []
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
            publish_object_event(producer, config, event, tracker)
            events.append(event)
        tracker.wait(producer, timeout_s)
    finally:
        if own_producer:
            producer.flush(0)
    return events
