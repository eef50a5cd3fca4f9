"""Helpers for the archive's tests and benchmark: prediction events on a topic, the
archive read back as Parquet with pyarrow alone."""

from __future__ import annotations

import io
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from cloudevents.kafka import to_binary

from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, prediction_event
from lensflow_eventing.producer import make_producer, send, wait_acked

LABELS = ("car", "truck", "person", "boat")


def make_prediction(i: int, *, day: str | None = None, version: str = "v1"):
    """The i-th prediction event (a CloudEvent), as the predict function makes it."""
    label = LABELS[i % len(LABELS)]
    score = 0.3 + (i % 7) / 10
    event = prediction_event(
        image=ObjectEvent(
            "s3:ObjectCreated:Put",
            "drone-images",
            f"fleet/drone-{i % 3:02d}/{i:06d}.jpg",
            f"etag{i}",
            event_time="2026-12-01T10:00:00.000Z",
        ),
        model={"name": "aerial", "version": version, "sha256": "ab" * 32},
        predictions=[
            {"label": label, "score": score},
            {"label": "other", "score": round(1 - score, 3)},
        ],
        source_event_id=f"partition:0/offset:{i}",
    )
    event["traceparent"] = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    if day is not None:
        event["time"] = f"{day}T10:00:01.000Z"
    return event


def produce(config: Config, events, extra_records=(), producer=None) -> list[str]:
    """Produce ``events`` (CloudEvents, binary mode) and raw ``(key, value, headers)``
    records to the predictions topic; the ids of the events, once the broker has them."""
    producer = producer or make_producer(config.kafka, **{"linger.ms": 20})
    topic = config.topic_predictions
    messages = [to_binary(event) for event in events]
    acks = [send(producer, topic, m.key, m.value, m.headers) for m in messages]
    acks += [
        send(producer, topic, key, value, dict(headers)) for key, value, headers in extra_records
    ]
    wait_acked(producer, acks, 30)
    return [event["id"] for event in events]


def archived(config: Config) -> pa.Table:
    """Every row of the archive, read with pyarrow from the Parquet files (no lensflow)."""
    s3 = s3_client(config)
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=config.archive_bucket, Prefix="predictions/"
    )
    tables = []
    for page in pages:
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=config.archive_bucket, Key=item["Key"])["Body"].read()
            tables.append(pq.read_table(io.BytesIO(body)))
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})


def keys(config: Config, prefix: str) -> list[str]:
    s3 = s3_client(config)
    answer = s3.list_objects_v2(Bucket=config.archive_bucket, Prefix=prefix)
    return sorted(item["Key"] for item in answer.get("Contents", []))


def doubled(ids) -> list[str]:
    return [i for i, n in Counter(ids).items() if n > 1]
