"""One predictions-topic record -> one archive row, or a reason to set it aside.

``to_row`` is a pure conversion: it takes a consumed record and returns the row the
archive stores (the columns of ``SCHEMA``), or raises ``Rejected`` naming what is wrong.
A row is never half-filled: every required field is present and of its type, or the
record is rejected whole.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from cloudevents.exceptions import GenericException as CloudEventError

from lensflow_eventing.contracts import PREDICTED_TYPE
from lensflow_eventing.predictions import record_event

TOP = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("bucket", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("top", TOP, nullable=False),
        pa.field("uncertain", pa.bool_()),
        pa.field("source_event_id", pa.string(), nullable=False),
        pa.field("trace_id", pa.string()),
        # upload (the bucket notification's eventTime) to prediction, when the event says
        pa.field("uploaded_at", pa.timestamp("us", tz="UTC")),
        pa.field("latency_ms", pa.float64()),
        # where the row came from: the archive's own lineage (and its exactly-once check)
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
    ]
)


# What names one upload's prediction, whichever copy of its image event it came from: an
# image event delivered twice (a retry after a lost answer, a commit lost with the
# consumer's session) and a notification sent twice (MinIO's queue_dir sends an event
# again when the broker's answer was lost) are both predicted twice; the archive keeps the
# first. The object written (bucket, key, ETag) and the notification's own time, the same
# in every copy; the image event's id where a notification has no time.
UPLOAD = ("bucket", "key", "etag", "uploaded_at", "source_event_id")


def upload_of(row: dict[str, Any]) -> tuple:
    """The upload a row (with at least the ``UPLOAD`` columns) predicts."""
    when = row["uploaded_at"]
    return row["bucket"], row["key"], row["etag"], row["source_event_id"] if when is None else when


class Rejected(ValueError):
    """The record is not a prediction event; the message says why, on one line."""


def parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str) or not value:
        raise Rejected(f"{what} is missing")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Rejected(f"{what} is not an ISO 8601 time: {value[:40]!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _text(mapping: Any, name: str, where: str, *, required: bool = True) -> str | None:
    value = mapping.get(name) if isinstance(mapping, dict) else None
    if isinstance(value, str) and value:
        return value
    if value is None and not required:
        return None
    raise Rejected(f"{where}.{name} is missing or not a string")


def _top(predictions: Any) -> list[dict[str, Any]]:
    if not isinstance(predictions, list) or not predictions:
        raise Rejected("data.predictions is missing or empty")
    top = []
    for entry in predictions:
        label = entry.get("label") if isinstance(entry, dict) else None
        score = entry.get("score") if isinstance(entry, dict) else None
        if not isinstance(label, str) or type(score) not in (int, float):  # bool is no score
            raise Rejected("data.predictions has an entry without a label and a score")
        top.append({"label": label, "score": float(score)})
    return top


def _event(message) -> Any:
    try:
        event = record_event(message)
    except (CloudEventError, ValueError, TypeError, KeyError) as exc:
        raise Rejected(f"not a CloudEvent: {' '.join(str(exc).split())[:200]}") from None
    if event is None:
        raise Rejected("not a CloudEvent (no ce_specversion header, not structured mode)")
    if event["type"] != PREDICTED_TYPE:
        raise Rejected(f"type is {event['type']!r}, not {PREDICTED_TYPE}")
    return event


def to_row(message) -> dict[str, Any]:
    """The archive row of a consumed predictions-topic record; ``Rejected`` if it is not
    a complete prediction event."""
    event = _event(message)
    data = event.get_data()
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError:
            raise Rejected("data is not JSON") from None
    if not isinstance(data, dict):
        raise Rejected("data is not a JSON object")
    image, model = data.get("image"), data.get("model")
    top = _top(data.get("predictions"))
    when = parse_time(event.get("time"), "time")
    uploaded = data.get("uploaded_at")
    uploaded_at = parse_time(uploaded, "data.uploaded_at") if uploaded is not None else None
    traceparent = event.get("traceparent")
    parts = traceparent.split("-") if isinstance(traceparent, str) else []
    uncertain = data.get("uncertain")
    return {
        "id": str(event["id"]),
        "time": when,
        "bucket": _text(image, "bucket", "data.image"),
        "key": _text(image, "key", "data.image"),
        "etag": _text(image, "etag", "data.image", required=False),
        "model_name": _text(model, "name", "data.model"),
        "model_version": _text(model, "version", "data.model"),
        "model_sha256": _text(model, "sha256", "data.model"),
        "label": top[0]["label"],
        "score": top[0]["score"],
        "top": top,
        "uncertain": uncertain if isinstance(uncertain, bool) else None,
        "source_event_id": _text(data, "source_event_id", "data"),
        "trace_id": parts[1] if len(parts) == 4 else None,
        "uploaded_at": uploaded_at,
        "latency_ms": (when - uploaded_at).total_seconds() * 1000 if uploaded_at else None,
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
    }


def record_time(message) -> datetime:
    """When the broker took the record (for a reject's folder), else now."""
    kind, stamp = message.timestamp()
    if kind and stamp and stamp > 0:
        return datetime.fromtimestamp(stamp / 1000, timezone.utc)
    return datetime.now(timezone.utc)


def reject_line(message, reason: str) -> dict[str, Any]:
    """What the archive keeps of a rejected record: where it was, why, and its bytes."""
    value = message.value() or b""
    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (message.headers() or [])}
    return {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "time": record_time(message).isoformat(),
        "reason": reason,
        "headers": headers,
        "key": (message.key() or b"").decode("utf-8", "replace"),
        "value": value.decode("utf-8", "replace"),
    }
