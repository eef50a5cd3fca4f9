"""The predict function: a KafkaSource CloudEvent about an upload in, a prediction out.

Served by functions-framework (`functions-framework --target predict --source ...`, or
`lensflow serve predict`). GET /healthz says whether the replica is ready, GET /metrics
is Prometheus text exposition (answered without touching the store: the liveness probe),
GET /stats the replica's counters as JSON.
"""

from __future__ import annotations

import flask
import functions_framework

from functions.predict import metrics
from functions.predict.app import replica
from functions.predict.errors import Rejected
from functions.predict.limits import json_server_errors, read_body

json_server_errors()  # here, in the server process, before gunicorn forks its worker


@functions_framework.http
def predict(request: flask.Request) -> flask.Response:
    if request.method == "GET" and request.path.rstrip("/") == "/metrics":
        body, content_type = metrics.exposition()
        return flask.Response(body, 200, {"Content-Type": content_type})
    current = replica()
    if request.method == "GET":
        if request.path.rstrip("/") == "/stats":
            return flask.jsonify(current.metrics())
        status, body = current.health()
        return flask.jsonify(body), status
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
