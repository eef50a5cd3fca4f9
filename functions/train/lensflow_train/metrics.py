"""A training round's Prometheus metrics: its duration, both scores, the decision.

No Pushgateway: a round is over before anything could scrape it, so its numbers go where
a scraper finds them afterwards. ``serve train`` (the HTTP function) keeps them in its
process registry and exposes them on ``GET /metrics``; a one-shot round
(``lensflow train --once --metrics-file PATH``, a Job) writes them as a node-exporter
textfile (``write_textfile``). The round's JSON report holds the same numbers.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    write_to_textfile,
)

OUTCOMES = ("promoted", "not_promoted", "skipped", "failed")
ROUND_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class RoundMetrics:
    """The metrics of training rounds, on ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.rounds = Counter(
            "lensflow_train_rounds", "Training rounds, by decision", ["outcome"], registry=registry
        )
        self.duration = Histogram(
            "lensflow_train_round_duration_seconds",
            "Wall time of a training round",
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.score = Gauge(
            "lensflow_train_score",
            "Holdout score of the last round's models (role: champion or challenger)",
            ["role", "metric"],
            registry=registry,
        )
        self.promoted = Gauge(
            "lensflow_train_last_promoted",
            "1 if the last round promoted its challenger, else 0",
            registry=registry,
        )
        self.last = Gauge(
            "lensflow_train_last_round_timestamp_seconds",
            "When the last round ended (Unix time)",
            registry=registry,
        )

    def record(self, report: dict[str, Any] | None, seconds: float, failed: bool = False) -> None:
        """Count one round from its report (``RoundReport.to_dict()``); ``failed`` if it
        raised instead."""
        outcome = "failed" if failed or report is None else report.get("outcome", "skipped")
        self.rounds.labels(outcome if outcome in OUTCOMES else "skipped").inc()
        self.duration.observe(seconds)
        self.last.set(time.time())
        self.promoted.set(1 if outcome == "promoted" else 0)
        for role in ("champion", "challenger"):
            evaluation = ((report or {}).get(role) or {}).get("evaluation") or {}
            for metric in ("accuracy", "macro_f1"):
                if isinstance(evaluation.get(metric), (int, float)):
                    self.score.labels(role, metric).set(evaluation[metric])


@functools.cache
def process_metrics() -> RoundMetrics:
    """The round metrics on the process registry, made once however often the function's
    module is loaded (functions-framework loads its source anew for every app)."""
    return RoundMetrics()


def write_textfile(path: str, report: dict[str, Any] | None, seconds: float) -> None:
    """One round's metrics as a node-exporter textfile (written atomically)."""
    registry = CollectorRegistry()
    RoundMetrics(registry).record(report, seconds)
    write_to_textfile(path, registry)
