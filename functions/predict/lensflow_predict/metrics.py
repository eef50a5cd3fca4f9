"""The predict replica's Prometheus metrics and their text exposition (``GET /metrics``).

Several gunicorn workers are several processes, each counting on its own. With
``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory the workers share (set before the
server starts; emptied at each container start), prometheus-client keeps every worker's
values in files there and ``exposition()`` adds them up (``MultiProcessCollector``).
Without it, this process's registry is exposed. ``GET /stats`` reads this process's own
values (``counts``, ``total``): these counters are the one home of the replica's counts.

Label values are bounded: HTTP status codes, the four stages, the model's class labels
(at most ``MAX_CLASSES``, the rest as ``other``), model versions, the labelling queue's
five outcomes and two skip reasons; never object keys or event ids.
"""

from __future__ import annotations

import os
import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

STAGES = ("fetch", "decode", "invoke", "produce")
MAX_CLASSES = 100
# 1 ms .. 10 s: an image fetch on a LAN is milliseconds, a slow store or broker seconds.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "lensflow_predict_requests",
    "Events answered by the predict function, by HTTP status",
    ["status"],
)
STAGE_SECONDS = Histogram(
    "lensflow_predict_stage_seconds",
    "Time spent per stage of one prediction: fetch, decode, invoke, produce",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
PREDICTIONS = Counter(
    "lensflow_predict_predictions", "Images predicted, by top class", ["model", "class"]
)
SKIPPED = Counter(
    "lensflow_predict_skipped",
    "Events acknowledged and not predicted, by reason: not_created (not ObjectCreated), "
    "own_object (something lensflow wrote itself: to-label/, labeled/, holdout/, models)",
    ["reason"],
)
UNCERTAIN = Counter(
    "lensflow_predict_uncertain",
    "Predictions below LENSFLOW_UNCERTAIN_TOP1 or LENSFLOW_UNCERTAIN_MARGIN (offered for labelling)",
)
MODEL_SWAPS = Counter("lensflow_predict_model_swaps", "Model versions swapped in live")
MODEL_REFUSALS = Counter(
    "lensflow_predict_model_refusals", "Pointer targets refused (missing, corrupt, not loading)"
)
STORE_ERRORS = Counter(
    "lensflow_predict_model_store_errors", "Model pointer checks that could not reach the store"
)
LABEL_QUEUE = Counter(
    "lensflow_predict_label_queue",
    "Uncertain predictions offered to the labelling queue, by outcome: recorded, duplicate "
    "(already queued for this version), full, error (could not be written), busy (dropped: "
    "the replica's writer had a full backlog), paced (dropped: over the replica's writes "
    "a second)",
    ["outcome"],
)
MODEL_INFO = Gauge(
    "lensflow_predict_model_info",
    "1 for the model version a replica serves (0 once swapped out)",
    ["model", "version", "sha256"],
    multiprocess_mode="livemax",
)

_classes: set[str] = set()
_classes_lock = threading.Lock()
_served: tuple[str, str, str] | None = None


def predicted(model: str, label: str) -> None:
    """Count one prediction of top class ``label``."""
    with _classes_lock:
        if label not in _classes:
            if len(_classes) >= MAX_CLASSES:
                label = "other"
            else:
                _classes.add(label)
    PREDICTIONS.labels(model, label).inc()


def serving(model: str, version: str, sha256: str) -> None:
    """This replica now serves ``version``: the info metric moves to it."""
    global _served
    current = (model, version, sha256[:12])
    if _served is not None and _served != current:
        MODEL_INFO.labels(*_served).set(0)
    MODEL_INFO.labels(*current).set(1)
    _served = current


def _totals(counter: Counter):
    """This process's ``_total`` samples of ``counter`` (in multiprocess mode too)."""
    for family in counter.collect():
        yield from (s for s in family.samples if s.name.endswith("_total"))


def counts(counter: Counter) -> dict[str, int]:
    """This process's values of a one-label counter, by label value (those seen so far)."""
    return {next(iter(s.labels.values())): int(s.value) for s in _totals(counter)}


def total(counter: Counter) -> int:
    """This process's value of a counter, summed over its labels."""
    return int(sum(s.value for s in _totals(counter)))


def exposition() -> tuple[bytes, str]:
    """(body, content type) of ``GET /metrics``: every worker's sum in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
