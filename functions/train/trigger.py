"""What triggered a training round: a PingSource CloudEvent (binary or structured) or a plain
POST, and whether it asks to force a round."""

from __future__ import annotations

import json
from typing import Any

import flask
from botocore.exceptions import BotoCoreError, ClientError
from cloudevents.exceptions import GenericException
from cloudevents.http import from_http
from cloudevents.sdk.converters import is_binary

from model_store import StoreUnavailableError


def parse_trigger(request: flask.Request) -> dict[str, Any]:
    """What triggered us: a CloudEvent's id/type/source, or a plain POST; and its options."""
    body = request.get_data()
    headers = dict(request.headers)
    # The SDK tells binary mode by its headers; its is_structured is true for anything
    # not binary (a plain POST too), so structured mode is told by the content type.
    is_event = is_binary(headers) or (request.content_type or "").startswith(
        "application/cloudevents"
    )
    data: Any = None
    trigger: dict[str, Any] = {"kind": "post"}
    if is_event:
        try:
            event = from_http(headers, body)
        except GenericException as exc:
            raise ValueError(f"not a CloudEvent: {exc}") from None
        trigger = {
            "kind": "cloudevent",
            "id": event["id"],
            "type": event["type"],
            "source": event["source"],
        }
        data = event.data
    elif body.strip():
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # a tick with a non-JSON body is still a tick
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError:
            data = None
    trigger["force"] = bool(isinstance(data, dict) and data.get("force") is True)
    return trigger


def store_unavailable(exc: Exception) -> bool:
    """Whether ``exc`` means the object store could not be reached (a 503, not a 500)."""
    if isinstance(exc, (StoreUnavailableError, BotoCoreError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return status >= 500 or status == 0
    return False
