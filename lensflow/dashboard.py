"""The live dashboard: predictions as they arrive, the model pointer, lag, dead letters.

``lensflow dashboard`` serves it on its own; ``lensflow up`` and ``lensflow demo`` start it
beside the stack. A Starlette app on uvicorn (127.0.0.1 by default) with server-sent
events; the page (``dashboard_static/``) is plain HTML and JavaScript, no build step, and
puts everything that comes from events on the page with ``textContent``.

- ``GET /`` the page; ``GET /events`` the event stream (``prediction`` and ``state``);
  ``GET /api/state`` the same state as JSON; ``GET /thumb?bucket=&key=`` a small JPEG of an
  image (only buckets of ``LENSFLOW_IMAGE_BUCKETS``, at most ``THUMB_MAX_BYTES``);
  ``GET /metrics`` the stack's Prometheus metrics (the dispatcher's) when run with one.
- ``GET /api/history``: per class per day and per model version, from the predictions
  archive (``lensflow.history``: fixed questions only).
- ``POST /api/flip`` ``{"version", "expect"}`` and ``POST /api/rollback`` ``{"expect"}``:
  the CLI's compare-and-swap (``ModelStore.flip`` with ``expect`` = the version the page
  showed, so a stale page cannot undo a newer flip: 409). Off (403) unless
  ``LENSFLOW_DASHBOARD_TOKEN`` is set; the request's bearer token must equal it (401).
- Labelling in the browser and quality over time: ``lensflow.dashboard_learning``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lensflow.history import ArchiveHistory
from lensflow_core.imaging import ImageError, decode_image
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.dlq_replay import group_by_reason, read_dead_letters
from lensflow_eventing.offsets import group_lag
from lensflow_eventing.predictions import Prediction, PredictionFeed
from lensflow_model_store import (
    NO_POINTER,
    ConflictError,
    ModelStore,
    ModelStoreError,
    NotFoundError,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("dashboard_static")
KEEP_PREDICTIONS = 200
SERIES_POINTS = 300  # one a second: five minutes of throughput, lag and replicas
THUMB_MAX_BYTES = 8 * 1024 * 1024
THUMB_SIDE = 160
THROUGHPUT_WINDOW_S = 10.0
NO_STORE = {"Cache-Control": "no-store"}


class DashboardState:
    """What the page shows, kept current by background threads (S3 and Kafka block)."""

    def __init__(self, config: Config, stack=None, *, refresh_s: float = 1.0):
        self.config = config
        self.stack = stack
        self.refresh_s = refresh_s
        self.store = ModelStore.from_config(config, s3=s3_client(config, timeout_s=5, retries=1))
        self._lock = threading.Lock()
        self._predictions: deque[dict[str, Any]] = deque(maxlen=KEEP_PREDICTIONS)
        self._seq = 0
        self._arrivals: deque[float] = deque()
        self._classes: Counter[str] = Counter()
        self._series: deque[dict[str, Any]] = deque(maxlen=SERIES_POINTS)
        self._state: dict[str, Any] = {
            "pointer": None,
            "no_model": None,  # not known yet
            "versions": [],
            "history": [],
        }
        self._group_lag: int | None = None
        self._stop = threading.Event()
        self._refresher = threading.Thread(
            target=self._refresh, name="dashboard-state", daemon=True
        )
        self._feed: PredictionFeed | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> DashboardState:
        self.refresh_model()  # the page's first view already knows the pointer
        self._feed = PredictionFeed(
            self.config.kafka,
            self.config.topic_predictions,
            lambda prediction, _produced_ms: self._add(prediction),
            last=50,
            group="lensflow-dashboard",
            poll_s=0.5,
        ).start(open_timeout_s=0)  # the page may show before the broker answers
        self._refresher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._feed is not None:
            self._feed.stop()
        if self._refresher.is_alive():
            self._refresher.join(5)

    # --- reading --------------------------------------------------------------------------

    def predictions_after(self, seq: int) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self._predictions if p["seq"] > seq]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.time()
            recent = sum(1 for t in self._arrivals if t > now - THROUGHPUT_WINDOW_S)
            return {
                **self._state,
                "counts": dict(self._classes.most_common()),
                "throughput": round(recent / THROUGHPUT_WINDOW_S, 2),
                "series": list(self._series),
                "seq": self._seq,
                "flips_enabled": bool(self.config.dashboard_token),
            }

    def _add(self, prediction: Prediction) -> None:
        image = prediction.data.get("image", {}) if isinstance(prediction.data, dict) else {}
        with self._lock:
            self._seq += 1
            self._predictions.append(
                {
                    "seq": self._seq,
                    "time": prediction.time,
                    "bucket": str(image.get("bucket") or ""),
                    "key": str(image.get("key") or prediction.subject),
                    "label": prediction.label,
                    "score": prediction.score,
                    "model_version": prediction.model_version,
                }
            )
            self._arrivals.append(time.time())
            while self._arrivals and self._arrivals[0] < time.time() - 60:
                self._arrivals.popleft()
            if prediction.label:
                self._classes[prediction.label] += 1

    def _refresh(self) -> None:
        slow_every = 5  # the store and the DLQ every 5 ticks; lag and replicas every tick
        tick = 0
        while not self._stop.is_set():
            update: dict[str, Any] = {}
            if tick % slow_every == 0:
                update.update(self._model_state())
                update["dead_letters"] = self._dead_letters()
                if self.stack is None:
                    self._group_lag = self._standalone_lag()
            tick += 1
            point = {"t": round(time.time(), 1), **self._flow()}
            with self._lock:
                point["throughput"] = round(
                    sum(1 for t in self._arrivals if t > time.time() - THROUGHPUT_WINDOW_S)
                    / THROUGHPUT_WINDOW_S,
                    2,
                )
                self._series.append(point)
                self._state.update(update)
                self._state["lag"] = point.get("lag")
                self._state["replicas"] = point.get("replicas")
            self._stop.wait(self.refresh_s)

    def refresh_model(self) -> None:
        """Read the pointer, versions and history now (after a flip from the page)."""
        update = self._model_state()
        with self._lock:
            self._state.update(update)

    def _model_state(self) -> dict[str, Any]:
        try:
            pointer = self.store.current()
            versions = self.store.list_versions()
            history = self.store.history()[-20:]
        except ModelStoreError as exc:
            return {"store_error": str(exc)}
        return {
            "store_error": None,
            "pointer": pointer.to_json() if pointer else None,
            "no_model": pointer is None,
            "versions": [
                {
                    "version": v.version,
                    "sha256": v.sha256[:12],
                    "metrics": v.metadata.get("metrics", {}),
                    "created": v.metadata.get("created_at") or v.metadata.get("created"),
                }
                for v in versions
            ],
            "history": history,
        }

    def _dead_letters(self) -> list[dict[str, Any]] | None:
        try:
            letters = read_dead_letters(
                self.config.kafka,
                self.config.topic_dlq,
                self.config.topic_images,
                timeout_s=3.0,
            )
        except Exception as exc:
            log.debug("dashboard: reading dead letters: %s", exc)
            return None
        return group_by_reason(letters)

    def _standalone_lag(self) -> int | None:
        """Without a stack: the KafkaSource consumer group's lag, asked of the broker."""
        try:
            return group_lag(
                self.config.kafka, self.config.topic_images, self.config.source_group, 3.0
            )
        except Exception as exc:
            log.debug("dashboard: lag of %s: %s", self.config.source_group, exc)
            return None

    def _flow(self) -> dict[str, Any]:
        if self.stack is None:  # replicas are the cluster's to count (Knative, kubectl)
            return {"lag": self._group_lag, "replicas": None}
        stats = self.stack.stats()
        dispatcher = stats.get("dispatcher") or {}
        predict = stats.get("predict") or {}
        return {"lag": dispatcher.get("lag"), "replicas": predict.get("replicas")}


