"""A function served as its own process, and a client that speaks to it like Knative.

Used by the tests, the benchmarks and the embedded stack's replicas.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import requests
from cloudevents.conversion import to_binary

from eventing.contracts import kafkasource_event
from lensflow.cli.functions import function_command
from lensflow.config import Config
from lensflow.services import free_port

ROOT = Path(__file__).resolve().parents[1]


class FunctionServer:
    """``lensflow serve NAME`` on a free port with ``env``; stopped with the context."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_path: Path | None = None,
        command: list[str] | None = None,
        port: int | None = None,
    ):
        self.name = name
        self.env = env
        self.port = port or free_port()
        self.command = command or function_command(name, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> FunctionServer:
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command,
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                requests.get(f"{self.url}/healthz", timeout=5).raise_for_status()
                return self
            except requests.RequestException:
                time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"{self.name} did not answer /healthz")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> dict:
        return requests.get(f"{self.url}/metrics", timeout=10).json()


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
