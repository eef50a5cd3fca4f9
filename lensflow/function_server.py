"""A function served as its own process, and a client that speaks to it like Knative.

Used by the tests and the benchmarks; the embedded stack's replicas are the replica
pool's (``lensflow.replicas``). Both run ``lensflow.process.function_command``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import requests
from cloudevents.conversion import to_binary

from lensflow.process import ChildProcess, free_port, function_command, http_ok
from lensflow_core.settings import Config
from lensflow_eventing.contracts import kafkasource_event


class FunctionServer(ChildProcess):
    """``lensflow serve NAME`` on a free port with ``env``; stopped with the context."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_path: Path | None = None,
        command: list[str] | None = None,
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            name,
            command or function_command(name, self.port),
            env={**os.environ, **env},
            log_path=log_path,
        )

    def __enter__(self) -> FunctionServer:
        self.start(http_ok(f"{self.url}/healthz"), timeout_s=60)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        """The replica's counters (``GET /stats``, JSON)."""
        return requests.get(f"{self.url}/stats", timeout=10).json()

    def prometheus(self) -> str:
        """``GET /metrics``: Prometheus text exposition."""
        return requests.get(f"{self.url}/metrics", timeout=10).text


def knative_request(
    config: Config, value: bytes, key: bytes | None = None, offset: int = 0
) -> tuple[dict[str, str], bytes]:
    """The (headers, body) a KafkaSource POSTs for a plain record (binary mode)."""
    event = kafkasource_event(
        source=config.kafkasource_ce_source,
        topic=config.topic_images,
        partition=0,
        offset=offset,
        timestamp_ms=int(time.time() * 1000),
        key=key,
        value=value,
        headers={},
    )
    return to_binary(event, data_marshaller=lambda data: data)


def knative_post(
    url: str,
    config: Config,
    value: bytes,
    key: bytes | None = None,
    offset: int = 0,
    session: requests.Session | None = None,
) -> requests.Response:
    """POST ``value`` the way a KafkaSource delivers a plain record."""
    headers, body = knative_request(config, value, key, offset)
    return (session or requests).post(url, headers=headers, data=body, timeout=30)
