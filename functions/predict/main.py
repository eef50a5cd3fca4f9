"""The predict function: a KafkaSource CloudEvent about an upload in, a prediction out.

Served by functions-framework (`functions-framework --target predict --source ...`, or
`lensflow serve predict`). GET /healthz says whether the replica is ready, GET /metrics
is Prometheus text exposition (answered without touching the store: the liveness probe),
GET /stats the replica's counters as JSON.
"""

from __future__ import annotations

import logging

import flask
import functions_framework

from functions.predict import metrics
from functions.predict.app import replica
from functions.predict.errors import Rejected
from functions.predict.limits import json_server_errors, read_body
from lensflow_core.kafka import KafkaSetupError

log = logging.getLogger(__name__)
_last_setup_error: str | None = None

json_server_errors()  # here, in the server process, before gunicorn forks its worker


@functions_framework.http
def predict(request: flask.Request) -> flask.Response:
    global _last_setup_error
    if request.method == "GET" and request.path.rstrip("/") == "/metrics":
        body, content_type = metrics.exposition()
        return flask.Response(body, 200, {"Content-Type": content_type})
    try:
        current = replica()
    except (KafkaSetupError, ValueError, OSError) as exc:  # settings that cannot work
        if str(exc) != _last_setup_error:
            log.error("cannot start: %s", exc)
            _last_setup_error = str(exc)
        return flask.make_response(flask.jsonify({"ok": False, "reason": str(exc)}), 503)
    if request.method == "GET":
        if request.path.rstrip("/") == "/stats":
            return flask.jsonify(current.metrics())
        status, body = current.health()
        return flask.jsonify(body), status
    if current.kafka_problem is not None:  # the event could not be produced: retry later
        return flask.make_response(flask.jsonify({"error": current.kafka_problem}), 503)
    try:
        body = read_body(request.stream, request.content_length, current.config.max_event_bytes)
    except Rejected as exc:
        reply = current.handler.reject(exc)
        # The rest of the body stays unread: close the connection rather than drain it.
        # A streamed response, because functions-framework reads the whole request body
        # after every other response (its ``read_request`` after-request hook).
        headers = {**reply.headers, "Connection": "close"}
        return flask.Response(iter([reply.body]), reply.status, headers)
    with current.coming():
        reply = current.handler.handle(dict(request.headers), body)
    return flask.Response(reply.body, reply.status, reply.headers)
