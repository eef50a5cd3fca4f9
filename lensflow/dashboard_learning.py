"""The dashboard's learning views: labelling queued photos, and quality over time.

- ``GET /api/queue``: queued photos, most uncertain first, with the model's top guesses
  and the classes there are (the serving model's labels).
- ``GET /queue-image?record=to-label/...``: the photo a queue record names, as a JPEG of
  at most ``VIEW_SIDE`` pixels a side; read-only, and only for photos still queued.
- ``POST /api/label`` ``{"image": "<bucket>/<key>", "class", "holdout": false}`` and
  ``POST /api/label/undo`` ``{"image"}``: ``lensflow_model_store.label_images.label`` / ``undo``, the
  CLI's own functions, with ``strict`` (only queued photos, never a relabel). 200 with the
  stored object's name; 409 not queued, labelled already, or another labeller won; 422
  malformed body or unknown class; 403/401 as for flips (``LENSFLOW_DASHBOARD_TOKEN``).
- ``GET /api/quality``: the rounds the model store keeps (``lensflow_model_store.rounds``), the
  serving model's score across versions, the champion's confusion matrix, the round
  running now (the lease), the last one and the next scheduled.

Everything here comes from the model store and the train bucket, never from the browser.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from lensflow.dashboard import STATIC, _authorise, _thumbnail
from lensflow_core.s3 import s3_client
from lensflow_model_store import ModelStoreError, NotFoundError, StoreUnavailableError
from lensflow_model_store.label_images import (
    LabelConflict,
    LabelRefused,
    label,
    serving_labels,
    undo,
)
from lensflow_model_store.label_queue import LabelQueue, QueueEntry
from lensflow_model_store.layout import HOLDOUT, LABELED, QUEUE
from lensflow_model_store.rounds import RoundLog, summary

VIEW_SIDE = 512  # large enough to judge, small enough to move quickly
QUEUE_PAGE = 50
MAX_BY = 64
LABEL_FIELDS = {"image", "class", "holdout", "by"}


def learning_routes(state) -> list[Route]:
    """The routes above, on ``state`` (a ``lensflow.dashboard.DashboardState``)."""
    config = state.config
    s3 = s3_client(config, timeout_s=5, retries=1)
    queue = LabelQueue(s3, config.train_bucket, config.label_queue_max)

    async def api_queue(request: Request) -> Response:
        return await asyncio.to_thread(_queue_view, state, queue)

    async def queue_image(request: Request) -> Response:
        record = request.query_params.get("record", "")
        return await asyncio.to_thread(_queued_image, config, queue, record)

    async def api_label(request: Request) -> Response:
        refused = _authorise(request, config.dashboard_token)
        if refused is not None:
            return refused
        body, problem = await _body(request, required=("image", "class"))
        if problem:
            return JSONResponse({"error": problem}, 422)
        return await asyncio.to_thread(_label, state, s3, queue, body)

    async def api_undo(request: Request) -> Response:
        refused = _authorise(request, config.dashboard_token)
        if refused is not None:
            return refused
        body, problem = await _body(request, required=("image",))
        if problem:
            return JSONResponse({"error": problem}, 422)
        return await asyncio.to_thread(_undo, state, s3, queue, body)

    async def api_quality(_request: Request) -> Response:
        return await asyncio.to_thread(_quality, state)

    async def script(_request: Request) -> Response:
        return FileResponse(STATIC / "learning.js", media_type="text/javascript")

    return [
        Route("/api/queue", api_queue),
        Route("/queue-image", queue_image),
        Route("/api/label", api_label, methods=["POST"]),
        Route("/api/label/undo", api_undo, methods=["POST"]),
        Route("/api/quality", api_quality),
        Route("/learning.js", script),
    ]


async def _body(request: Request, required: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The request's JSON object, or why it is not a labelling request."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return {}, 'the body is not JSON: send {"image": "<bucket>/<key>", "class": "<label>"}'
    if not isinstance(body, dict):
        return {}, "the body must be a JSON object"
    unknown = sorted(set(body) - LABEL_FIELDS)
    if unknown:
        return {}, f"unknown field(s): {', '.join(unknown)}"
    for name in required:
        if not isinstance(body.get(name), str) or not body[name]:
            return {}, f'"{name}" must be a non-empty string'
    if not isinstance(body.get("holdout", False), bool):
        return {}, '"holdout" must be true or false'
    by = body.get("by", "")
    if not isinstance(by, str) or len(by) > MAX_BY or not by.isprintable():
        return {}, f'"by" must be a name of at most {MAX_BY} printable characters'
    return body, ""


def _who(body: dict[str, Any]) -> str:
    name = str(body.get("by") or "").strip()
    return f"dashboard:{name}" if name else "dashboard"


def _store_trouble(exc: ModelStoreError) -> Response:
    status = 503 if isinstance(exc, StoreUnavailableError) else 502
    return JSONResponse({"error": f"the object store: {exc}"}, status)


def _decided(act) -> Response:
    """``act()``'s JSON answer, or the refusal: 409 conflict, 422 bad request, 5xx store."""
    try:
        return JSONResponse(act())
    except LabelConflict as exc:
        return JSONResponse({"error": str(exc)}, 409)
    except LabelRefused as exc:
        return JSONResponse({"error": str(exc)}, 422)
    except ModelStoreError as exc:
        return _store_trouble(exc)


