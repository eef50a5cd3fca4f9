"""Synthetic training data: rendered aerial scenes put where a training round looks.

For the demo's first model, the tests and the training benchmark; a real deployment
labels real photos (``docs/training.md``).
"""

from __future__ import annotations

from lensflow import scenes
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from lensflow_model_store import layout
from lensflow_train import dataset

HOLDOUT_SEED_OFFSET = 1_000  # holdout scenes use seed + this: never the training scenes


def seed_training_data(
    config: Config,
    n_labeled_per_class: int,
    n_holdout_per_class: int,
    seed: int = 0,
    *,
    s3=None,
    size: tuple[int, int] = scenes.DEFAULT_SIZE,
) -> dict[str, int]:
    """Upload synthetic scenes of every class to the train bucket (created if missing).

    Idempotent: the same arguments write the same keys and bytes, and a bigger
    ``n_labeled_per_class`` with the same seed adds images to the ones already there.
    """
    s3 = s3 or s3_client(config)
    ensure_buckets(s3, [config.train_bucket])
    labeled = scenes.labelled_set(n_labeled_per_class, seed, size)
    holdout = scenes.labelled_set(n_holdout_per_class, seed + HOLDOUT_SEED_OFFSET, size)
    tag = f"scene-{seed}"
    return {
        layout.LABELED: dataset.upload(s3, config.train_bucket, layout.LABELED, labeled, tag),
        layout.HOLDOUT: dataset.upload(s3, config.train_bucket, layout.HOLDOUT, holdout, tag),
    }
