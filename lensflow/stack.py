"""The embedded stack: everything lensflow needs on one machine, as child processes.

``EmbeddedStack(env)`` is a context manager. Starting it:

1. starts S3 (moto) and Kafka (Tansu) on the configured loopback ports, unless the
   configuration points elsewhere or the caller names them ``external`` (then they are
   used, not started: ``LENSFLOW_*`` or ``up --kafka/--s3`` name real MinIO and Kafka).
   Both embedded servers keep their data **in memory only**: a restart loses every
   topic, offset and object. A loopback port that something else already listens on is
   an error, never silently adopted (it may be an orphan of another run). The embedded
   S3 announces every object created in the watched buckets on the images topic, as a
   MinIO bucket notification does (``lensflow.s3_notify``; ``LENSFLOW_S3_NOTIFY_*``); an
   external MinIO does it itself (``mc event add``, docs/deploy.md);
2. creates the image, train and model buckets and the three topics;
3. starts the predict function's ``ReplicaPool`` (scale to zero) and the dispatcher (the
   KafkaSource stand-in) delivering the images topic to it, with the ordering, delivery
   spec and consumer group read from the KafkaSource manifest
   (``knative/base/kafkasource-images.yaml``);
4. the archiver (``lensflow-archive-job --follow``, as a child): every prediction into
   Parquet files in the archive bucket (``lensflow_archive``);
5. optionally a training timer (the PingSource stand-in): every ``train_every_s`` one
   round, run as the JobSink runs it: ``lensflow-train-job`` as a child process on the
   event a PingSource sends (``train_round``).

Logs go to ``var/logs/`` in the checkout (one file per process, ``stack.log`` for the
dispatcher and pools). Stopping ends everything it started, in reverse order, also
after Ctrl-C or an exception in the ``with`` block.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cloudevents.conversion import to_json
from cloudevents.http import CloudEvent

from lensflow.process import ChildProcess, port_open
from lensflow.replicas import PREDICT_CONCURRENCY, ReplicaPool
from lensflow.servers import KafkaBroker, S3Server, Server
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import SETTINGS, Config
from lensflow_eventing.delivery import DeliverySpec
from lensflow_eventing.dispatcher import Dispatcher
from lensflow_eventing.offsets import group_lag
from lensflow_eventing.topics import ensure_topics, topic_specs

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOG_DIR = ROOT / "var" / "logs"

KAFKASOURCE_MANIFEST = ROOT / "knative" / "base" / "kafkasource-images.yaml"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TRAIN_JOB = [sys.executable, "-m", "lensflow_train.job"]  # what `lensflow-train-job` runs
ARCHIVE_JOB = [sys.executable, "-m", "lensflow_archive.job", "--follow"]  # lensflow-archive-job
DRAIN_QUIET_S = 0.5  # a drain ends once nothing was left, nor arrived, for this long


def kafkasource_settings(path: Path = KAFKASOURCE_MANIFEST) -> tuple[str, DeliverySpec, str]:
    """(ordering, delivery spec, consumer group) of the KafkaSource manifest, so the local
    dispatcher delivers exactly as the cluster's KafkaSource does."""
    import yaml  # here: the dashboard's image runs the CLI without it

    spec = yaml.safe_load(path.read_text())["spec"]
    return (
        spec.get("ordering", "ordered"),
        DeliverySpec.from_knative(spec.get("delivery")),
        spec["consumerGroup"],
    )


def dispatcher_for(config: Config, sink, **options: Any) -> Dispatcher:
    """A ``Dispatcher`` of ``config``'s images topic to ``sink``, named as the KafkaSource
    ``config.source_name`` would be (its ce-source; ``config.source_group`` by default)."""
    options.setdefault("group_id", config.source_group)
    return Dispatcher(
        config.kafka,
        config.topic_images,
        sink,
        source=config.kafkasource_ce_source,
        dead_letter_topic=config.topic_dlq,
        **options,
    )


def _loopback_address(host: str | None, port: int | None) -> tuple[str, int] | None:
    if host in LOOPBACK and port:
        return ("127.0.0.1" if host == "localhost" else host), port
    return None


