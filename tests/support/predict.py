"""A predict function's world: buckets and topics made, two tiny models published, one served."""

from __future__ import annotations

from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from lensflow_eventing.topics import ensure_topics, topic_specs
from lensflow_model_store import ModelStore
from tests.support.env import LABELS


def start_stack(
    env: dict[str, str], tiny_models, flip: str | None = "first"
) -> tuple[Config, ModelStore]:
    config = Config.from_env(env)
    ensure_buckets(s3_client(config), config.buckets)
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    store = ModelStore.from_config(config)
    for name in ("first", "last"):
        store.publish(tiny_models[name], LABELS)
    if flip:
        store.flip({"first": "v1", "last": "v2"}[flip], reason="test")
    return config, store
