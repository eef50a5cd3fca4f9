"""The predict function's per-process state: configuration, clients, model watcher, handler.

Made lazily on the first request (the readiness probe's, usually), because servers such as
gunicorn import the function before forking its worker and threads do not survive a fork.
The replica is not ready until its Kafka producer's brokers have answered (a refused TLS
handshake or login keeps it not-ready, with the reason in /healthz and the log).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time

from lensflow_core.cpus import usable_cpus
from lensflow_core.kafka import KafkaSetupError, connect
from lensflow_core.logs import configure_logging
from lensflow_core.s3 import s3_client
from lensflow_core.s3_get import ObjectGetter
from lensflow_core.settings import Config
from lensflow_model_store import ModelStore, PointerFile
from lensflow_model_store.label_queue import LabelQueue
from lensflow_predict import metrics
from lensflow_predict.batcher import Batcher
from lensflow_predict.curl_objects import CurlObjects
from lensflow_predict.fetch import ImageFetcher
from lensflow_predict.handler import PredictHandler
from lensflow_predict.labels import LabelWriter
from lensflow_predict.sink import PredictionProducer
from lensflow_predict.watcher import ModelWatcher

_STARTED = time.time()
KAFKA_RECHECK_S = 5.0

log = logging.getLogger(__name__)


class PredictApp:
    """This process's predict function: configuration, clients, model watcher and handler."""

    def __init__(self, config: Config):
        self.config = config
        configure_logging(config.log_level, config.log_format)
        # First, so that settings that cannot work fail before any thread starts.
        producer = PredictionProducer(config.kafka, config.topic_predictions)
        s3 = s3_client(config, timeout_s=5.0, retries=1)
        # Inference is scheduled by cores: one interpreter (one thread) per CPU this
        # replica may use (affinity, cgroup quota: the container's CPU limit); the
        # server's THREADS only wait on I/O. More interpreters than CPUs only take turns.
        self.cpus = usable_cpus()
        self.batcher = None
        if config.batch_delay_ms > 0 and config.batch_max > 1:
            self.batcher = Batcher(self.cpus, config.batch_max, config.batch_delay_ms / 1000)
        s3_curl = ObjectGetter(config)  # the image GET, the pointer, the labelling queue
        pointer = PointerFile(CurlObjects(s3_curl, config.model_bucket), config.model_name)
        self.watcher = ModelWatcher(
            ModelStore.from_config(config, s3=s3),
            config.pointer_ttl_s,
            max_interpreters=self.cpus,
            batcher=self.batcher,
            pointer=pointer,
        )
        self.watcher.start()
        self.kafka_problem: str | None = "checking the connection to Kafka"
        threading.Thread(target=self._check_kafka, name="kafka-check", daemon=True).start()
        labels = None
        if config.label_queue_max > 0:
            objects = CurlObjects(s3_curl, config.train_bucket)
            queue = LabelQueue(s3, config.train_bucket, config.label_queue_max, objects)
            labels = LabelWriter(queue)
        fetcher = ImageFetcher(config, s3_curl)
        self.handler = PredictHandler(config, fetcher, self.watcher, producer, labels)

    def _check_kafka(self) -> None:
        """Until the brokers answer: record why not (once in the log per new reason)."""
        while True:
            try:
                connect(self.config.kafka, timeout_s=10.0)
            except KafkaSetupError as exc:
                if str(exc) != self.kafka_problem:
                    log.error("not ready: %s", exc)
                self.kafka_problem = str(exc)
                time.sleep(KAFKA_RECHECK_S)
                continue
            self.kafka_problem = None
            return

    def answer(self, headers: dict[str, str], body: bytes):
        """The handler's ``Reply`` to one event, its predictions produced but not yet
        acknowledged (``PredictHandler.start``; on a request thread: it blocks on S3)."""
        # The batcher waits for requests it knows are coming (``Batcher.coming``).
        with self.batcher.coming() if self.batcher else contextlib.nullcontext():
            return self.handler.start(headers, body)

    def health(self) -> tuple[int, dict]:
        """Readiness: 200 once serving the pointer's model (or no pointer exists yet);
        503 before the first pointer read, while the store cannot be read, or while
        Kafka cannot be used as configured."""
        ready, body = self.watcher.ready()
        if self.kafka_problem is not None:
            ready, body = False, {**body, "ready": False, "reason": self.kafka_problem}
        return (200 if ready else 503), body

    def stats(self) -> dict:
        """``GET /stats``: this process's counts (its Prometheus counters' values) and state."""
        model = self.watcher.model
        stats = self.watcher.stats
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - _STARTED, 3),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "model": model.identity if model else None,
            "requests": metrics.counts(metrics.REQUESTS),
            "predictions": metrics.total(metrics.PREDICTIONS),
            "skipped": metrics.total(metrics.SKIPPED),
            "uncertain": metrics.total(metrics.UNCERTAIN),
            "label_queue": metrics.counts(metrics.LABEL_QUEUE),
            "cpus": self.cpus,
            "batches": vars(self.batcher.stats) if self.batcher else None,
            "model_checks": stats.checks,
            "model_swaps": stats.swaps,
            "model_refusals": stats.refusals,
            "model_refusal_retries": stats.refusal_retries,
            "last_refusal": stats.last_refusal,
            "store_errors": stats.store_errors,
            "last_store_error": stats.last_error,
        }


_replica: PredictApp | None = None
_pid: int | None = None
_lock = threading.Lock()


def get_replica() -> PredictApp:
    """This process's replica, made on first use."""
    global _replica, _pid
    current = existing_replica()
    if current is None:
        with _lock:
            current = existing_replica()
            if current is None:
                current = _replica = PredictApp(Config.from_env())
                _pid = os.getpid()
    return current


def existing_replica() -> PredictApp | None:
    """This process's replica if it is made already: never blocks."""
    return _replica if _pid == os.getpid() else None
