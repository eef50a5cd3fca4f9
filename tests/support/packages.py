"""lensflow's first-party import names, floor by floor, lowest first (docs/architecture.md):
the layers test checks who imports whom among them; the container replay removes them from
a virtualenv before copying the code in again."""

from __future__ import annotations

FIRST_PARTY = (
    "lensflow_core",
    "lensflow_model_store",
    "lensflow_eventing",
    "lensflow_archive",
    "lensflow_predict",
    "lensflow_train",
    "lensflow",
)