def _label(state, s3, queue: LabelQueue, body: dict[str, Any]) -> Response:
    config = state.config
    split = HOLDOUT if body.get("holdout") else LABELED

    def act() -> dict[str, Any]:
        [item] = label(
            s3,
            train_bucket=config.train_bucket,
            image_buckets=config.image_buckets,
            known_labels=serving_labels(state.store),
            cls=body["class"],
            paths=[body["image"]],
            split=split,
            by=_who(body),
            queue=queue,
            strict=True,
        )
        return {
            "stored": f"{config.train_bucket}/{item.target}",
            "bucket": config.train_bucket,
            "key": item.target,
            "image": item.source,
            "class": body["class"],
            "split": split,
            "by": _who(body),
            "decision": item.sequence,
            "dequeued": item.dequeued,
        }

    return _decided(act)


def _undo(state, s3, queue: LabelQueue, body: dict[str, Any]) -> Response:
    bucket = state.config.train_bucket

    def act() -> dict[str, Any]:
        done = undo(s3, train_bucket=bucket, path=body["image"], by=_who(body), queue=queue)
        return {
            "undone": f"{bucket}/{done.target}",
            "image": done.image,
            "class": done.cls,
            "by": done.by,
            "decision": done.sequence,
            "requeued": len(done.requeue),
        }

    return _decided(act)


def _queue_view(state, queue: LabelQueue) -> Response:
    try:
        pending = queue.pending()
        classes = serving_labels(state.store)
    except ModelStoreError as exc:
        return _store_trouble(exc)
    return JSONResponse(
        {
            "total": len(pending),
            "entries": [e.to_json() for e in pending[:QUEUE_PAGE]],
            "classes": classes or [],
            "labelling_enabled": bool(state.config.dashboard_token),
        },
        headers={"Cache-Control": "no-store"},
    )


def _queued_image(config, queue: LabelQueue, record: str) -> Response:
    """The photo queue record ``record`` names, while it is queued; nothing else."""
    parts = record.split("/")
    if len(parts) != 3 or parts[0] != QUEUE or not parts[2].endswith(".json") or ".." in parts:
        return JSONResponse({"error": "not a queue record (to-label/<version>/<id>.json)"}, 404)
    try:
        body, _ = queue.objects.get(record)  # type: ignore[misc]
        entry = QueueEntry.from_json(json.loads(body), record)
    except NotFoundError:
        return JSONResponse({"error": "not queued (labelled already?)"}, 404)
    except (ModelStoreError, KeyError, TypeError, ValueError) as exc:
        return JSONResponse({"error": f"unreadable queue record: {type(exc).__name__}"}, 404)
    if entry.bucket not in config.image_buckets:
        return JSONResponse({"error": "not an image of LENSFLOW_IMAGE_BUCKETS"}, 404)
    return _thumbnail(config, entry.bucket, entry.key, VIEW_SIDE)


