"""The predict function's per-process state: configuration, clients, model watcher, handler.

Made lazily on the first request (the readiness probe's, usually), because servers such as
gunicorn import the function before forking its worker and threads do not survive a fork.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time

from functions.predict.batcher import Batcher
from functions.predict.fetch import ImageFetcher
from functions.predict.handler import PredictHandler
from functions.predict.sink import PredictionProducer
from functions.predict.watcher import ModelWatcher
from lensflow_core.cpus import usable_cpus
from lensflow_core.logs import configure_logging
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from model_store import ModelStore

_STARTED = time.time()


class PredictApp:
    """This process's predict function: configuration, clients, model watcher and handler."""

    def __init__(self, config: Config):
        self.config = config
        configure_logging(config.log_level, config.log_format)
        s3 = s3_client(config, timeout_s=5.0, retries=1)
        # Inference is scheduled by cores: one interpreter (one thread) per CPU this
        # replica may use (affinity, cgroup quota: the container's CPU limit); the
        # server's THREADS only wait on I/O. More interpreters than CPUs only take turns.
        self.cpus = usable_cpus()
        self.batcher = None
        if config.batch_delay_ms > 0 and config.batch_max > 1:
            self.batcher = Batcher(self.cpus, config.batch_max, config.batch_delay_ms / 1000)
        self.watcher = ModelWatcher(
            ModelStore.from_config(config, s3=s3),
            config.pointer_ttl_s,
            max_interpreters=self.cpus,
            batcher=self.batcher,
        )
        self.watcher.start()
        producer = PredictionProducer(config.kafka_bootstrap, config.topic_predictions)
        self.handler = PredictHandler(config, ImageFetcher(config), self.watcher, producer)

    def coming(self):
        """Around a request: lets the batcher wait for it (``Batcher.coming``)."""
        return self.batcher.coming() if self.batcher else contextlib.nullcontext()

    def health(self) -> dict:
        model = self.watcher.model
        return {"ok": True, "model": model.identity if model else None}

    def metrics(self) -> dict:
        model = self.watcher.model
        stats = self.watcher.stats
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - _STARTED, 3),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "model": model.identity if model else None,
            "requests": {str(k): v for k, v in self.handler.stats.statuses.items()},
            "predictions": self.handler.stats.predictions,
            "skipped": self.handler.stats.skipped,
            "cpus": self.cpus,
            "batches": vars(self.batcher.stats) if self.batcher else None,
            "model_checks": stats.checks,
            "model_swaps": stats.swaps,
            "model_refusals": stats.refusals,
            "last_refusal": stats.last_refusal,
            "store_errors": stats.store_errors,
            "last_store_error": stats.last_error,
        }


_replica: PredictApp | None = None
_pid: int | None = None
_lock = threading.Lock()


def replica() -> PredictApp:
    """This process's replica, made on first use."""
    global _replica, _pid
    if _replica is None or _pid != os.getpid():
        with _lock:
            if _replica is None or _pid != os.getpid():
                _replica = PredictApp(Config.from_env())
                _pid = os.getpid()
    return _replica
