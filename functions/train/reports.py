"""A round's report kept in the model store (``model_store.rounds``), whatever it decided."""

from __future__ import annotations

import logging

from model_store import ModelStore, ModelStoreError
from model_store.rounds import (
    PINNED,
    PROMOTED,
    REFUSED_MARGIN,
    REFUSED_NO_DATA,
    REFUSED_NO_NEW_DATA,
    REFUSED_NOT_USABLE,
    REFUSED_POINTER_MOVED,
    RoundLog,
)

__all__ = [
    "PINNED",
    "PROMOTED",
    "REFUSED_MARGIN",
    "REFUSED_NO_DATA",
    "REFUSED_NO_NEW_DATA",
    "REFUSED_NOT_USABLE",
    "REFUSED_POINTER_MOVED",
    "decided",
    "keep",
]

log = logging.getLogger(__name__)


def decided(promote: bool, champion_evaluated: bool) -> str:
    """The decision of a round that trained, before its flip (which may still refuse)."""
    if promote:
        return PROMOTED
    return REFUSED_MARGIN if champion_evaluated else REFUSED_NOT_USABLE


def keep(store: ModelStore, report) -> str | None:
    """Store ``report`` (a ``RoundReport`` that ended) under ``<name>/rounds/``; its key.

    A round that did not train says why (no holdout, too few classes or images: no data).
    The report is what people see; a store that refuses it costs the round nothing.
    """
    if not report.decision:
        report.decision = REFUSED_NO_DATA if report.outcome == "skipped" else report.outcome
    try:
        return RoundLog(store.objects, store.name).write(report.to_dict())
    except ModelStoreError as exc:
        log.warning("round %s: its report was not stored: %s", report.round_id, exc)
        return None
