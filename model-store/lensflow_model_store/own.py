"""What lensflow writes itself, and so never an image to predict.

In the train bucket the labelling queue and the splits (``to-label/``, ``labeled/``,
``holdout/``); in the model bucket the model store (``<model name>/``); in the archive
bucket the predictions archive (``predictions/``, ``rejects/``). Each has a bucket
of its own by default, so none of it arrives as an image event; should a bucket be shared
and its notification cover all of it, predict acknowledges such an event and skips it.
"""

from __future__ import annotations

from lensflow_core.settings import Config
from lensflow_model_store.layout import TRAINING_PREFIXES

# functions/archive/lensflow_archive/store.py's PREDICTIONS and REJECTS (a floor above: a test keeps them equal)
ARCHIVE_PREFIXES = ("predictions/", "rejects/")


def own_prefixes(config: Config, bucket: str) -> tuple[str, ...]:
    """The key prefixes lensflow writes in ``bucket``."""
    prefixes: tuple[str, ...] = ()
    if bucket == config.train_bucket:
        prefixes += TRAINING_PREFIXES
    if bucket == config.model_bucket:
        prefixes += (f"{config.model_name}/",)
    if bucket == config.archive_bucket:
        prefixes += ARCHIVE_PREFIXES
    return prefixes


def own_prefix(config: Config, bucket: str, key: str) -> str | None:
    """The prefix of lensflow's own that ``bucket``/``key`` is under, or None."""
    return next((p for p in own_prefixes(config, bucket) if key.startswith(p)), None)
