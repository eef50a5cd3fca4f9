"""MinIO's ``queue_dir`` for the embedded S3: each event a file until the broker has it.

``EventQueue.put`` writes one record's value (MinIO's ``{"EventName", "Key", "Records"}``,
whose ``Key`` is also the record key) to ``<dir>/<time ns>-<random>.event``, under a
temporary name first and then renamed, so that a reader never sees half an event; the
S3 server calls it before its answer leaves (``lensflow.s3_notify``). ``EventSender``
produces the files to the topic in name order (the order they were written) and deletes
each one only once the broker acknowledged it. With the broker down the files wait and
are produced again every few seconds; a server started on a folder with files in it
sends them first (MinIO's ``replayEvents``). At least once, as MinIO: an event
acknowledged but not yet deleted when the process dies is sent again.

As MinIO's ``QueueStore`` (minio/minio internal/event/target/queuestore.go): one file per
event, ``.event`` files, at most ``QUEUE_LIMIT`` of them (MinIO's default
``queue_limit``), no fsync (an event survives the process, not the machine).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

from lensflow_core.kafka import KafkaConnection
from lensflow_eventing.producer import make_producer, send

log = logging.getLogger(__name__)

QUEUE_LIMIT = 100_000
SUFFIX = ".event"
RETRY_S = (0.5, 5.0)  # first and longest wait before producing failed events again
# How long the broker may take to acknowledge an event before it is produced again; an
# event the broker stored but whose answer came too late is then on the topic twice, as
# with MinIO (RELEASE.2025-09-07T16-13-09Z internal/event/target/kafka.go: SendFromStore
# deletes the stored event only after a successful send).
MESSAGE_TIMEOUT_S = 30.0
CLIENT_ID = "lensflow-s3-notify"  # librdkafka's name for the producer, in its log lines too


class QueueFull(RuntimeError):
    """The folder holds ``QUEUE_LIMIT`` events: the broker has been away too long."""


class EventQueue:
    """The folder of events not yet acknowledged by the broker."""

    def __init__(self, directory: str | Path, limit: int = QUEUE_LIMIT):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._count = len(self.names())
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Waiting events, oldest first."""
        return sorted(p.name for p in self.directory.iterdir() if p.name.endswith(SUFFIX))

    def __len__(self) -> int:
        return self._count

    def put(self, value: bytes) -> str:
        """Keep one event; its file name. Raises QueueFull, or OSError from the disk."""
        with self._lock:
            if self._count >= self.limit:
                raise QueueFull(f"{self._count} events wait for the broker in {self.directory}")
            self._count += 1
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        partial = self.directory / f".{name}.tmp"
        try:
            partial.write_bytes(value)
            os.replace(partial, self.directory / name)
        except BaseException:
            with self._lock:
                self._count -= 1
            partial.unlink(missing_ok=True)
            raise
        return name

    def read(self, name: str) -> tuple[bytes, bytes] | None:
        """(record key, value) of a waiting event; None if it is gone or unreadable."""
        try:
            value = (self.directory / name).read_bytes()
            return json.loads(value)["Key"].encode(), value
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("dropping %s: not an event this server wrote", name)
            self.delete(name)
            return None

    def delete(self, name: str) -> None:
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._count -= 1


class EventSender:
    """A thread producing ``queue``'s events to ``topic``, deleting each once acknowledged."""

    def __init__(self, queue_: EventQueue, kafka: KafkaConnection | str, topic: str):
        self.queue = queue_
        self.topic = topic
        self.producer = make_producer(
            kafka,
            **{
                "client.id": CLIENT_ID,
                "message.timeout.ms": int(MESSAGE_TIMEOUT_S * 1000),
                "reconnect.backoff.max.ms": 1000,  # a broker back is used within a second
            },
        )
        self.sent = 0
        self._new: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._due = set(queue_.names())  # what a previous server left: sent first
        self._failures = 0
        self._retry_at = 0.0
        self._stopping = threading.Event()
        self._flush_s = 2.0
        self._thread = threading.Thread(target=self._run, name="s3-notify", daemon=True)

    def start(self) -> EventSender:
        self._thread.start()
        return self

    def wake(self, name: str) -> None:
        """``name`` was just queued: send it now rather than at the next look."""
        self._new.put(name)

    def stop(self, flush_s: float = 2.0) -> None:
        """Stop sending; give what is in flight ``flush_s`` to be acknowledged (and
        deleted). Whatever is left stays in the folder for the next server."""
        self._flush_s = flush_s
        self._stopping.set()
        self._thread.join(flush_s + 1)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._take_new(0.05 if not self._due else 0)
            if self._due and time.monotonic() >= self._retry_at:
                self._produce(sorted(self._due))
            self.producer.poll(0.02)
        self.producer.flush(self._flush_s)  # serves the last reports: their files go

    def _take_new(self, wait_s: float) -> None:
        try:
            self._due.add(self._new.get(timeout=wait_s) if wait_s else self._new.get_nowait())
            while True:
                self._due.add(self._new.get_nowait())
        except queue.Empty:
            return

    def _produce(self, names: list[str]) -> None:
        for name in names:
            record = self.queue.read(name)
            self._due.discard(name)
            if record is None:
                continue
            sent = send(self.producer, self.topic, record[0], record[1])
            sent.add_done_callback(lambda done, name=name: self._acked(name, done))

    def _acked(self, name: str, done: Future[None]) -> None:
        """A delivery report (served by this thread's poll): delete, or try again later."""
        error = done.exception()
        if error is None:
            self.queue.delete(name)
            self.sent += 1
            if self._failures:
                log.warning("broker back: sending the events that waited")
            self._failures = 0
            return
        self._due.add(name)
        if not self._failures:
            log.warning("events wait in %s: %s", self.queue.directory, error)
        self._failures += 1
        wait = min(RETRY_S[0] * 2 ** min(self._failures, 8), RETRY_S[1])
        self._retry_at = time.monotonic() + wait