def embedded_kafka_address(config: Config) -> tuple[str, int] | None:
    """Where to start Tansu, or None if the bootstrap names something else."""
    servers = [s.strip() for s in config.kafka_bootstrap.split(",") if s.strip()]
    if len(servers) != 1:
        return None
    host, _, port = servers[0].rpartition(":")
    return _loopback_address(host.strip("[]"), int(port) if port.isdigit() else None)


def embedded_s3_address(config: Config) -> tuple[str, int] | None:
    """Where to start moto, or None for AWS or a non-loopback endpoint."""
    if not config.s3_endpoint:
        return None
    url = urlsplit(config.s3_endpoint)
    return _loopback_address(url.hostname, url.port)


# The dispatcher's 50 ms fetch wait suits the embedded in-memory Tansu, which never answers
# a waiting fetch early. A broker we did not start gets librdkafka's default: Kafka answers
# early when records arrive, and Tansu on its S3 engine answers a fetch whose read takes
# longer than the wait with nothing, so a 50 ms wait starves the dispatcher once reads
# slow down (issue 23's soak, seed 7: ~1000 uploads never dispatched; docs/benchmarks.md).
EXTERNAL_BROKER_FETCH = {"fetch.wait.max.ms": 500}


class ServerPortTaken(RuntimeError):
    """An embedded server's port is in use by a process this stack did not start."""


IN_MEMORY = {
    "kafka": "Tansu with its memory storage engine",
    "s3": "moto, in memory",
}


