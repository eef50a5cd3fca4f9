"""The dashboard's history: fixed questions of the predictions archive, never SQL from a
browser. The archive outlives the topic and the dashboard, so a restart loses nothing."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from lensflow_core.settings import Config

# Named reports of lensflow_archive.query: the only SQL the dashboard runs.
QUESTIONS = {"per_class_per_day": "per-class-per-day", "per_version": "low-confidence-by-version"}


class ArchiveHistory:
    """The answers, asked at most every ``ttl_s`` seconds (a query lists and reads S3)."""

    def __init__(self, config: Config, ttl_s: float = 15.0):
        self.config = config
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._answer: dict[str, Any] | None = None
        self._at = 0.0

    def get(self) -> dict[str, Any]:
        with self._lock:  # one query at a time; the others wait and share its answer
            if self._answer is None or time.monotonic() - self._at >= self.ttl_s:
                self._answer = self._ask()
                self._at = time.monotonic()
            return self._answer

    def _ask(self) -> dict[str, Any]:
        from lensflow_archive.query import QueryError, archive_dataset, connect, report

        answer: dict[str, Any] = {
            "archive": f"s3://{self.config.archive_bucket}/predictions/",
            "error": None,
        }
        try:
            con = connect(archive_dataset(self.config))
            for name, question in QUESTIONS.items():
                rows = report(self.config, question, con).records()
                answer[name] = json.loads(json.dumps(rows, default=str))  # dates as text
        except QueryError as exc:
            answer["error"] = str(exc)
        return answer
