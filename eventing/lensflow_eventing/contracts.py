"""The event contracts, in one place (docs/contract.md, "Events").

1. The input record: what MinIO's Kafka notification target writes for a bucket event.
2. The CloudEvent a Knative KafkaSource makes of a Kafka record.
3. The prediction event the predict function produces.

Builders and parsers live side by side so a producer and its consumer cannot disagree.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from cloudevents.http import CloudEvent

KAFKA_EVENT_TYPE = "dev.knative.kafka.event"
PREDICTED_TYPE = "io.lensflow.image.predicted"
PREDICTED_SOURCE = "/lensflow/predict"

OBJECT_CREATED_PUT = "s3:ObjectCreated:Put"
OBJECT_CREATED_MULTIPART = "s3:ObjectCreated:CompleteMultipartUpload"
OBJECT_REMOVED_DELETE = "s3:ObjectRemoved:Delete"


class BadEvent(ValueError):
    """The event is malformed: no retry will make it good."""


# --- 1. MinIO bucket-notification records -------------------------------------------------


@dataclass(frozen=True)
class ObjectEvent:
    """One S3 record of a bucket notification, with the key already unescaped."""

    event_name: str
    bucket: str
    key: str
    etag: str | None = None
    size: int | None = None
    content_type: str | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)
    event_time: str | None = None

    @property
    def created(self) -> bool:
        return self.event_name.startswith("s3:ObjectCreated:")

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Go's encoding/json escapes these inside strings; so does MinIO's record, so ours does too.
_GO_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _go_json(value: Any) -> bytes:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in _GO_JSON_ESCAPES.items():
        text = text.replace(char, escaped)
    return text.encode()


def notification_record(
    event: ObjectEvent,
    *,
    principal: str = "lensflow",
    region: str = "",
    source_ip: str = "127.0.0.1",
    user_agent: str = "lensflow",
    request_id: str | None = None,
    endpoint: str = "",
    deployment_id: str = "",
    sequencer: str | None = None,
) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record MinIO's notification target writes for ``event``.

    As ``eventArgs.ToEvent`` (minio/minio cmd/event-notification.go) builds the event and
    ``KafkaTarget.send`` (internal/event/target/kafka.go) the record: key
    ``<bucket>/<key>`` unescaped; value ``{"EventName", "Key", "Records": [event]}`` with
    the object key query-escaped; ``size``, ``eTag``, ``contentType`` and
    ``userMetadata`` only on created events. The keyword arguments are the request's
    (who, from where, which server); the defaults suit records lensflow makes itself.
    """
    content_type = event.content_type or "application/octet-stream"
    obj: dict[str, Any] = {"key": quote_plus(event.key, safe="")}
    if event.created:
        obj.update(
            size=event.size or 0,
            eTag=(event.etag or "").strip('"'),
            contentType=content_type,
            userMetadata=dict(
                sorted({"content-type": content_type, **event.user_metadata}.items())
            ),
        )
    obj["sequencer"] = sequencer or f"{time.time_ns():X}"
    owner = {"principalId": principal}
    response = {
        "x-amz-id-2": "",
        "x-amz-request-id": request_id or f"{time.time_ns():X}",
        "x-minio-deployment-id": deployment_id,
        "x-minio-origin-endpoint": endpoint,
    }
    record = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": region,
        "eventTime": event.event_time or _now_iso(),
        "eventName": event.event_name,
        "userIdentity": owner,
        "requestParameters": {
            "principalId": principal,
            "region": region,
            "sourceIPAddress": source_ip,
        },
        "responseElements": response,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {
                "name": event.bucket,
                "ownerIdentity": owner,
                "arn": f"arn:aws:s3:::{event.bucket}",
            },
            "object": obj,
        },
        "source": {"host": source_ip, "port": "", "userAgent": user_agent},
    }
    value = {"EventName": event.event_name, "Key": event.path, "Records": [record]}
    return event.path.encode(), _go_json(value)


def notify_pattern(prefix: str, suffix: str) -> str:
    """The wildcard pattern of a ``--prefix``/``--suffix`` filter, as MinIO's
    ``NewPattern`` (internal/event/rules.go) makes it; ``*`` when there is no filter."""
    pattern = ""
    if prefix:
        pattern = prefix if prefix.endswith("*") else prefix + "*"
    if suffix:
        pattern += suffix if suffix.startswith("*") else "*" + suffix
    return pattern.replace("**", "*") or "*"


def _wildcard(name: bytes, pattern: bytes) -> bool:
    """``*`` any run of bytes, ``?`` one byte (minio/pkg wildcard ``deepMatchRune``)."""
    s = p = 0
    star, mark = -1, 0
    while s < len(name) or p < len(pattern):
        if p < len(pattern):
            char = pattern[p : p + 1]
            if char == b"*":
                star, mark, p = p, s, p + 1
                continue
            if s < len(name) and (char == b"?" or char == name[s : s + 1]):
                s, p = s + 1, p + 1
                continue
        if star < 0 or mark + 1 > len(name):
            return False
        mark += 1
        s, p = mark, star + 1
    return True


def notify_matches(key: str, prefix: str = "", suffix: str = "") -> bool:
    """Whether MinIO announces object ``key`` (unescaped) under a ``--prefix``/``--suffix``
    filter: ``wildcard.MatchSimple`` (minio/pkg), where a ``?`` the name runs out at
    matches too."""
    pattern, name = notify_pattern(prefix, suffix).encode(), key.encode()
    if pattern == b"*" or _wildcard(name, pattern):
        return True
    return any(char == ord("?") and _wildcard(name, pattern[:i]) for i, char in enumerate(pattern))


