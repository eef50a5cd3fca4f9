"""One image event in, one prediction out: the predict function's logic, free of the web framework.

Status codes follow the contract: 200 with the prediction CloudEvent; 200 for events
that are acknowledged and skipped (not ObjectCreated, or an object lensflow wrote itself:
``lensflow_model_store.own``); 400/413/415/422 with a JSON reason
for input no retry can fix; 503 for transient trouble (store or broker unreachable, no
model yet), which Knative's dispatcher retries.

Every count lives in ``lensflow_predict.metrics`` (Prometheus); ``GET /stats`` reads them.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http

from lensflow_core.imaging import DecodeBudget, ImageError, decode_image
from lensflow_core.logs import bind, log_fields
from lensflow_core.settings import Config
from lensflow_eventing.contracts import BadEvent, ObjectEvent, parse_notification, prediction_event
from lensflow_eventing.tracing import TraceContext, incoming_trace, span
from lensflow_model_store.label_queue import is_uncertain
from lensflow_model_store.own import own_prefix
from lensflow_predict import metrics
from lensflow_predict.errors import Rejected
from lensflow_predict.fetch import ImageFetcher
from lensflow_predict.labels import LabelWriter
from lensflow_predict.sink import PredictionProducer, ProduceError
from lensflow_predict.watcher import ModelWatcher

log = logging.getLogger("lensflow.predict")
NO_MODEL_RETRY_AFTER_S = 2


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    # the broker's acks of the predictions produced: the reply stands once all arrived
    # (``PredictHandler.settle``), else the event is answered 503 and delivered again
    unacked: tuple[Future[None], ...] = ()

    @classmethod
    def json(cls, status: int, payload: dict) -> Reply:
        return cls(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())


class PredictHandler:
    def __init__(
        self,
        config: Config,
        fetcher: ImageFetcher,
        watcher: ModelWatcher,
        producer: PredictionProducer,
        labels: LabelWriter | None = None,
    ):
        self.config = config
        self.fetcher = fetcher
        self.watcher = watcher
        self.producer = producer
        self.labels = labels
        # concurrent decodes share this much memory (docs/autoscaling.md, "Memory")
        self.decode_budget = DecodeBudget(config.decode_budget_mb * 1024 * 1024)

    def handle(self, headers: dict[str, str], body: bytes) -> Reply:
        """The reply to one event, once the broker has its predictions (blocks)."""
        reply = self.start(headers, body)
        if not reply.unacked:
            return reply
        try:
            self.producer.wait(list(reply.unacked))
        except ProduceError as exc:
            return self.settle(reply, str(exc))
        return self.settle(reply, None)

    def start(self, headers: dict[str, str], body: bytes) -> Reply:
        """The reply to one event, with its predictions produced but not yet acknowledged
        (``reply.unacked``): the caller waits for those, then calls ``settle``."""
        with log_fields():  # trace id, event id, key and model version, once known
            return self._reply_or_refuse(headers, body)

    def settle(self, reply: Reply, produce_error: str | None) -> Reply:
        """``reply`` once its predictions are acknowledged (``produce_error`` None), or
        503 with the broker's reason."""
        if produce_error is not None:
            return self.reject(Rejected(503, produce_error))
        metrics.REQUESTS.labels(str(reply.status)).inc()
        return reply

    def _reply_or_refuse(self, headers: dict[str, str], body: bytes) -> Reply:
        try:
            reply = self._receive_cloudevent(headers, body)
        except Rejected as exc:
            return self.reject(exc)
        except Exception as exc:  # a bug: 500, which Knative retries and then dead-letters
            log.exception("unexpected failure")
            reply = Reply.json(500, {"error": f"internal error: {type(exc).__name__}"})
        if not reply.unacked:  # else counted once settled
            metrics.REQUESTS.labels(str(reply.status)).inc()
        return reply

    def reject(self, exc: Rejected) -> Reply:
        """The JSON answer to a refused request (also for requests refused before the
        handler saw them, such as an oversized body)."""
        log.warning("answering %d: %s", exc.status, exc.reason)
        payload = {"error": exc.reason, "status": exc.status}
        if exc.waiting:
            payload["waiting"] = exc.waiting
        reply = Reply.json(exc.status, payload)
        if exc.waiting:
            reply.headers["Retry-After"] = str(NO_MODEL_RETRY_AFTER_S)
        metrics.REQUESTS.labels(str(reply.status)).inc()
        return reply

    def _receive_cloudevent(self, headers: dict[str, str], body: bytes) -> Reply:
        event = self._parse_cloudevent(headers, body)
        parent = incoming_trace(event.get_attributes(), headers)
        with span("lensflow.predict", parent, {"cloudevents.event_id": event["id"]}) as trace:
            bind(trace_id=trace.trace_id, event_id=event["id"])
            return self._predict_notification(event, trace)

    def _predict_notification(self, event: CloudEvent, trace: TraceContext) -> Reply:
        try:
            records = parse_notification(event.data)
        except BadEvent as exc:
            raise Rejected(400, str(exc)) from None
        created = [r for r in records if r.created]
        if not created:
            metrics.SKIPPED.labels("not_created").inc()
            return Reply.json(200, {"skipped": f"{records[0].event_name} is not predicted"})
        own = {r.path: own_prefix(self.config, r.bucket, r.key) for r in created}
        created = [r for r in created if own[r.path] is None]
        if not created:  # a shared bucket announcing what lensflow wrote: no image, no retry
            path, prefix = next(iter(own.items()))
            metrics.SKIPPED.labels("own_object").inc()
            log.info("skipped %s: lensflow's own %s", path, prefix)
            reason = f"{path} is lensflow's own object ({prefix}), not an image to predict"
            return Reply.json(200, {"skipped": reason})
        outputs = [self._predict_object(record, event["id"], trace) for record in created]
        predicted, data, _ = outputs[-1]
        out_headers, out_body = to_binary(predicted, data_marshaller=lambda _: data)
        return Reply(200, dict(out_headers), out_body, tuple(acked for *_, acked in outputs))

    def _parse_cloudevent(self, headers: dict[str, str], body: bytes) -> CloudEvent:
        try:
            return from_http(headers, body, data_unmarshaller=lambda data: data)
        except CloudEventError as exc:
            raise Rejected(400, f"not a CloudEvent: {exc}") from None

    def _predict_object(
        self, record: ObjectEvent, source_event_id: str, trace: TraceContext
    ) -> tuple[CloudEvent, bytes, Future[None]]:
        """The prediction event for ``record``, its serialised data, and the broker's
        acknowledgement of it on the predictions topic (a future)."""
        bind(object_key=record.path)
        self._check_record(record)
        model = self.watcher.model  # this request stays on this version
        if model is None:
            raise Rejected(503, "no model is being served yet", waiting="no_model")
        bind(model_version=model.version)
        t0 = time.perf_counter()
        data, etag = self.fetcher.fetch(record.bucket, record.key)
        t1 = time.perf_counter()
        image = self._decode(record, data, max(model.spec.height, model.spec.width))
        t2 = time.perf_counter()
        predictions = model.predict(image)
        t3 = time.perf_counter()
        uncertain = self._offer_if_uncertain(record, etag, model.identity, predictions)
        event = prediction_event(
            image=ObjectEvent(
                record.event_name, record.bucket, record.key, etag, event_time=record.event_time
            ),
            model=model.identity,
            predictions=predictions,
            source_event_id=source_event_id,
            timings_ms={"fetch": _ms(t1 - t0), "decode": _ms(t2 - t1), "invoke": _ms(t3 - t2)},
            uncertain=uncertain,
        )
        event["traceparent"] = trace.traceparent
        data = json.dumps(event.data).encode()  # once, for the topic and the reply
        acked = self.producer.produce(event, data)
        _observe(model.name, predictions, (t0, t1, t2, t3), acked)
        return event, data, acked

    def _check_record(self, record: ObjectEvent) -> None:
        """Refuse, before any request, an object no retry could predict."""
        limit = self.config.max_image_bytes
        if record.bucket not in self.config.image_buckets:
            raise Rejected(422, f"bucket {record.bucket!r} is not in LENSFLOW_IMAGE_BUCKETS")
        if {".", ".."} & set(record.key.split("/")):
            # S3 and MinIO refuse such names: permanent, never "store unreachable"
            raise Rejected(422, f"key {record.key!r} has a '.' or '..' path segment")
        if record.size is not None and record.size > limit:
            raise Rejected(413, f"object is {record.size} bytes, over the limit of {limit}")

    def _decode(self, record: ObjectEvent, data: bytes, side: int):
        try:
            return decode_image(
                data,
                (side, side),
                max_pixels=self.config.max_image_pixels,
                budget=self.decode_budget,
            )
        except ImageError as exc:
            raise Rejected(exc.status, f"{record.path}: {exc.reason}") from None

    def _offer_if_uncertain(self, record: ObjectEvent, etag: str, model: dict, predictions) -> bool:
        uncertain = is_uncertain(
            predictions, self.config.uncertain_top1, self.config.uncertain_margin
        )
        if uncertain:
            metrics.UNCERTAIN.inc()
            if self.labels is not None:
                self.labels.offer(record, etag, model, predictions)
        return uncertain


def _observe(model_name: str, predictions, stamps: tuple[float, ...], acked: Future) -> None:
    """Each stage's seconds and the log line now; the produce stage and the prediction's
    count once the broker acknowledged it (on the producer's poller thread)."""
    *timed, produce = metrics.STAGES  # fetch, decode, invoke: between the stamps
    for stage, began, ended in zip(timed, stamps[:-1], stamps[1:], strict=True):
        metrics.STAGE_SECONDS.labels(stage).observe(ended - began)
    top = predictions[0]["label"] if predictions else "none"
    log.info("predicted %s (%.3f)", top, predictions[0]["score"] if predictions else 0.0)
    produced = stamps[-1]

    def count(future: Future) -> None:
        if future.exception() is None:
            metrics.STAGE_SECONDS.labels(produce).observe(time.perf_counter() - produced)
            metrics.predicted(model_name, top)

    acked.add_done_callback(count)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
