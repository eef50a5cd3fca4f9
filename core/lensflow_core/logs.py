"""Log lines as text or JSON, carrying the fields of the event being worked on.

``configure_logging(level, fmt)`` sets up the root logger once per process (``fmt`` is
``LENSFLOW_LOG_FORMAT``: ``text`` or ``json``). ``log_fields(trace_id=..., ...)`` binds
fields for the code running inside it (a context variable, so threads and requests do
not mix them up); every line logged meanwhile carries them: as ``key=value`` after a
text line, as keys of the JSON object.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_EMPTY: dict[str, Any] = {}  # never mutated: every change sets a new dict
_fields: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "log_fields",
    default=_EMPTY,
)


@contextlib.contextmanager
def log_fields(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (None values are left out) to every line logged inside."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the current ``log_fields`` scope (known only part-way through)."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})


class _FieldsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.lensflow_fields = _fields.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "lensflow_fields", None) or {}
        if fields:
            line += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the bound fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **(getattr(record, "lensflow_fields", None) or {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure_logging(level: str, fmt: str = "text") -> None:
    """The root logger writes to stderr in ``fmt`` at ``level``, with the bound fields."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_lensflow", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._lensflow = True  # type: ignore[attr-defined]
        handler.addFilter(_FieldsFilter())
        # replace basicConfig's handler, if any, so lines are not written twice
        for old in list(root.handlers):
            if type(old) is logging.StreamHandler:
                root.removeHandler(old)
        root.addHandler(handler)
    handler.setFormatter(formatter(fmt))
    root.setLevel(level.upper())