def parse_notification(data: Any) -> list[ObjectEvent]:
    """The S3 records of a MinIO notification (bytes, str or parsed JSON). Raises BadEvent."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8", errors="strict") if data else ""
        except UnicodeDecodeError as exc:
            raise BadEvent(f"event data is not UTF-8 (byte {exc.start})") from None
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise BadEvent(f"event data is not JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(data, dict):
        raise BadEvent("event data is not a JSON object")
    records = data.get("Records")
    if not isinstance(records, list) or not records:
        raise BadEvent("event data has no Records")
    return [_parse_record(r) for r in records]


def _parse_record(record: Any) -> ObjectEvent:
    try:
        name = record["eventName"]
        bucket = record["s3"]["bucket"]["name"]
        obj = record["s3"]["object"]
        raw_key = obj["key"]
    except (KeyError, TypeError, IndexError):
        raise BadEvent("record lacks eventName, s3.bucket.name or s3.object.key") from None
    if not isinstance(obj, dict):
        raise BadEvent("record's s3.object is not a JSON object")
    for field_name, value in (("eventName", name), ("s3.bucket.name", bucket), ("key", raw_key)):
        if not isinstance(value, str):
            raise BadEvent(f"record's {field_name} is {type(value).__name__}, not a string")
    key = unquote_plus(raw_key)
    if not bucket or not key:
        raise BadEvent("record has an empty bucket or key")
    size = obj.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise BadEvent(f"record has an invalid object size {size!r}")
    for optional in ("eTag", "contentType"):
        if obj.get(optional) is not None and not isinstance(obj[optional], str):
            raise BadEvent(f"record's s3.object.{optional} is not a string")
    meta = obj.get("userMetadata") or {}
    event_time = record.get("eventTime")
    return ObjectEvent(
        event_name=name,
        bucket=bucket,
        key=key,
        etag=obj.get("eTag"),
        size=size,
        content_type=obj.get("contentType"),
        user_metadata=meta if isinstance(meta, dict) else {},
        event_time=event_time if isinstance(event_time, str) else None,
    )


# --- 2. What a Knative KafkaSource makes of a record ---------------------------------------


def _header_extension_name(header: str) -> str:
    """``kafkaheader<name>``: CloudEvents extension names are lower-case alphanumerics."""
    return "kafkaheader" + "".join(c for c in header.lower() if c.isalnum())


def is_cloudevent_record(headers: dict[str, bytes]) -> bool:
    lowered = {k.lower(): v for k, v in headers.items()}
    if "ce_specversion" in lowered:
        return True
    ctype = lowered.get("content-type", b"").decode("latin-1").lower()
    return ctype.startswith("application/cloudevents")


def kafkasource_event(
    *,
    source: str,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | str | None,
    value: bytes | None,
    headers: dict[str, bytes],
) -> CloudEvent:
    """The CloudEvent a KafkaSource builds for a plain record, or passes through for a CE one."""
    position = {"knativekafkapartition": str(partition), "knativekafkaoffset": str(offset)}
    if is_cloudevent_record(headers):
        from cloudevents.kafka import KafkaMessage, from_binary, from_structured

        # key=None: the SDK would otherwise add the record key as a ``partitionkey`` (bytes)
        # the producer never set; passthrough means unchanged.
        message = KafkaMessage(headers=headers, key=None, value=value or b"")
        lowered = {k.lower() for k in headers}
        raw = lambda body: body  # noqa: E731 - keep the payload as the producer wrote it
        if "ce_specversion" in lowered:
            event = from_binary(message, event_type=CloudEvent, data_unmarshaller=raw)
            had_time = "ce_time" in lowered
        else:
            event = from_structured(message, event_type=CloudEvent)
            had_time = "time" in json.loads(value or b"{}")
        if not had_time:
            del event["time"]  # the SDK stamps a time on events that have none
        for name, val in position.items():
            event[name] = val
        return event

    when = (
        datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc)
        if timestamp_ms and timestamp_ms > 0
        else datetime.now(timezone.utc)
    )
    attributes: dict[str, Any] = {
        "id": f"partition:{partition}/offset:{offset}",
        "type": KAFKA_EVENT_TYPE,
        "source": f"{source}#{topic}" if "#" not in source else source,
        "subject": f"partition:{partition}#{offset}",
        "time": when.isoformat().replace("+00:00", "Z"),
        **position,
    }
    if key is not None:
        text_key = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key
        attributes["key"] = text_key
        attributes["partitionkey"] = text_key
    for name, val in headers.items():
        attributes[_header_extension_name(name)] = val.decode("utf-8", errors="replace")
        if name.lower() == "content-type":
            attributes["datacontenttype"] = val.decode("latin-1")
    return CloudEvent(attributes, value or b"")


# --- 3. The prediction event ---------------------------------------------------------------


def prediction_event(
    *,
    image: ObjectEvent,
    model: dict[str, str],
    predictions: list[dict[str, Any]],
    source_event_id: str,
    timings_ms: dict[str, float] | None = None,
    uncertain: bool = False,
) -> CloudEvent:
    """The ``io.lensflow.image.predicted`` event for one image; ``uncertain``: the model
    was unsure enough that the image was queued for labelling."""
    data = {
        "image": {"bucket": image.bucket, "key": image.key, "etag": image.etag},
        "model": model,
        "predictions": predictions,
        "source_event_id": source_event_id,
        "uncertain": uncertain,
    }
    if timings_ms:
        data["timings_ms"] = timings_ms
    if image.event_time:  # the upload's time (the notification's eventTime): the archive's latency
        data["uploaded_at"] = image.event_time
    attributes = {
        "type": PREDICTED_TYPE,
        "source": PREDICTED_SOURCE,
        "subject": image.path,
        "datacontenttype": "application/json",
        "partitionkey": image.path,
    }
    return CloudEvent(attributes, data)
