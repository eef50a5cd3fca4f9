"""What lensflow writes itself, and so never an image to predict.

In the train bucket the labelling queue and the splits (``to-label/``, ``labeled/``,
``holdout/``); in the model bucket the model store (``<model name>/``). Each has a bucket
of its own by default, so none of it arrives as an image event; should a bucket be shared
and its notification cover all of it, predict acknowledges such an event and skips it.
"""

from __future__ import annotations

from lensflow_core.settings import Config
from model_store.labelqueue import TRAINING_PREFIXES


def own_prefixes(config: Config, bucket: str) -> tuple[str, ...]:
    """The key prefixes lensflow writes in ``bucket``."""
    prefixes: tuple[str, ...] = ()
    if bucket == config.train_bucket:
        prefixes += TRAINING_PREFIXES
    if bucket == config.model_bucket:
        prefixes += (f"{config.model_name}/",)
    return prefixes


def own_prefix(config: Config, bucket: str, key: str) -> str | None:
    """The prefix of lensflow's own that ``bucket``/``key`` is under, or None."""
    return next((p for p in own_prefixes(config, bucket) if key.startswith(p)), None)
