"""A round's report kept in the model store (``lensflow_model_store.rounds``), whatever it decided."""

from __future__ import annotations

import logging

from lensflow_model_store import ModelStore, ModelStoreError
from lensflow_model_store.rounds import RoundLog

log = logging.getLogger(__name__)


def keep(store: ModelStore, report) -> str | None:
    """Store ``report`` (a ``RoundReport`` that ended) under ``<name>/rounds/`` with its
    decision; the key. The report is what people see; a store that refuses it costs the
    round nothing."""
    try:
        return RoundLog(store.objects, store.name).write(report.to_dict())
    except ModelStoreError as exc:
        log.warning("round %s: its report was not stored: %s", report.round_id, exc)
        return None
