"""The predict function: a KafkaSource CloudEvent about an upload in, a prediction out.

Served by functions-framework's ASGI mode (`functions-framework --asgi --target predict
--source ...`, or `lensflow serve predict`): uvicorn parses HTTP in C (httptools), which
costs a replica about 0.3 ms of CPU less per event than Flask on gunicorn's threads
(docs/benchmarks.md). The handler blocks (S3, LiteRT), so it runs on ``THREADS`` threads
of its own; reading the body, waiting for the broker's ack of the prediction and answering
stay on the event loop, so that no request thread sits blocked on the broker.

GET /healthz says whether the replica is ready, GET /metrics is Prometheus text
exposition (answered without touching the store: the liveness probe), GET /stats the
replica's counters as JSON.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lensflow_core.kafka import KafkaSetupError
from lensflow_core.lifetime import end_with_parent
from lensflow_predict import metrics
from lensflow_predict.app import existing_replica, get_replica
from lensflow_predict.errors import Rejected
from lensflow_predict.limits import check_headers, json_parse_errors, read_body
from lensflow_predict.sink import ProduceError

log = logging.getLogger(__name__)
_last_setup_error: str | None = None
# THREADS is functions-framework's own variable (its gthread server reads it the same way).
# Threads are made on first use, in the worker: none exists when gunicorn forks.
_threads = ThreadPoolExecutor(int(os.environ.get("THREADS", "4")), "predict")

json_parse_errors()  # here, in the server process, before gunicorn forks its worker
# In gunicorn's worker: end with the arbiter. gthread workers poll for that, uvicorn
# workers do not, and an orphan would keep the model's memory (a SIGKILLed ``up``).
os.register_at_fork(after_in_child=functools.partial(end_with_parent, os.getpid(), signal.SIGTERM))


async def _on_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(_threads, function, *args)


@functions_framework.aio.http
async def predict(request: Request) -> Response:
    global _last_setup_error
    path = request.url.path.rstrip("/")
    if request.method == "GET" and path == "/metrics":
        body, content_type = metrics.exposition()
        return Response(body, 200, {"Content-Type": content_type})
    try:
        current = existing_replica() or await _on_thread(get_replica)  # made on a thread: it blocks
    except (KafkaSetupError, ValueError, OSError) as exc:  # settings that cannot work
        if str(exc) != _last_setup_error:
            log.error("cannot start: %s", exc)
            _last_setup_error = str(exc)
        return JSONResponse({"ok": False, "reason": str(exc)}, 503)
    if request.method == "GET":
        if path == "/stats":
            return JSONResponse(current.stats())
        status, body = current.health()
        return JSONResponse(body, status)
    if current.kafka_problem is not None:  # the event could not be produced: retry later
        return JSONResponse({"error": current.kafka_problem}, 503)
    try:
        check_headers(request.headers.raw)
        body = await read_body(request, current.config.max_event_bytes)
    except Rejected as exc:
        reply = current.handler.reject(exc)
        # The rest of the body stays unread: close the connection rather than drain it.
        return Response(reply.body, reply.status, {**reply.headers, "Connection": "close"})
    reply = await _on_thread(current.answer, dict(request.headers), body)
    if reply.unacked:
        reply = current.handler.settle(reply, await _acked(reply.unacked))
    return Response(reply.body, reply.status, reply.headers)


async def _acked(futures) -> str | None:
    """None once the broker acknowledged every future; else why not. The producer's own
    ``message.timeout.ms`` fails a future that waits too long."""
    try:
        for future in futures:
            await asyncio.wrap_future(future)
    except ProduceError as exc:
        return str(exc)
    return None
