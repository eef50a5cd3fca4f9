"""librdkafka client settings, built in one place from explicit arguments.

Producers, consumers and the admin client all start from ``client_settings`` so that
connection options (and, later, TLS/SASL) are set once for every client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def client_settings(bootstrap: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Settings for a confluent-kafka client of ``bootstrap``, with ``extra`` on top."""
    return {
        "bootstrap.servers": bootstrap,
        # Topics exist only as eventing.topics.ensure_topics creates them: a client must
        # never auto-create one with the broker's defaults (see eventing.producer for the
        # guard against brokers that auto-create on produce regardless).
        "allow.auto.create.topics": False,
        **(extra or {}),
    }
