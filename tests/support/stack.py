"""Driving an embedded stack: uploads, predictions read back, a published model."""

from __future__ import annotations

import time

from lensflow.process import free_port
from lensflow.scenes import scene_jpeg
from lensflow.stack import EmbeddedStack
from lensflow.upload import upload_file
from lensflow_core.s3 import s3_client
from lensflow_eventing.predictions import read_predictions
from lensflow_model_store import ModelStore
from tests.support.env import LABELS, make_env


def stack_env(**extra: str) -> dict[str, str]:
    """Fresh names, and loopback ports nothing listens on: the stack starts both servers."""
    return make_env(f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", **extra)


def upload(stack: EmbeddedStack, keys: list[str]) -> None:
    """Plain S3 PUTs: the embedded S3's bucket notification makes the events."""
    s3 = s3_client(stack.config)
    bucket = stack.config.image_buckets[0]
    for i, key in enumerate(keys):
        upload_file(s3, bucket, key, scene_jpeg("water", seed=i, size=(320, 240)), "image/jpeg")


def predicted(stack: EmbeddedStack, keys: set[str], timeout_s: float = 60) -> dict[str, int]:
    """How many predictions each key got, once every key has one (or the time is up)."""
    bucket = stack.config.image_buckets[0]
    deadline = time.monotonic() + timeout_s
    while True:
        counts: dict[str, int] = {}
        for p in read_predictions(
            stack.config.kafka_bootstrap,
            stack.config.topic_predictions,
            from_beginning=True,
            timeout_s=5,
        ):
            counts[p.subject] = counts.get(p.subject, 0) + 1
        if {f"{bucket}/{k}" for k in keys} <= set(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def publish_model(stack: EmbeddedStack, model: bytes) -> None:
    store = ModelStore.from_config(stack.config)
    version = store.publish(model, LABELS).version
    store.flip(version, reason="test")
