"""What starts a training round: a CloudEvent whose data is ``{"reason": ..., "force": ...}``.

On Knative it is the event the JobSink mounts at ``/etc/jobsink-event/event`` (structured
JSON; a PingSource sends ``{"reason": "schedule"}``, an operator ``{"reason": "manual"}``).
Over HTTP (`lensflow serve train`) it is the POSTed CloudEvent, binary or structured, or a
plain JSON body. Anything else is refused with a one-line reason (``TriggerError``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import flask
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_http, from_json
from cloudevents.sdk.converters import is_binary

EVENT_PATH = "/etc/jobsink-event/event"  # where the JobSink mounts the event
MAX_EVENT_BYTES = 64 * 1024
MAX_REASON_CHARS = 200
DATA_KEYS = ("reason", "force")
REQUEST_TYPE = "io.lensflow.train.requested"  # a plain POST, made into an event
REQUEST_SOURCE = "/lensflow/train"


class TriggerError(ValueError):
    """The event is missing or is not a training request; nothing was touched."""


@dataclass(frozen=True)
class Trigger:
    reason: str
    force: bool = False
    id: str = ""
    type: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trigger_of(event: CloudEvent) -> Trigger:
    """The training request ``event`` carries, or TriggerError saying what is wrong."""
    data = event.data
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError:
            raise TriggerError("the event's data is not JSON") from None
    if not isinstance(data, dict):
        raise TriggerError(
            f'the event\'s data must be a JSON object like {{"reason": "manual"}}, not {type(data).__name__}'
        )
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise TriggerError(
            f"the event's data has unknown field(s) {', '.join(unknown)} (expected {', '.join(DATA_KEYS)})"
        )
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise TriggerError(
            f'the event\'s data needs "reason": a non-empty string of at most {MAX_REASON_CHARS} characters'
        )
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise TriggerError('"force" must be true or false')
    return Trigger(
        reason.strip(), force, str(event["id"]), str(event["type"]), str(event["source"])
    )


def read_event(path: str | Path = EVENT_PATH) -> Trigger:
    """The training request in the event file at ``path`` (the JobSink's mount)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_EVENT_BYTES + 1)
    except FileNotFoundError:
        raise TriggerError(
            f"no event at {path}: a training Job starts from the event its JobSink mounts there"
        ) from None
    except OSError as exc:
        raise TriggerError(f"cannot read the event at {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_EVENT_BYTES:
        raise TriggerError(f"the event at {path} is over {MAX_EVENT_BYTES} bytes")
    try:
        event = from_json(raw)
    except (GenericException, ValueError) as exc:
        raise TriggerError(f"the event at {path} is not a CloudEvent in JSON: {exc}") from None
    return trigger_of(event)


def request_event(request: flask.Request) -> CloudEvent:
    """The event a POST carries: a CloudEvent in binary or structured mode, or one made
    from a plain body (empty means ``{"reason": "manual"}``). TriggerError if it is neither
    or its data is not a training request."""
    body = request.get_data()
    headers = dict(request.headers)
    # The SDK tells binary mode by its headers; its is_structured is true for anything not
    # binary (a plain POST too), so structured mode is told by the content type.
    if is_binary(headers) or (request.content_type or "").startswith("application/cloudevents"):
        try:
            event = from_http(headers, body)
        except GenericException as exc:
            raise TriggerError(f"not a CloudEvent: {exc}") from None
    else:
        try:
            data = json.loads(body) if body.strip() else {"reason": "manual"}
        except ValueError:
            raise TriggerError(
                'the body is not JSON (send {"reason": "manual"} or a CloudEvent)'
            ) from None
        event = CloudEvent({"type": REQUEST_TYPE, "source": REQUEST_SOURCE}, data)
    trigger_of(event)  # refuse a bad request now, not in the round
    return event
