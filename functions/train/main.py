"""The train function: a PingSource tick (or any POST) in, one training round's report out.

Served by functions-framework (`functions-framework --target train --source ...`, or
`lensflow serve train`). Accepts a PingSource CloudEvent in binary or structured mode, or a
plain POST (JSON body optional; ``{"force": true}`` trains even without new data).
One round at a time per replica: a trigger that arrives while a round runs gets 200 with
``{"skipped": ...}`` (a 409 would make Knative retry it). 503 when S3 cannot be reached.
GET /healthz reports whether a round is running and the last outcome; GET /metrics the
rounds' Prometheus metrics (``functions.train.metrics``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import flask
import functions_framework

from functions.train.metrics import RoundMetrics
from functions.train.round import run_round
from functions.train.trigger import parse_trigger, store_unavailable
from lensflow_core.settings import Config

log = logging.getLogger("lensflow.train")

_round_lock = threading.Lock()
_state: dict[str, Any] = {"running": False, "last": None, "rounds": 0}
_metrics = RoundMetrics()


def _reply(status: int, payload: dict[str, Any]) -> flask.Response:
    return flask.Response(
        json.dumps(payload, default=str), status, {"Content-Type": "application/json"}
    )


@functions_framework.http
def train(request: flask.Request) -> flask.Response:
    if request.method == "GET":
        if request.path.rstrip("/") == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

            return flask.Response(
                generate_latest(REGISTRY), 200, {"Content-Type": CONTENT_TYPE_LATEST}
            )
        return _reply(200, {"status": "ok", **_state})
    if request.method != "POST":
        return _reply(405, {"error": "POST a trigger (CloudEvent or plain), or GET /healthz"})
    try:
        trigger = parse_trigger(request)
    except ValueError as exc:
        return _reply(400, {"error": str(exc)})
    if not _round_lock.acquire(blocking=False):
        return _reply(200, {"skipped": "a round is already running", "trigger": trigger})
    _state["running"] = True
    started = time.perf_counter()
    try:
        config = Config.from_env()
        report = run_round(config, force=trigger["force"])
    except Exception as exc:
        _metrics.record(None, time.perf_counter() - started, failed=True)
        if store_unavailable(exc):
            log.warning("train round: object store unavailable: %s", exc)
            return _reply(503, {"error": f"object store unavailable: {exc}", "trigger": trigger})
        log.exception("train round failed")
        return _reply(500, {"error": f"{type(exc).__name__}: {exc}", "trigger": trigger})
    finally:
        _state["running"] = False
        _round_lock.release()
    result = report.to_dict()
    _metrics.record(result, time.perf_counter() - started)
    _state["rounds"] += 1
    _state["last"] = {
        "round_id": report.round_id,
        "outcome": report.outcome,
        "reason": report.reason,
        "seconds": round(time.perf_counter() - started, 3),
    }
    log.info("train round %s: %s", report.round_id, report.reason)
    return _reply(200, {**result, "trigger": trigger})
