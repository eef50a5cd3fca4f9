"""The embedded S3 notifies as MinIO does: any client's new object becomes a Kafka record.

MinIO sends a bucket event for every object created in a bucket with a notification rule
(``mc event add``): ``s3:ObjectCreated:Put`` for a PUT, ``:Copy`` for a server-side copy,
``:CompleteMultipartUpload`` once when a multipart upload completes. moto, the embedded
S3, keeps notification targets of its own (SQS, SNS, Lambda), so this module sits around
its WSGI application in the S3 server process:

1. moto calls ``moto.s3.notifications.send_event`` on each of those three operations,
   in the request's thread; a wrapper notes the created object there (``_created``).
2. ``NotifyingS3`` holds moto's answer until it knows the outcome: on a 2xx, an object
   noted and its bucket and key matching the rule (``LENSFLOW_S3_NOTIFY_*``), it builds
   MinIO's record (``lensflow_eventing.contracts.notification_record``) and writes it to the event
   queue folder (``lensflow_eventing.notify_queue``) *before* the answer leaves. If the event
   cannot be kept (disk, queue full) the client gets 503 SlowDown and retries the upload,
   so a created object never silently misses its event.
3. ``EventSender`` produces the queued events to the images topic and deletes each one
   once the broker acknowledged it; while the broker is down they wait.

The wrapper notes only the *last* created object of a request: moto's multipart
completion also reports an inner PUT first, which MinIO does not send.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
from typing import Any

from lensflow.servers import moto_app
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, notification_record, notify_matches
from lensflow_eventing.notify_queue import EventQueue, EventSender

log = logging.getLogger("lensflow.s3_notify")

_created = threading.local()  # (event name, bucket name, moto's key) of this request
# Headers MinIO keeps, lower-case, among an object's user-defined metadata (besides
# x-amz-meta-*, which it keeps in canonical form): cmd/utils.go supportedHeaders.
_KEPT_HEADERS = ("content-encoding", "content-disposition", "content-language", "cache-control")
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>'
    b"the object was stored but its bucket event could not be kept; upload it again"
    b"</Message></Error>"
)


def _note_created(original):
    def send_event(account_id: str, event_name: Any, bucket: Any, key: Any) -> None:
        name = getattr(event_name, "value", str(event_name))
        if name.startswith("s3:ObjectCreated:"):
            _created.last = (name, bucket.name, key)
        return original(account_id, event_name, bucket, key)

    return send_event


def _canonical(header: str) -> str:
    """Go's ``http.CanonicalHeaderKey``: ``x-amz-meta-drone`` -> ``X-Amz-Meta-Drone``."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in header.split("-"))


def user_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """An object's ``userMetadata`` as MinIO reports it (content-type is added later)."""
    kept = {}
    for name, value in metadata.items():
        lowered = name.lower()
        if lowered.startswith("x-amz-meta-"):
            kept[_canonical(lowered)] = value
        elif lowered in _KEPT_HEADERS:
            kept[lowered] = value
    return kept


def access_key(environ: dict[str, Any]) -> str:
    """The access key a request was signed with (SigV4 header or presigned query)."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if "Credential=" in auth:
        return auth.split("Credential=", 1)[1].split("/", 1)[0]
    query = environ.get("QUERY_STRING", "")
    for part in query.split("&"):
        if part.startswith("X-Amz-Credential="):
            return part.split("=", 1)[1].split("%2F", 1)[0].split("/", 1)[0]
    return ""


class NotifyingS3:
    """moto's WSGI application, announcing created objects as ``config`` says."""

    def __init__(self, app, config: Config, queue: EventQueue, sender: EventSender | None):
        self.app = app
        self.config = config
        self.queue = queue
        self.sender = sender
        self.deployment_id = str(uuid.uuid4())

    def watches(self, bucket: str, key: str) -> bool:
        c = self.config
        return bucket in c.notify_buckets and notify_matches(key, c.notify_prefix, c.notify_suffix)

    def __call__(self, environ: dict[str, Any], start_response):
        _created.last = None
        answer: list[Any] = []

        def hold(status: str, headers: list, exc_info=None):
            answer[:] = [status, headers, exc_info]
            return lambda data: None  # moto never writes through start_response's write

        body = self.app(environ, hold)
        created, _created.last = getattr(_created, "last", None), None
        status, headers, exc_info = answer
        if created and status.startswith("2") and self.watches(created[1], created[2].name):
            try:
                self._keep(environ, headers, *created)
            except Exception as exc:  # the client must upload again
                log.error("could not keep the event of %s/%s: %s", created[1], created[2].name, exc)
                if hasattr(body, "close"):
                    body.close()
                start_response("503 Slow Down", [("Content-Type", "application/xml")])
                return [SLOW_DOWN]
        start_response(status, headers, exc_info)
        return body

    def _keep(self, environ: dict[str, Any], headers: list, name: str, bucket: str, key) -> None:
        event = ObjectEvent(
            event_name=name,
            bucket=bucket,
            key=key.name,
            etag=key.etag.strip('"'),
            size=key.size,
            content_type=key.metadata.get("content-type") or "application/octet-stream",
            user_metadata=user_metadata(dict(key.metadata)),
        )
        modified = getattr(key, "last_modified", None)
        request_id = dict((k.lower(), v) for k, v in headers).get("x-amz-request-id")
        _, value = notification_record(
            event,
            principal=access_key(environ),
            region=self.config.s3_region,
            source_ip=environ.get("REMOTE_ADDR", ""),
            user_agent=environ.get("HTTP_USER_AGENT", ""),
            request_id=request_id or f"{time.time_ns():X}",
            endpoint=self.config.s3_endpoint or "",
            deployment_id=self.deployment_id,
            sequencer=f"{int(modified.timestamp() * 1e9):X}" if modified else None,
        )
        queued = self.queue.put(value)
        if self.sender is not None:
            self.sender.wake(queued)


def notifying_app(config: Config | None = None):
    """moto's S3, announcing created objects: what the embedded S3 server serves."""
    from moto.s3 import notifications

    config = config or Config.from_env()
    if not config.notify_queue_dir:
        raise ValueError("LENSFLOW_S3_NOTIFY_QUEUE_DIR must name the event queue folder")
    if not getattr(notifications.send_event, "_lensflow", False):
        notifications.send_event = _note_created(notifications.send_event)
        notifications.send_event._lensflow = True
    queue = EventQueue(config.notify_queue_dir)
    sender = EventSender(queue, config.kafka, config.topic_images).start()
    atexit.register(sender.stop)
    log.info(
        "announcing objects created in %s (prefix %r, suffix %r) on topic %s",
        ",".join(config.notify_buckets),
        config.notify_prefix,
        config.notify_suffix,
        config.topic_images,
    )
    return NotifyingS3(moto_app(), config, queue, sender)
