"""The train function over HTTP (`lensflow serve train`): a trigger in, a round started, 202.

On Knative a round is a JobSink Job (``job.py``), never an HTTP request. This server is
for running rounds by HTTP elsewhere: a POST (a CloudEvent, binary or structured, with
data ``{"reason": ..., "force": ...}``, or a plain JSON body; empty means
``{"reason": "manual"}``) starts ``lensflow-train-job`` as a child process on that event and
answers 202 at once, so no request waits for a round and ``GET /healthz`` keeps answering
while one runs. One child at a time: a POST while one runs answers 200 ``{"skipped": ...}``
(a 409 would be retried); across replicas the model store's lease keeps rounds apart.
A request that is not a training request answers 400 and starts nothing. ``GET /metrics``:
the rounds' Prometheus metrics (``lensflow_train.metrics``), counted as each child ends.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import flask
import functions_framework
from cloudevents.conversion import to_json

from lensflow_train.metrics import process_metrics
from lensflow_train.trigger import TriggerError, request_event, trigger_of

log = logging.getLogger("lensflow.train")

_lock = threading.Lock()
_state: dict[str, Any] = {"running": None, "last": None, "rounds": 0}
_metrics = process_metrics()


def _reply(status: int, payload: dict[str, Any]) -> flask.Response:
    return flask.Response(
        json.dumps(payload, default=str), status, {"Content-Type": "application/json"}
    )


def _start_round(event_json: bytes) -> dict[str, Any]:
    """``lensflow-train-job`` on this event in a child; a thread records how it ended."""
    folder = Path(tempfile.mkdtemp(prefix="lensflow-train-"))
    event_file = folder / "event"
    event_file.write_bytes(event_json)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lensflow_train.job", "--event", str(event_file)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    running = {"pid": proc.pid, "started_at": round(time.time(), 3)}

    def wait() -> None:
        out, _ = proc.communicate()
        event_file.unlink(missing_ok=True)
        folder.rmdir()
        try:
            report = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            report = {}
        seconds = time.time() - running["started_at"]
        _metrics.record(report or None, seconds, failed=proc.returncode != 0)
        with _lock:
            _state["running"] = None
            _state["rounds"] += 1
            _state["last"] = {
                **running,
                "exit_code": proc.returncode,
                "round_id": report.get("round_id"),
                "outcome": report.get("outcome", "failed"),
                "reason": report.get("reason", f"lensflow-train-job exited {proc.returncode}"),
                "pointer": report.get("pointer"),
                "seconds": round(seconds, 3),
            }
        log.info("train round ended (exit %s): %s", proc.returncode, _state["last"]["reason"])

    threading.Thread(target=wait, name="train-round", daemon=True).start()
    return running


@functions_framework.http
def train(request: flask.Request) -> flask.Response:
    if request.method == "GET":
        if request.path.rstrip("/") == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

            return flask.Response(
                generate_latest(REGISTRY), 200, {"Content-Type": CONTENT_TYPE_LATEST}
            )
        with _lock:
            return _reply(200, {"status": "ok", **_state})
    if request.method != "POST":
        return _reply(
            405, {"error": "POST a training request (CloudEvent or JSON), or GET /healthz"}
        )
    try:
        event = request_event(request)
    except TriggerError as exc:
        return _reply(400, {"error": str(exc)})
    trigger = trigger_of(event).to_dict()
    with _lock:
        if _state["running"] is not None:
            return _reply(
                200, {"skipped": "a round is already running", "trigger": trigger, **_state}
            )
        _state["running"] = _start_round(to_json(event))
        return _reply(202, {"accepted": True, "round": _state["running"], "trigger": trigger})