def _quality(state) -> Response:
    store = state.store
    try:
        reports = RoundLog(store.objects, store.name).latest(limit=30)
        pointer = store.current()
        versions = store.list_versions()
        lease = store.lease(state.config.train_lease_ttl_s).read()
    except ModelStoreError as exc:
        return _store_trouble(exc)
    rounds = [summary(r) for r in reports]
    serving = pointer.version if pointer else None
    now = time.time()
    return JSONResponse(
        {
            "rounds": rounds,
            "scores": [_score(v) for v in versions],
            "serving": serving,
            "champion": _champion(rounds, serving),
            "running": lease.to_json() if lease and lease.expires_at_s > now else None,
            "last": rounds[-1] if rounds else None,
            "next": _next_round(state, now),
        },
        headers={"Cache-Control": "no-store"},
    )


def _score(info) -> dict[str, Any]:
    metrics = info.metadata.get("metrics") or {}
    return {
        "version": info.version,
        "macro_f1": metrics.get("macro_f1"),
        "accuracy": metrics.get("accuracy"),
        "created_at": info.metadata.get("created_at"),
    }


def _champion(rounds: list[dict[str, Any]], serving: str | None) -> dict[str, Any] | None:
    """The serving model's newest figures on a round's holdout (its confusion matrix)."""
    for r in reversed(rounds):
        for role in ("challenger", "champion"):
            model = r.get(role)
            if model and model.get("version") == serving and model.get("confusion"):
                return {**model, "round_id": r["round_id"], "role": role}
    return None


def _next_round(state, now: float) -> dict[str, Any] | None:
    """When the next scheduled round starts: the local timer's, else the cron schedule's."""
    timer = getattr(state.stack, "timer", None) if state.stack is not None else None
    if timer is not None and getattr(timer, "next_at", None):
        return {"at": _iso(timer.next_at), "by": f"every {timer.every_s:g} s (lensflow up)"}
    schedule = state.config.train_schedule.strip()
    if not schedule:
        return None
    try:
        at = next_cron(schedule, datetime.fromtimestamp(now, timezone.utc))
    except ValueError as exc:
        return {"at": None, "by": f"LENSFLOW_TRAIN_SCHEDULE: {exc}"}
    return {"at": at.isoformat().replace("+00:00", "Z"), "by": f"cron {schedule} (UTC)"}


def _iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def _field(text: str, low: int, high: int) -> set[int]:
    """One cron field (``*``, ``a``, ``a-b``, ``*/n``, ``a-b/n``, lists of them)."""
    values: set[int] = set()
    for part in text.split(","):
        span, _, step = part.partition("/")
        if span == "*":
            start, end = low, high
        elif "-" in span:
            start, end = (int(x) for x in span.split("-", 1))
        else:
            start = end = int(span)
        if not (low <= start <= end <= high) or (step and int(step) < 1):
            raise ValueError(f"{part!r} is out of {low}-{high}")
        values.update(range(start, end + 1, int(step or 1)))
    return values


def next_cron(expression: str, after: datetime) -> datetime:
    """The first minute after ``after`` that the 5-field cron ``expression`` names."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r} is not five cron fields")
    try:
        minutes, hours, days, months, weekdays = (
            _field(f, lo, hi)
            for f, (lo, hi) in zip(
                fields, ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7)), strict=True
            )
        )
    except ValueError as exc:
        raise ValueError(f"{expression!r}: {exc}") from None
    weekdays = {d % 7 for d in weekdays}  # 0 and 7 are both Sunday
    day = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(366 * 5):
        # cron: when both day fields are restricted, either may match
        dom, dow = fields[2] != "*", fields[4] != "*"
        in_dom, in_dow = day.day in days, (day.isoweekday() % 7) in weekdays
        day_ok = (in_dom or in_dow) if (dom and dow) else (in_dom and in_dow)
        if day.month in months and day_ok:
            for hour in sorted(hours):
                for minute in sorted(minutes):
                    at = day.replace(hour=hour, minute=minute)
                    if at > after:
                        return at
        day = (day + timedelta(days=1)).replace(hour=0, minute=0)
    raise ValueError(f"{expression!r} names no time in the next five years")