class EmbeddedStack:
    """S3, Kafka, buckets, topics, the predict pool, the dispatcher, a training timer."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        log_dir: Path | None = DEFAULT_LOG_DIR,
        max_replicas: int = 4,
        target_concurrency: float = PREDICT_CONCURRENCY,
        idle_s: float = 30.0,
        max_in_flight: int = 16,
        ordering: str | None = None,
        delivery: DeliverySpec | None = None,
        group_id: str | None = None,
        train_every_s: float | None = None,
        dispatch: bool = True,
        archive: bool = True,
        external: Collection[str] = (),
    ):
        self.env = dict(os.environ if env is None else env)
        self.config = Config.from_env(self.env)
        self.log_dir = log_dir
        self.max_in_flight = max_in_flight
        # Unless given: as the cluster's KafkaSource delivers.
        manifest = kafkasource_settings() if None in (ordering, delivery) else None
        self.ordering = ordering or manifest[0]
        self.delivery = delivery or manifest[1]
        self.group_id = group_id or self.config.source_group  # the manifest's consumerGroup
        self.train_every_s = train_every_s
        self.dispatch = dispatch
        self.archive = archive
        self.archiver: Respawned | None = None
        self._pool_options = dict(
            max_replicas=max_replicas, target_concurrency=target_concurrency, idle_s=idle_s
        )
        self.servers: list[Server] = []
        self.left_undone: int | None = None  # after stop(count_left=True)
        self.use_external = set(external)  # servers the caller says are running already
        self.external: dict[str, str] = {}  # what we use but did not start
        self.pool: ReplicaPool | None = None
        self.train_job: ChildProcess | None = None  # the round running now, if any
        self._train_lock = threading.Lock()
        self.timer: TrainingTimer | None = None
        self.dispatcher = None
        self._log_handler: logging.Handler | None = None
        self.started_at: float | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> EmbeddedStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._open_log()
        self._start_server(
            "kafka", embedded_kafka_address(self.config), KafkaBroker, self.config.kafka_bootstrap
        )
        self._start_server(
            "s3", embedded_s3_address(self.config), S3Server, self.config.s3_endpoint or "AWS S3"
        )
        ensure_buckets(s3_client(self.config), self.config.buckets)
        ensure_topics(self.config.kafka, topic_specs(*self.config.topics))
        self.pool = ReplicaPool(
            self.env, function="predict", log_dir=self.log_dir, **self._pool_options
        ).start()
        if self.dispatch:
            self.dispatcher = dispatcher_for(
                self.config,
                self.pool,
                delivery=self.delivery,
                ordering=self.ordering,
                max_in_flight=self.max_in_flight,
                group_id=self.group_id,
                topics=topic_specs(*self.config.topics),  # recreated if the broker loses them
                consumer_settings=EXTERNAL_BROKER_FETCH if "kafka" in self.external else None,
            ).start()
        if self.archive:
            self.archiver = Respawned(
                lambda: ChildProcess(
                    "archive",
                    ARCHIVE_JOB,
                    env=self.env,
                    log_path=self.log_dir / "archive.log" if self.log_dir else None,
                )
            ).start()
        if self.train_every_s:
            self.timer = TrainingTimer(self.train_round, self.train_every_s).start()
        self.started_at = time.monotonic()
        log.info("embedded stack up: %s", self.describe())

    def _start_server(
        self, name: str, address: tuple[str, int] | None, kind: type[Server], configured: str
    ) -> None:
        if address is None or name in self.use_external:
            self.external[name] = configured
            log.info("%s: using %s (not started here)", name, configured)
            return
        host, port = address
        if port_open(host, port):
            flag = "--kafka" if name == "kafka" else "--s3"
            raise ServerPortTaken(
                f"{host}:{port}, where the embedded {name} server would listen, is taken by "
                f"a process lensflow did not start; stop it, or pass {flag} {configured} "
                "to use it as an external server"
            )
        options = {"notify": self.env} if kind is S3Server else {}
        server = kind(host=host, port=port, log_dir=self.log_dir, **options)
        self.servers.append(server)  # before start(): stop() must find it whatever happens
        server.start()

    def backlog(self) -> int:
        """Uploads not finished: bucket events the embedded S3 keeps for the broker, and
        acknowledged records of the images topic the dispatcher has not finished
        (delivered or dead-lettered), asked of the broker now."""
        waiting = sum(s.events_waiting() for s in self.servers if isinstance(s, S3Server))
        lag = group_lag(self.config.kafka_bootstrap, self.config.topic_images, self.group_id)
        return waiting + lag

    def drain(self, timeout_s: float, progress: Callable[[int], None] | None = None) -> int:
        """Before stopping: keep dispatching until every record the broker acknowledged
        is done and nothing new arrived for a moment, or ``timeout_s`` passed. Returns
        the records left (0: drained); ``progress(left)`` is called as it goes. Raises
        ``KafkaException`` when the broker cannot say."""
        if self.dispatcher is None:
            return 0
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        while True:
            left = self.backlog()
            now = time.monotonic()
            if left:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= DRAIN_QUIET_S:
                return 0
            if now >= deadline:
                return left
            if progress is not None:
                progress(left)
            time.sleep(0.25)

    def stop(self, count_left: bool = False) -> None:
        """Stop everything this stack started, last first. Safe to call twice.

        ``count_left``: once the dispatcher has stopped, ask the broker what is left
        undone (``self.left_undone``, None if it could not say) and stop an embedded
        broker right after, so that it acknowledges as little as possible unseen.
        """
        steps: list[tuple[str, Callable[[], None]]] = []
        if self.timer is not None:
            steps.append(("training timer", self.timer.stop))
        if self.dispatcher is not None:
            steps.append(("dispatcher", self.dispatcher.stop))
        if self.archiver is not None:  # SIGTERM: it writes what it holds, commits, exits
            steps.append(("archiver", lambda: self.archiver.stop(30.0)))
        if self.dispatcher is not None and count_left:
            steps.append(("backlog", self._count_left))
        servers = list(reversed(self.servers))
        if count_left:  # the broker first: it takes no record after the count
            steps += [(server.name, server.stop) for server in servers if server.name == "kafka"]
            servers = [server for server in servers if server.name != "kafka"]
        if self.train_job is not None:
            steps.append(("training round", self.train_job.stop))
        if self.pool is not None:
            steps.append(("predict pool", self.pool.stop))
        for server in servers:
            steps.append((server.name, server.stop))
        for name, step in steps:
            started = time.monotonic()
            try:
                step()
            except BaseException as exc:  # stop the rest regardless
                log.warning("stopping %s: %s", name, exc)
            log.info("stopped %s in %.1f s", name, time.monotonic() - started)  # a slow stop
        self.timer = self.dispatcher = self.pool = self.train_job = self.archiver = None
        self.servers = []
        self._close_log()

    def _count_left(self) -> None:
        self.left_undone = None
        self.left_undone = self.backlog()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_log(self) -> None:
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_dir / "stack.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(self.config.log_level.upper())
        for name in ("lensflow", "lensflow_eventing", "lensflow_model_store"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            if logger.getEffectiveLevel() > handler.level:
                logger.setLevel(handler.level)
        self._log_handler = handler

    def _close_log(self) -> None:
        if self._log_handler is not None:
            for name in ("lensflow", "lensflow_eventing", "lensflow_model_store"):
                logging.getLogger(name).removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # --- training -------------------------------------------------------------------------

    def train_round(
        self, reason: str = "schedule", *, force: bool = False, timeout_s: float = 3600.0
    ) -> dict[str, Any]:
        """One round as a JobSink Job runs it: ``lensflow-train-job`` in a child process on
        the event a PingSource sends; the round's report. ``force`` trains even without
        enough new data. RuntimeError if the round fails (the report's reason says why)."""
        data: dict[str, Any] = {"reason": reason, **({"force": True} if force else {})}
        with self._train_lock:  # one round at a time from here; the lease guards the rest
            folder = Path(tempfile.mkdtemp(prefix="lensflow-train-"))
            try:
                (folder / "event").write_bytes(ping_event(self.config, data))
                self.train_job = job = ChildProcess(
                    "train",
                    [*TRAIN_JOB, "--event", str(folder / "event")],
                    env=self.env,
                    log_path=self.log_dir / "train.log" if self.log_dir else None,
                    stdout_path=folder / "report.json",
                )
                job.spawn()
                try:
                    code = job.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    raise RuntimeError(
                        f"training round still running after {timeout_s:.0f} s"
                    ) from None
                finally:
                    job.stop()
                    self.train_job = None
                text = (folder / "report.json").read_text().strip()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        try:
            report = json.loads(text.splitlines()[-1]) if text else {}
        except ValueError:
            report = {"reason": text[-500:]}
        if code != 0:
            raise RuntimeError(f"training round failed (exit {code}): {report.get('reason', '?')}")
        return report

    # --- reporting ------------------------------------------------------------------------

    def exports(self) -> dict[str, str]:
        """The non-secret settings another shell needs to talk to this stack."""
        secret = {s.name for s in SETTINGS if s.secret}
        return {
            s.name: self.env.get(s.name, s.default)
            for s in SETTINGS
            if s.name not in secret and s.name in EXPORTED
        }

    def describe(self) -> dict[str, Any]:
        return {
            "kafka": self.config.kafka_bootstrap,
            "s3": self.config.s3_endpoint,
            "started": [s.name for s in self.servers],
            # what loses its data when the stack stops (said at start; see README)
            "in_memory": {s.name: IN_MEMORY[s.name] for s in self.servers if s.name in IN_MEMORY},
            "external": dict(self.external),
            "image_buckets": list(self.config.image_buckets),
            "train_bucket": self.config.train_bucket,
            "notifications": self._notifications(),
            "model": f"{self.config.model_bucket}/{self.config.model_name}",
            "topics": [
                self.config.topic_images,
                self.config.topic_predictions,
                self.config.topic_dlq,
            ],
            "logs": str(self.log_dir) if self.log_dir else None,
            "pids": self.pids(),
        }

    def _notifications(self) -> dict[str, Any] | str:
        """What announces new objects: the embedded S3 (and its rule), or MinIO itself."""
        if "s3" in self.external or not any(isinstance(s, S3Server) for s in self.servers):
            return "the S3 server's own bucket notifications (MinIO: mc event add)"
        c = self.config
        return {
            "buckets": list(c.notify_buckets),
            "prefix": c.notify_prefix,
            "suffix": c.notify_suffix,
        }

    def pids(self) -> dict[str, list[int]]:
        """Process ids of every child process running now (tests check none survive)."""
        pids = {s.name: [s.proc.pid] for s in self.servers if s.proc is not None}
        if self.pool is not None:
            pids[self.pool.function] = [r.proc.pid for r in self.pool.replicas()]
        if self.train_job is not None and self.train_job.pid is not None:
            pids["train"] = [self.train_job.pid]
        if self.archiver is not None and self.archiver.alive:
            pids["archive"] = [self.archiver.pid]
        return pids

    def archive_stats(self) -> dict[str, Any] | None:
        """Whether the archiver runs, and how many predictions it has not committed."""
        if self.archiver is None:
            return None
        try:
            lag = group_lag(
                self.config.kafka, self.config.topic_predictions, self.config.archive_group
            )
        except Exception:  # a stat, not a failure
            lag = None
        code = None if self.archiver.alive else self.archiver.proc.returncode
        return {
            "running": code is None,
            "exit_code": code,
            "restarts": self.archiver.restarts,
            "lag": lag,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "dispatcher": self.dispatcher.stats() if self.dispatcher else None,
            "predict": self.pool.stats() if self.pool else None,
            "train": self.timer.stats() if self.timer else None,
            "archive": self.archive_stats(),
            "uptime_s": round(time.monotonic() - self.started_at, 1) if self.started_at else 0,
        }


EXPORTED = {
    "LENSFLOW_KAFKA_BOOTSTRAP",
    "LENSFLOW_S3_ENDPOINT",
    "LENSFLOW_S3_REGION",
    "LENSFLOW_IMAGE_BUCKETS",
    "LENSFLOW_MODEL_BUCKET",
    "LENSFLOW_MODEL_NAME",
    "LENSFLOW_TRAIN_BUCKET",
    "LENSFLOW_TOPIC_IMAGES",
    "LENSFLOW_TOPIC_PREDICTIONS",
    "LENSFLOW_TOPIC_DLQ",
}


def ping_event(config: Config, data: dict[str, Any]) -> bytes:
    """The event a PingSource sends (``contentType: application/json``), as the JobSink
    mounts it for the Job: structured CloudEvent JSON."""
    event = CloudEvent(
        {
            "type": "dev.knative.sources.ping",
            "source": f"/apis/v1/namespaces/{config.namespace}/pingsources/lensflow-train",
            "datacontenttype": "application/json",
        },
        data,
    )
    return to_json(event)


class TrainingTimer:
    """Calls ``round()`` every ``every_s`` seconds in a thread (the PingSource stand-in).
    A round that fails is logged; the next tick tries again."""

    def __init__(self, round: Callable[[], Any], every_s: float):
        self.round = round
        self.every_s = every_s
        self.rounds = 0
        self.last: Any = None
        self.next_at = time.time() + every_s  # when the next round starts (the dashboard)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-timer", daemon=True)

    def start(self) -> TrainingTimer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(1.0)  # a round in progress ends with its child process

    def stats(self) -> dict[str, Any]:
        return {"every_s": self.every_s, "rounds": self.rounds, "last": self.last}

    def _run(self) -> None:
        while not self._stopping.wait(max(0.0, self.next_at - time.time())):
            try:
                self.last = self.round()
                self.rounds += 1
            except Exception as exc:  # keep ticking
                log.warning("training round failed: %s", exc)
                self.last = {"error": str(exc)}
            self.next_at = time.time() + self.every_s


class Respawned:
    """A child started again ``every_s`` after it exits (the archive's PingSource tick:
    an archiver that stopped, say on an unwritable bucket, tries again, as the next Job
    would). ``alive``, ``pid``, ``proc``: the current child's."""

    def __init__(self, make: Callable[[], ChildProcess], every_s: float = 10.0):
        self.make = make
        self.every_s = every_s
        self.restarts = 0
        self.child = make()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="respawn", daemon=True)

    def start(self) -> Respawned:
        self.child.spawn()
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.child.alive

    @property
    def pid(self) -> int | None:
        return self.child.pid

    @property
    def proc(self):
        return self.child.proc

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._thread.join(2.0)
        self.child.stop(timeout_s)

    def _run(self) -> None:
        while not self._stopping.wait(self.every_s):
            if not self.child.alive and not self._stopping.is_set():
                log.warning(
                    "%s exited (%s): starting it again", self.child.name, self.child.proc.returncode
                )
                self.child.stop()  # closes its log file
                self.child = self.make().spawn()
                self.restarts += 1
