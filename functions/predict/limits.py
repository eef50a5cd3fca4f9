"""Limits on the HTTP request itself, enforced before the handler sees it.

- The body: a KafkaSource event is a bucket notification of a few KB. A body over
  ``LENSFLOW_MAX_EVENT_BYTES`` is refused with 413 from its Content-Length, before a byte
  of it is read; a chunked body (no Content-Length) is read with that cap.
- The headers: gunicorn (functions-framework's server) refuses a header line over
  ``limit_request_field_size`` (8190 bytes) or more than 100 headers itself, before any
  application code runs, with an HTML page. ``json_server_errors`` makes those answers
  (431, 400, 414) JSON with the reason, like every other refusal of the function.
"""

from __future__ import annotations

import json
from typing import BinaryIO

from functions.predict.errors import Rejected

_CHUNK = 64 * 1024


def read_body(stream: BinaryIO, declared: int | None, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes, or ``Rejected(413)``."""
    if declared is not None and declared > limit:
        raise Rejected(413, f"the request body is {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise Rejected(413, f"the request body is over the limit of {limit} bytes")


def _json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    from gunicorn import util

    body = json.dumps({"error": mesg or reason, "status": status_int}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def json_server_errors() -> None:
    """Make gunicorn's own answers to malformed requests JSON (no-op without gunicorn).

    gunicorn offers no hook for these pages; its workers call ``gunicorn.util.write_error``
    by module attribute, so replacing that function is the narrowest change.
    """
    try:
        from gunicorn import util
    except ImportError:
        return
    util.write_error = _json_error
