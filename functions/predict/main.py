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


@functions_framework.http
def predict(request: flask.Request) -> flask.Response:
    if request.method == "GET" and request.path.rstrip("/") == "/metrics":
        body, content_type = metrics.exposition()
        return flask.Response(body, 200, {"Content-Type": content_type})
    current = replica()
    if request.method == "GET":
        if request.path.rstrip("/") == "/stats":
            return flask.jsonify(current.metrics())
        return flask.jsonify(current.health())
    with current.coming():
        reply = current.handler.handle(dict(request.headers), request.get_data())
    return flask.Response(reply.body, reply.status, reply.headers)