# --- the web app ------------------------------------------------------------------------


def make_app(state: DashboardState, metrics_registry=None) -> Starlette:
    from lensflow.dashboard_learning import learning_routes

    return Starlette(
        routes=[
            *learning_routes(state),
            *_view_routes(state),
            *_control_routes(state),
            Route("/metrics", _metrics_endpoint(metrics_registry)),
        ]
    )


def _static(name: str, media_type: str | None = None):
    async def endpoint(_request: Request) -> Response:
        return FileResponse(STATIC / name, media_type=media_type, headers=NO_STORE)

    return endpoint


def _view_routes(state: DashboardState) -> list[Route]:
    """What the page reads: itself, the state, the event stream, thumbnails, history."""
    config = state.config
    history = ArchiveHistory(config)

    async def api_history(_request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(history.get), headers=NO_STORE)

    async def api_state(_request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(state.snapshot))

    async def events(request: Request) -> Response:
        return StreamingResponse(
            _event_stream(state, request),
            media_type="text/event-stream",
            headers={**NO_STORE, "X-Accel-Buffering": "no"},
        )

    async def thumb(request: Request) -> Response:
        bucket = request.query_params.get("bucket", "")
        key = request.query_params.get("key", "")
        if bucket not in config.image_buckets or not key:
            return JSONResponse({"error": "not an image of LENSFLOW_IMAGE_BUCKETS"}, 404)
        return await asyncio.to_thread(_thumbnail, config, bucket, key)

    return [
        Route("/", _static("index.html")),
        Route("/dashboard.js", _static("dashboard.js", "text/javascript")),
        Route("/history.js", _static("history.js", "text/javascript")),
        Route("/api/state", api_state),
        Route("/api/history", api_history),
        Route("/events", events),
        Route("/thumb", thumb),
    ]


