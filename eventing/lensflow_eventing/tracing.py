"""W3C trace context (``traceparent``) for events: read the one that came, or start one.

A ``traceparent`` is ``00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>``
(https://www.w3.org/TR/trace-context/). It travels as the CloudEvents distributed-tracing
extension ``traceparent``, as the HTTP ``traceparent`` header Knative propagates, or, on a
Kafka record, as a ``traceparent`` record header (which a KafkaSource turns into the
``kafkaheadertraceparent`` extension). The ids need no OpenTelemetry; ``span`` exports a
real span only when the standard ``OTEL_*`` variables ask for it and the ``otel`` extra is
installed (off by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping
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


# --- optional OpenTelemetry export ----------------------------------------------------------

_OTEL_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_tracer: Any = None
_tracer_checked = False


def otel_tracer(env: Mapping[str, str] | None = None) -> Any:
    """An OpenTelemetry tracer when export is configured and the ``otel`` extra is
    installed; else None (the default: no OpenTelemetry import at all).

    Configured means an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``..._TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` set to ``otlp`` or ``console``;
    ``OTEL_SDK_DISABLED=true`` turns it off. Everything else (service name, headers,
    sampling) is the SDK's reading of the standard ``OTEL_*`` variables.
    """
    global _tracer, _tracer_checked
    if env is None:  # the process's own: decided once
        if not _tracer_checked:
            _tracer, _tracer_checked = otel_tracer(dict(os.environ)), True
        return _tracer
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    wanted = any(env.get(name) for name in _OTEL_ENDPOINTS) or exporter_name in ("otlp", "console")
    if not wanted or exporter_name == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        logging.getLogger(__name__).warning(
            "OTEL_* is set but opentelemetry-sdk is not installed (pip install 'lensflow[otel]'): "
            "no spans are exported"
        )
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "lensflow-predict")})
    )
    if exporter_name == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider.get_tracer("lensflow")


@contextlib.contextmanager
def span(
    name: str,
    parent: TraceContext | None,
    attributes: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[TraceContext]:
    """This process's span for one piece of work, as a ``TraceContext``: a child of
    ``parent`` (or a new trace). With OpenTelemetry export configured it is a real span,
    exported when the block ends; otherwise only ids, nothing exported."""
    tracer = otel_tracer(env)
    if tracer is None:
        yield parent.child() if parent is not None else new_trace()
        return
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    context = None
    if parent is not None:
        remote = SpanContext(
            int(parent.trace_id, 16),
            int(parent.span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(parent.flags),
        )
        context = set_span_in_context(NonRecordingSpan(remote))
    with tracer.start_as_current_span(
        name, context=context, attributes=dict(attributes or {})
    ) as s:
        ids = s.get_span_context()
        yield TraceContext(f"{ids.trace_id:032x}", f"{ids.span_id:016x}", int(ids.trace_flags))
