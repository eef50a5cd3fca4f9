"""Round reports: what every training round measured and decided, kept in the model store.

One object per round, never rewritten (If-None-Match ``*``)::

    <name>/rounds/<started, UTC, sortable>-<round id>.json

The full report a round builds (``lensflow_train.round.RoundReport``), including the
rounds that did not train (no new data, no holdout) and those that trained but did not
promote (margin, pinned, pointer moved). ``summary`` is the part people read: the
dashboard's quality panel and ``lensflow models history`` show it.
"""

from __future__ import annotations

import time
from typing import Any

from lensflow_model_store.errors import NotFoundError
from lensflow_model_store.objects import Objects

# The decision of a round, as people ask about it: it promoted, or why not.
PROMOTED = "promoted"
REFUSED_MARGIN = "refused: margin"
REFUSED_NO_NEW_DATA = "refused: no new data"
REFUSED_NOT_USABLE = "refused: not usable"
REFUSED_POINTER_MOVED = "refused: pointer moved"
REFUSED_NO_DATA = "refused: no data"
REFUSED_BUSY = "refused: another round running"  # it holds the lease (lensflow_model_store.lease)
PINNED = "pinned"
FAILED = "failed"


def rounds_prefix(name: str) -> str:
    return f"{name}/rounds/"


def round_key(name: str, started_at: float, round_id: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_at))
    return f"{rounds_prefix(name)}{stamp}-{round_id}.json"


class RoundLog:
    """The round reports of model ``name`` in the model bucket ``objects``."""

    def __init__(self, objects: Objects, name: str):
        self.objects = objects
        self.name = name

    def write(self, report: dict[str, Any]) -> str:
        """Store ``report`` (a round's ``to_dict()``) once; its key."""
        key = round_key(self.name, float(report["started_at"]), str(report["round_id"]))
        self.objects.put_json(key, report, if_absent=True)
        return key

    def keys(self) -> list[str]:
        return sorted(
            k for k in self.objects.list_keys(rounds_prefix(self.name)) if k.endswith(".json")
        )

    def read(self, key: str) -> dict[str, Any]:
        report, _ = self.objects.get_json(key)
        return report

    def latest(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` reports, oldest first."""
        out = []
        for key in self.keys()[-limit:]:
            try:
                out.append(self.read(key))
            except NotFoundError:
                continue
        return out


def decision_of(report: dict[str, Any]) -> str:
    """What a round decided, from its outcome and the reason it gives
    (``lensflow_train.round`` words them; tests/test_train_round.py holds each case)."""
    outcome, reason = report.get("outcome"), str(report.get("reason") or "")
    if outcome == "promoted":
        return PROMOTED
    if outcome == "failed":
        return FAILED
    if outcome == "skipped" and "holds the lease" in reason:
        return REFUSED_BUSY
    if outcome == "skipped":
        return REFUSED_NO_NEW_DATA if "LENSFLOW_TRAIN_MIN_NEW" in reason else REFUSED_NO_DATA
    if reason.startswith("not promoted: pinned"):
        return PINNED
    if reason.startswith("not promoted: pointer moved"):
        return REFUSED_POINTER_MOVED
    champion = report.get("champion") or {}
    return REFUSED_MARGIN if champion.get("evaluation") else REFUSED_NOT_USABLE


def _model(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """One model's figures on the round's holdout."""
    if not entry:
        return None
    ev = entry.get("evaluation") or {}
    return {
        "version": entry.get("version"),
        "accuracy": ev.get("accuracy"),
        "macro_f1": ev.get("macro_f1"),
        "per_class_f1": {c: m.get("f1") for c, m in (ev.get("per_class") or {}).items()},
        "holdout": ev.get("n"),
        "labels": ev.get("labels"),
        "confusion": ev.get("confusion"),
        "problem": entry.get("problem"),
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """A round as the quality panel shows it: both models' figures and the decision."""
    data = report.get("data") or {}
    challenger = _model(report.get("challenger"))
    champion = _model(report.get("champion"))
    holdout = (challenger or champion or {}).get("holdout")
    return {
        "kind": "round",
        "round_id": report.get("round_id"),
        "started_at": report.get("started_at"),
        "outcome": report.get("outcome"),
        "decision": report.get("decision") or decision_of(report),
        "reason": report.get("reason"),
        "labels_used": data.get("labeled_total"),
        "new_labels": data.get("new_since_last_round"),
        "holdout_size": holdout if holdout is not None else data.get("holdout_total"),
        "metric": report.get("metric"),
        "margin": report.get("margin"),
        "champion": champion,
        "challenger": challenger,
        "pointer": report.get("pointer"),
        "seconds": (report.get("timings") or {}).get("total_s"),
    }
