"""Shared fixtures: real servers on free loopback ports, stopped at the end."""

from __future__ import annotations

import uuid

import pytest

from lensflow.services import KafkaBroker, S3Server
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config


@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def kafka_broker():
    with KafkaBroker() as broker:
        yield broker


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


@pytest.fixture
def env(s3_server) -> dict[str, str]:
    """Environment for one test: its own buckets on the shared S3 server; no broker."""
    values = make_env(s3_server.endpoint)
    config = Config.from_env(values)
    ensure_buckets(s3_client(config), config.buckets)
    return values


@pytest.fixture
def kafka_env(s3_server, kafka_broker) -> dict[str, str]:
    """Environment for one test: its own buckets and topic names on both servers."""
    values = make_env(s3_server.endpoint, kafka_broker.bootstrap)
    config = Config.from_env(values)
    ensure_buckets(s3_client(config), config.buckets)
    return values


@pytest.fixture
def config(env) -> Config:
    return Config.from_env(env)


@pytest.fixture
def kafka_config(kafka_env) -> Config:
    return Config.from_env(kafka_env)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, bytes]:
    """Three real 3-class models: random, always-class-0 and always-class-2."""
    from tests.tflite_models import tiny_classifier

    return {
        "random": tiny_classifier(seed=1),
        "first": tiny_classifier(seed=2, bias=0),
        "last": tiny_classifier(seed=3, bias=2),
    }


LABELS = ["field", "forest", "water"]
