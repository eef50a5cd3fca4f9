"""Scale to zero, locally: a pool of function replicas that behaves like Knative Serving.

``ReplicaPool`` is a sink for the dispatcher (``lensflow_eventing.delivery.Sink``). Each replica is
a ``lensflow.process.ChildProcess`` running the function exactly as its container does
(``lensflow.process.function_command``); the pool plays the parts of Knative's
activator and autoscaler (KPA, concurrency metric):

- **Activator.** A request that finds no ready replica waits while one starts (a cold
  start: the process must answer ``/healthz``), then goes through. Requests go to the
  least-busy ready replica.
- **Autoscaler.** Demand is requests in flight plus requests waiting. The pool wants
  ``ceil(demand / target_concurrency)`` replicas (at most ``max_replicas``) and starts the
  missing ones at once. Scaling down uses the peak demand over the last ``idle_s`` seconds
  (Knative's stable window), so a burst keeps its replicas for a while; with no request
  for ``idle_s`` the pool is back at ``min_replicas`` (zero: scale to zero).
- **Health.** A replica whose process died is dropped as soon as the pool notices (a
  failed request or the next tick, every ``tick_s``) and replaced if demand wants it.
  A request to a dead replica fails as a network error, which the dispatcher retries.

Under Knative the same function runs unchanged; only this file is the stand-in.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from lensflow.figures import percentile, rounded
from lensflow.process import ChildProcess, NotReady, free_port, function_command, http_ok

log = logging.getLogger(__name__)

# Requests in flight per predict replica, as knative/base/predict-service.yaml says:
# containerConcurrency, the autoscaling target and THREADS (tests/test_knative.py checks).
PREDICT_CONCURRENCY = 4


class ReplicaError(ConnectionError):
    """No replica could take the request (start failed or timed out, or the pool is
    stopped). A ``ConnectionError``: to the dispatcher it is a network error, retried."""


@dataclass
class PoolReplica:
    """One replica of the pool: a function server process and its load."""

    number: int
    port: int
    process: ChildProcess
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    in_flight: int = 0
    served: int = 0
    last_active: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    @property
    def proc(self) -> subprocess.Popen:
        return self.process.proc

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def startup_s(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.started_at


class ReplicaPool:
    """Replicas of one function, started on demand and stopped when idle.

    ``env`` is the environment the replicas run with (on top of this process's).
    ``start()`` starts the background tick (health, scale down); ``stop()`` ends every
    replica. Also a context manager.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        function: str = "predict",
        min_replicas: int = 0,
        max_replicas: int = 4,
        target_concurrency: float = PREDICT_CONCURRENCY,
        idle_s: float = 30.0,
        startup_timeout_s: float = 60.0,
        log_dir: Path | None = None,
        tick_s: float = 0.2,
        threads: int = PREDICT_CONCURRENCY,
    ):
        if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if target_concurrency <= 0:
            raise ValueError("target_concurrency must be positive")
        self.function = function
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.target_concurrency = target_concurrency
        self.idle_s = idle_s
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = log_dir
        self.tick_s = tick_s
        # THREADS sizes the function's server (and the predict function's interpreter
        # pool) as in the Knative manifest; the caller's env may override it.
        self._env = {**os.environ, "THREADS": str(threads), **(env or {})}

        self._cond = threading.Condition()
        self._replicas: list[PoolReplica] = []
        self._numbers = 0
        self._in_flight = 0
        self._waiting = 0
        self._peak = 0  # highest demand since the last tick
        self._samples: deque[tuple[float, int]] = deque()  # (time, peak demand) per tick
        self._last_start_error: tuple[float, str] | None = None
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self._stoppers: list[threading.Thread] = []
        self._local = threading.local()
        self._counts = {
            "requests": 0,
            "cold_starts": 0,
            "scale_ups": 0,
            "scale_downs": 0,
            "deaths": 0,
            "start_failures": 0,
        }
        self._startups: deque[float] = deque(maxlen=50)
        self._last_cold_start_s: float | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> ReplicaPool:
        if self._ticker is None:
            self._ticker = threading.Thread(
                target=self._tick_loop, name=f"{self.function}-pool", daemon=True
            )
            self._ticker.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every replica (SIGTERM, then SIGKILL after ``timeout_s``); waits for them."""
        self._stopping.set()
        with self._cond:
            replicas, self._replicas = self._replicas, []
            self._cond.notify_all()
        for replica in replicas:  # in parallel: a graceful exit takes a few seconds
            thread = threading.Thread(target=self._terminate, args=(replica, timeout_s))
            thread.start()
            self._stoppers.append(thread)
        for thread in self._stoppers:
            thread.join(timeout_s + 1)
        if self._ticker is not None:
            self._ticker.join(timeout_s)

    def __enter__(self) -> ReplicaPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the Sink protocol ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """Names the pool in dead letters (``knativeerrordest``)."""
        return f"pool://{self.function}"

    def post(
        self, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """POST to the least-busy ready replica, starting one first if none is running.
        (status, body, response headers), as ``lensflow_eventing.delivery.HttpSink``."""
        replica = self._acquire(time.monotonic() + min(timeout_s, self.startup_timeout_s))
        try:
            reply = self._session().post(
                replica.url,
                headers=dict(headers),
                data=body,
                timeout=timeout_s,
                allow_redirects=False,
            )
            return reply.status_code, reply.content, reply.headers
        except requests.RequestException:
            self._check(replica)  # notice a dead replica now, not at the next tick
            raise
        finally:
            self._release(replica)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=self.max_replicas, pool_maxsize=4)
            session.mount("http://", adapter)
            self._local.session = session
        return session

    # --- routing (the activator) ----------------------------------------------------------

    def _acquire(self, deadline: float) -> PoolReplica:
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    if self._stopping.is_set():
                        raise ReplicaError(f"{self.function} pool is stopped")
                    self._scale_up_locked()
                    ready = [r for r in self._replicas if r.ready]
                    if ready:
                        replica = min(ready, key=lambda r: (r.in_flight, r.number))
                        replica.in_flight += 1
                        replica.last_active = time.monotonic()
                        self._in_flight += 1
                        self._counts["requests"] += 1
                        return replica
                    if not self._replicas and self._last_start_error is not None:
                        failed_at, reason = self._last_start_error
                        if time.monotonic() - failed_at < 1.0:
                            raise ReplicaError(f"{self.function} replica did not start: {reason}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ReplicaError(f"no {self.function} replica ready in time")
                    self._cond.wait(min(left, 0.5))
            finally:
                self._waiting -= 1

    def _release(self, replica: PoolReplica) -> None:
        with self._cond:
            replica.in_flight -= 1
            replica.served += 1
            replica.last_active = time.monotonic()
            self._in_flight -= 1
            self._cond.notify_all()

    def _check(self, replica: PoolReplica) -> None:
        with self._cond:
            if replica in self._replicas and not replica.alive:
                self._drop_dead_locked(replica)

    # --- scaling (the autoscaler) ---------------------------------------------------------

    def _demand_locked(self) -> int:
        demand = self._in_flight + self._waiting
        self._peak = max(self._peak, demand)
        return demand

    def _wanted(self, demand: float) -> int:
        wanted = math.ceil(demand / self.target_concurrency)
        return max(self.min_replicas, min(self.max_replicas, wanted))

    def _scale_up_locked(self) -> None:
        self._grow_locked(self._wanted(self._demand_locked()))

    def _grow_locked(self, wanted: int) -> None:
        """Start replicas up to ``wanted``; after a failed start, wait a second first (a
        crash-looping function must not become a fork bomb)."""
        if self._last_start_error and time.monotonic() - self._last_start_error[0] < 1.0:
            return
        for _ in range(wanted - len(self._replicas)):
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        self._numbers += 1
        number, port = self._numbers, free_port()
        log_path = self.log_dir / f"{self.function}-{number}.log" if self.log_dir else None
        process = ChildProcess(
            f"{self.function}-{number}",
            function_command(self.function, port),
            env=self._env,
            log_path=log_path,
        ).spawn()
        proc = process.proc
        replica = PoolReplica(number, port, process)
        cold = not self._replicas
        self._replicas.append(replica)
        self._counts["cold_starts" if cold else "scale_ups"] += 1
        log.info(
            "%s replica %d starting on port %d (pid %d, %s)",
            self.function,
            number,
            port,
            proc.pid,
            "cold start" if cold else "scale up",
        )
        threading.Thread(
            target=self._await_ready,
            args=(replica, cold),
            daemon=True,
            name=f"{self.function}-{number}-start",
        ).start()

    def _await_ready(self, replica: PoolReplica, cold: bool) -> None:
        reason = self._probe(replica)
        with self._cond:
            if replica not in self._replicas:
                return  # stopped or found dead meanwhile
            if reason is None:
                replica.ready_at = time.monotonic()
                self._startups.append(replica.startup_s or 0.0)
                if cold:
                    self._last_cold_start_s = replica.startup_s
                log.info(
                    "%s replica %d ready in %.2f s",
                    self.function,
                    replica.number,
                    replica.startup_s,
                )
            else:
                self._counts["start_failures"] += 1
                self._last_start_error = (time.monotonic(), reason)
                self._replicas.remove(replica)
                log.warning(
                    "%s replica %d did not start: %s (log: %s)",
                    self.function,
                    replica.number,
                    reason,
                    self.log_dir or "not kept",
                )
            self._cond.notify_all()
        if reason is not None:
            self._terminate(replica, 5.0)

    def _probe(self, replica: PoolReplica) -> str | None:
        """Wait until ``/healthz`` answers 2xx (None), or the reason it did not."""
        try:
            replica.process.wait_ready(
                http_ok(f"{replica.url}healthz"), self.startup_timeout_s, self._stopping
            )
        except NotReady as exc:
            return str(exc)
        return None

    def _tick_loop(self) -> None:
        while not self._stopping.wait(self.tick_s):
            try:
                self._tick()
            except Exception:  # the pool must keep ticking
                log.exception("%s pool tick failed", self.function)

    def _tick(self) -> None:
        now = time.monotonic()
        with self._cond:
            for replica in [r for r in self._replicas if not r.alive]:
                self._drop_dead_locked(replica)
            self._demand_locked()
            self._samples.append((now, self._peak))
            self._peak = self._in_flight + self._waiting
            while self._samples and self._samples[0][0] < now - self.idle_s:
                self._samples.popleft()
            wanted = self._wanted(max(d for _, d in self._samples))
            self._grow_locked(wanted)  # replaces dead replicas, keeps min_replicas
            surplus = len(self._replicas) - wanted
            idle = sorted(
                (r for r in self._replicas if r.ready and r.in_flight == 0),
                key=lambda r: r.last_active,
            )
            retired = idle[: max(surplus, 0)]
            for replica in retired:
                self._replicas.remove(replica)
                self._counts["scale_downs"] += 1
                log.info(
                    "%s replica %d idle: stopping (%d left)",
                    self.function,
                    replica.number,
                    len(self._replicas),
                )
            if retired:
                self._cond.notify_all()
        for replica in retired:
            thread = threading.Thread(target=self._terminate, args=(replica,), daemon=True)
            thread.start()
            self._stoppers = [t for t in self._stoppers if t.is_alive()] + [thread]

    def _drop_dead_locked(self, replica: PoolReplica) -> None:
        self._replicas.remove(replica)
        self._counts["deaths"] += 1
        log.warning(
            "%s replica %d (pid %d) died with code %s",
            self.function,
            replica.number,
            replica.proc.pid,
            replica.proc.returncode,
        )
        self._cond.notify_all()
        # the server is gone; its workers may not be
        threading.Thread(target=self._terminate, args=(replica, 1.0), daemon=True).start()

    @staticmethod
    def _terminate(replica: PoolReplica, timeout_s: float = 10.0) -> None:
        replica.process.stop(timeout_s)

    # --- reporting ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._cond:
            startups = sorted(self._startups)
            return {
                "replicas": sum(r.ready for r in self._replicas),
                "starting": sum(not r.ready for r in self._replicas),
                "in_flight": self._in_flight,
                "waiting": self._waiting,
                **self._counts,
                "last_cold_start_s": rounded(self._last_cold_start_s),
                "startup_p50_s": rounded(percentile(startups, 50)),
                "pids": [r.proc.pid for r in self._replicas],
            }

    def replicas(self) -> list[PoolReplica]:
        """A snapshot of the current replicas (tests, tables)."""
        with self._cond:
            return list(self._replicas)

    def wait_for(self, replicas: int, timeout_s: float = 60.0) -> bool:
        """Until exactly ``replicas`` replicas are ready and none is starting (tests)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if len(self._replicas) == replicas and all(r.ready for r in self._replicas):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
