"""Environments naming fresh buckets and topics, and the labels of the tiny models."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest


def system_tool(names: tuple[str, ...], install: str) -> str:
    """The first of ``names`` on PATH. In CI (CI=true) none fails the test (`.ci/run` installs
    them); elsewhere it skips, saying how to install it."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{names[0]} is not installed: `{install}` (.ci/run does it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def make_env(s3_endpoint: str, bootstrap: str = "127.0.0.1:1", **extra: str) -> dict[str, str]:
    """An environment naming fresh buckets and topics, so tests never see each other's data."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "LENSFLOW_S3_ENDPOINT": s3_endpoint,
        "LENSFLOW_KAFKA_BOOTSTRAP": bootstrap,
        "LENSFLOW_IMAGE_BUCKETS": f"images-{tag}",
        "LENSFLOW_MODEL_BUCKET": f"models-{tag}",
        "LENSFLOW_TRAIN_BUCKET": f"train-{tag}",
        "LENSFLOW_MODEL_NAME": "aerial",
        "LENSFLOW_TOPIC_IMAGES": f"images-{tag}",
        "LENSFLOW_TOPIC_PREDICTIONS": f"predictions-{tag}",
        "LENSFLOW_TOPIC_DLQ": f"images-dlq-{tag}",
        "LENSFLOW_POINTER_TTL_S": "0.3",
    }
    env.update(extra)
    return env


LABELS = ["field", "forest", "water"]