async def _event_stream(state: DashboardState, request: Request):
    """Server-sent events: each new prediction, and the state once a second."""
    seq = max(state.snapshot()["seq"] - 30, 0)  # the newest few at once
    last_state = 0.0
    yield "retry: 2000\n\n"
    while not await request.is_disconnected() and not state._stop.is_set():
        for prediction in state.predictions_after(seq):
            seq = prediction["seq"]
            yield f"event: prediction\ndata: {json.dumps(prediction)}\n\n"
        if time.monotonic() - last_state >= 1.0:
            last_state = time.monotonic()
            snapshot = await asyncio.to_thread(state.snapshot)
            yield f"event: state\ndata: {json.dumps(snapshot, default=str)}\n\n"
        await asyncio.sleep(0.2)


def _control_routes(state: DashboardState) -> list[Route]:
    """Flip and rollback: the CLI's compare-and-swap, behind the dashboard token."""
    token = state.config.dashboard_token

    async def flip(request: Request) -> Response:
        refused = _authorise(request, token)
        if refused is not None:
            return refused
        body = await _json(request)
        if not isinstance(body.get("version"), str) or "expect" not in body:
            return JSONResponse({"error": "send version and expect (the version shown)"}, 400)
        return await asyncio.to_thread(
            _change, state, "flip", body["version"], _expected(body["expect"])
        )

    async def rollback(request: Request) -> Response:
        refused = _authorise(request, token)
        if refused is not None:
            return refused
        body = await _json(request)
        if "expect" not in body:
            return JSONResponse({"error": "send expect (the version shown)"}, 400)
        return await asyncio.to_thread(_change, state, "rollback", None, _expected(body["expect"]))

    return [
        Route("/api/flip", flip, methods=["POST"]),
        Route("/api/rollback", rollback, methods=["POST"]),
    ]


def _metrics_endpoint(metrics_registry):
    async def metrics(_request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if metrics_registry is None:
            return JSONResponse({"error": "no stack here: scrape the dispatcher itself"}, 404)
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _expected(value: Any) -> str:
    """The page sends null for "no pointer yet"."""
    return NO_POINTER if value in (None, "") else str(value)


def _authorise(request: Request, token: str) -> Response | None:
    if not token:
        return JSONResponse(
            {"error": "flips from the dashboard are off: set LENSFLOW_DASHBOARD_TOKEN"}, 403
        )
    sent = request.headers.get("authorization", "")
    sent = sent[7:] if sent.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(sent.encode(), token.encode()):
        return JSONResponse({"error": "wrong or missing token"}, 401)
    return None


def _change(state: DashboardState, action: str, version: str | None, expect: str) -> Response:
    """Flip or roll back by compare-and-swap against the version the page showed."""
    store = state.store
    try:
        if action == "rollback":
            current = store.current()
            if current is None or current.version != expect:
                raise ConflictError(
                    f"pointer is at {current.version if current else 'no version'}, not {expect}"
                )
            if not current.previous:
                return JSONResponse({"error": f"nothing to roll back to from {expect}"}, 409)
            version = current.previous
        pointer = store.flip(
            version,
            expect=expect,
            reason=f"{action} from the dashboard",
            by="dashboard",
            action=action,
        )
    except ConflictError as exc:
        return JSONResponse({"error": f"the pointer moved: {exc}; reload"}, 409)
    except NotFoundError as exc:
        return JSONResponse({"error": str(exc)}, 404)
    except ModelStoreError as exc:
        return JSONResponse({"error": str(exc)}, 422)
    state.refresh_model()
    return JSONResponse(pointer.to_json())


def _thumbnail(config: Config, bucket: str, key: str, side: int = THUMB_SIDE) -> Response:
    s3 = s3_client(config, timeout_s=5, retries=0)
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] > THUMB_MAX_BYTES:
            return JSONResponse({"error": "image too large for a thumbnail"}, 413)
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read(THUMB_MAX_BYTES + 1)
        image = decode_image(data, (side, side), max_pixels=config.max_image_pixels)
    except ImageError as exc:
        return JSONResponse({"error": exc.reason}, exc.status)
    except Exception as exc:  # missing object, store away: no thumbnail
        return JSONResponse({"error": f"no thumbnail: {type(exc).__name__}"}, 404)
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=80)
    return Response(
        out.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
    )


class DashboardServer:
    """The dashboard on ``host:port`` in a background thread (``lensflow up``, demo)."""

    def __init__(
        self,
        config: Config,
        stack=None,
        *,
        host: str = "127.0.0.1",
        port: int = 8090,
        metrics_registry=None,
    ):
        import uvicorn

        self.state = DashboardState(config, stack)
        self.app = make_app(self.state, metrics_registry)
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}/"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=host,
                port=port,
                log_level="warning",
                timeout_graceful_shutdown=1,
                lifespan="off",
            )
        )
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> DashboardServer:
        self.state.start()
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.state.stop()
                raise RuntimeError(f"the dashboard did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.state.stop()  # ends the event streams
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
