"""The predict function: a KafkaSource CloudEvent about an upload in, a prediction out.

Served by functions-framework (`functions-framework --target predict --source ...`, or
`lensflow serve predict`). GET /healthz and GET /metrics report on the replica.
"""

from __future__ import annotations

import flask
import functions_framework

from functions.predict.app import replica


@functions_framework.http
def predict(request: flask.Request) -> flask.Response:
    current = replica()
    if request.method == "GET":
        if request.path.rstrip("/") == "/metrics":
            return flask.jsonify(current.metrics())
        return flask.jsonify(current.health())
    with current.coming():
        reply = current.handler.handle(dict(request.headers), request.get_data())
    return flask.Response(reply.body, reply.status, reply.headers)
