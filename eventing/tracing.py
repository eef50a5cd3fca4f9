"""W3C trace context (``traceparent``) for events: read the one that came, or start one.

A ``traceparent`` is ``00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>``
(https://www.w3.org/TR/trace-context/). It travels as the CloudEvents distributed-tracing
extension ``traceparent``, as the HTTP ``traceparent`` header Knative propagates, or, on a
Kafka record, as a ``traceparent`` record header (which a KafkaSource turns into the
``kafkaheadertraceparent`` extension). Pure functions: no OpenTelemetry needed.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
SAMPLED = 0x01

# Where an incoming trace context may be, most specific first.
EXTENSION = "traceparent"
KAFKA_HEADER_EXTENSION = "kafkaheadertraceparent"
HTTP_HEADER = "traceparent"


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: int = SAMPLED

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def child(self) -> TraceContext:
        """A new span in the same trace (this process's span), same sampling decision."""
        return TraceContext(self.trace_id, _span_id(), self.flags)


def _span_id() -> str:
    while True:
        value = secrets.token_hex(8)
        if value != "0" * 16:
            return value


def new_trace(sampled: bool = True) -> TraceContext:
    """A fresh trace: new trace id, new span id."""
    while True:
        trace_id = secrets.token_hex(16)
        if trace_id != "0" * 32:
            return TraceContext(trace_id, _span_id(), SAMPLED if sampled else 0)


def parse_traceparent(value: Any) -> TraceContext | None:
    """The trace context in ``value``, or None when it is absent or not a valid one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def incoming_trace(
    attributes: Mapping[str, Any], http_headers: Mapping[str, str] | None = None
) -> TraceContext | None:
    """The trace context that arrived with an event: its ``traceparent`` extension, the
    HTTP ``traceparent`` header, or the source record's ``traceparent`` header (as a
    KafkaSource delivers it), in that order; None if none is valid."""
    candidates = [attributes.get(EXTENSION)]
    if http_headers is not None:
        lowered = {k.lower(): v for k, v in http_headers.items()}
        candidates.append(lowered.get(HTTP_HEADER))
    candidates.append(attributes.get(KAFKA_HEADER_EXTENSION))
    for value in candidates:
        context = parse_traceparent(value)
        if context is not None:
            return context
    return None


def continue_or_start(
    attributes: Mapping[str, Any], http_headers: Mapping[str, str] | None = None
) -> tuple[TraceContext, bool]:
    """(this process's span, whether a trace arrived): a child of the incoming trace
    context, or the root of a new trace."""
    parent = incoming_trace(attributes, http_headers)
    if parent is None:
        return new_trace(), False
    return parent.child(), True
