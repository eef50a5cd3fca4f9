"""Limits on the HTTP request itself, enforced before the handler sees it.

- The body: a KafkaSource event is a bucket notification of a few KB. A body over
  ``LENSFLOW_MAX_EVENT_BYTES`` is refused with 413 from its Content-Length, before a byte
  of it is read; a chunked body (no Content-Length) is read with that cap.
- The headers: a header line over ``MAX_HEADER_BYTES`` or more than ``MAX_HEADERS``
  headers is refused with 431 (gunicorn's limits, which uvicorn does not apply).
- Requests the HTTP parser itself refuses (uvicorn answers 400 before any application
  code runs, as plain text): ``json_parse_errors`` makes that answer JSON with the
  reason, like every other refusal of the function.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from lensflow_predict.errors import Rejected

MAX_HEADER_BYTES = 8190
MAX_HEADERS = 100


def check_headers(raw: list[tuple[bytes, bytes]]) -> None:
    """``Rejected(431)`` for too many headers or a header line that is too long."""
    if len(raw) > MAX_HEADERS:
        raise Rejected(431, f"{len(raw)} request headers, over the limit of {MAX_HEADERS}")
    for name, value in raw:
        if len(name) + len(value) + 2 > MAX_HEADER_BYTES:
            raise Rejected(
                431,
                f"request header {name[:64].decode('latin-1')!r} is over the limit of "
                f"{MAX_HEADER_BYTES} bytes",
            )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes, or ``Rejected(413)``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"the request body is {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise Rejected(413, f"the request body is over the limit of {limit} bytes")
    return b"".join(chunks)


def _json_400(self, msg: str) -> None:
    body = json.dumps({"error": msg, "status": 400}).encode()
    self.transport.write(
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    self.transport.close()


def json_parse_errors() -> None:
    """Make uvicorn's own answers to malformed requests JSON.

    uvicorn offers no hook for them; both of its HTTP protocols answer through
    ``send_400_response``, so replacing that method is the narrowest change.
    """
    from uvicorn.protocols.http import h11_impl, httptools_impl

    httptools_impl.HttpToolsProtocol.send_400_response = _json_400
    h11_impl.H11Protocol.send_400_response = _json_400
