"""The local KafkaSource: consume the images topic, POST each record as a CloudEvent.

On Knative a KafkaSource turns each record of the images topic into a binary-mode
CloudEvent and POSTs it to the predict function. Locally this dispatcher does the same
job with the same attributes (``lensflow_eventing.contracts.kafkasource_event``), so a function
cannot tell where it runs.

How it works, and why:

- One consumer group on the images topic, offsets committed by hand. An offset is
  committed only once its event was delivered (2xx) or dead-lettered; if even the
  dead-letter topic refuses it, the offset is held back and the event comes again after
  a restart (Knative would commit it and lose the event).
- The consumer is used from one thread only (librdkafka consumers are not meant to be
  shared): the loop in ``run`` polls, hands jobs to a ``ThreadPoolExecutor`` of
  ``max_in_flight`` workers, takes their results back through a queue, and commits. Workers only talk HTTP and produce
  dead letters (the producer is thread-safe).
- ``ordered``: one event in flight per partition, so events of one key (one object
  path) arrive in order. ``unordered``: up to ``max_in_flight`` events at once, from any
  partitions; commits then cover only the finished prefix of each partition
  (``lensflow_eventing.offsets``).
- Records that wait for a free slot are buffered per partition; a partition whose
  buffer is full is paused, so memory stays bounded however far behind we are.
- On a rebalance, revoked partitions get a short grace to finish what is in flight,
  their finished prefix is committed, and their state is dropped. Whatever was not
  finished is redelivered to the next owner: at-least-once, duplicates allowed.
- Broker restarts: lost partitions and an unknown member id are librdkafka's to rejoin;
  what kept the old dispatcher idle was a broker that came back *empty* (Tansu in
  memory): the topic was gone, so the group assigned nothing. A keeper thread checks
  every ``topic_check_s`` that the topics exist and recreates missing ones with
  ``ensure_topics`` (the one way topics are made), and metadata is refreshed every few
  seconds so that the consumer sees the topic again and rejoins within seconds.

The sink is a URL, a callable returning the URL at each attempt, or any object with
``post(headers, body, timeout_s) -> (status, body)`` and ``url`` (see
``lensflow_eventing.delivery``): the seam where a local replica pool can start a function replica
on demand (scale from zero) before answering.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cloudevents.conversion import to_binary
from cloudevents.kafka import KafkaMessage
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from lensflow_core.kafka import KafkaConnection, client_settings, connect
from lensflow_eventing.contracts import kafkasource_event
from lensflow_eventing.dead_letter import annotate, kafka_binary, raw_data
from lensflow_eventing.delivery import MAX_WAITING_S, DeliverySpec, Sink, as_sink, deliver
from lensflow_eventing.offsets import OffsetTracker
from lensflow_eventing.producer import ProduceError, make_producer, produce_and_wait
from lensflow_eventing.topics import DLQ_PARTITIONS, IMAGES_PARTITIONS, TopicSpec, ensure_topics

log = logging.getLogger(__name__)
# The group session. On Tansu a fresh group's join takes half the session timeout and a
# member replacing a killed one ~1.8x (3 s and 11 s at 6 s; 5 s and 18 s at 10 s), so the
# session stays short. Tansu's coordinator writes the group to its storage on every
# heartbeat (tansu-io/tansu v0.6.0, tansu-broker/src/coordinator/group/administrator.rs);
# with its S3 engine a frozen S3 leaves heartbeats unanswered. librdkafka's
# default 3 s heartbeat lost the session to a 5.5 s freeze where a 1 s one kept it
# (docs/benchmarks.md, "Soak"; seed 4242 lost it with no fault under way).
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_MS = 1000

ORDERINGS = ("ordered", "unordered")

# What a worker reports about one record.
DELIVERED = "delivered"
DEAD_LETTERED = "dead_lettered"
FAILED = "failed"  # neither delivered nor dead-lettered: hold the commit point
ABORTED = "aborted"  # stopped during a backoff: not finished, not committed


@dataclass
class _Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int | None


@dataclass
class _Partition:
    """Per-partition state, owned by the loop thread. Replaced on every assignment, so
    results for an older incarnation are recognised (``is``) and ignored."""

    number: int
    waiting: deque[_Record] = field(default_factory=deque)
    in_flight: int = 0
    paused: bool = False
    revoked: bool = False
    offsets: OffsetTracker = field(default_factory=OffsetTracker)


@dataclass
class _Job:
    state: _Partition
    record: _Record


class Dispatcher:
    """A KafkaSource equivalent: records of ``topic`` on ``bootstrap`` to ``sink``.

    ``source`` is the KafkaSource's ``ce-source`` (``/apis/v1/namespaces/<ns>/
    kafkasources/<name>``), ``group_id`` its consumer group, ``dead_letter_topic`` where
    events go that the sink would not take. ``run()`` dispatches in the calling thread
    until ``stop()``; ``start()`` runs it in a background thread. ``stats()`` is safe
    from any thread.
    """

    def __init__(
        self,
        bootstrap: KafkaConnection | str,
        topic: str,
        sink: str | Callable[[], str] | Sink,
        *,
        source: str,
        group_id: str,
        dead_letter_topic: str,
        delivery: DeliverySpec | None = None,
        ordering: str = "ordered",
        max_in_flight: int = 16,
        dead_letter_producer=None,
        consumer_settings: dict[str, Any] | None = None,
        create_topics: bool = True,
        commit_interval_s: float = 0.2,
        revoke_grace_s: float = 2.0,
        shutdown_grace_s: float = 10.0,
        dead_letter_timeout_s: float = 10.0,
        max_waiting_s: float = MAX_WAITING_S,
        topics: list[TopicSpec] | None = None,
        topic_check_s: float = 2.0,
    ):
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be ordered or unordered, not {ordering!r}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.bootstrap = bootstrap
        self.topic = topic
        self.source = source
        self.dead_letter_topic = dead_letter_topic
        self.sink = as_sink(sink, pool_size=max_in_flight)
        self.delivery = delivery or DeliverySpec()
        self.ordering = ordering
        self.max_in_flight = max_in_flight
        self.group_id = group_id
        self.commit_interval_s = commit_interval_s
        self.revoke_grace_s = revoke_grace_s
        self.shutdown_grace_s = shutdown_grace_s
        self.dead_letter_timeout_s = dead_letter_timeout_s
        self.max_waiting_s = max_waiting_s  # how long a sink may say "waiting" (delivery.py)
        self._create_topics = create_topics
        # the topics to keep existing: the images and dead-letter topics unless told
        self._topics = topics or [
            TopicSpec(topic, IMAGES_PARTITIONS),
            TopicSpec(dead_letter_topic, DLQ_PARTITIONS),
        ]
        self.topic_check_s = topic_check_s
        self._missing_logged: set[str] = set()
        self._consumer_settings = self._consumer_config(bootstrap, consumer_settings)
        self._dlq = dead_letter_producer
        self._buffer_limit = max(2 * max_in_flight, 32)
        self._init_run_state()

    def _consumer_config(
        self, bootstrap: KafkaConnection | str, extra: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The consumer's settings: the group's, manual commits, short idle fetches."""
        return client_settings(bootstrap) | {
            "group.id": self.group_id,
            "client.id": f"{self.group_id}-dispatcher",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_MS,
            # An idle fetch returns after this long. Tansu does not answer a waiting fetch
            # early when records arrive, so the default 500 ms would add up to 500 ms of
            # latency per event; 50 ms costs a few idle fetches a second.
            "fetch.wait.max.ms": 50,
            # A topic recreated after a broker restart is seen (and joined) within this.
            "topic.metadata.refresh.interval.ms": 2000,
            "on_commit": self._on_commit,
            **(extra or {}),
        }

    def _init_run_state(self) -> None:
        """What a run keeps: the consumer, partitions, results, counts and the last snapshot."""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._partitions: dict[int, _Partition] = {}
        self._results: queue.Queue[tuple[_Job, str]] = queue.Queue()
        self._workers: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._rotation = 0
        self._last_commit = 0.0
        self._assigned = threading.Event()
        self._lock = threading.Lock()
        self._counts = {DELIVERED: 0, DEAD_LETTERED: 0, FAILED: 0, ABORTED: 0, "retried": 0}
        self._lag: int | None = None
        self._lag_by_partition: dict[int, int] = {}
        self._snapshot: dict[str, Any] = {"in_flight": 0, "buffered": 0, "partitions": []}
        self.error: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Dispatcher:
        """Run in a daemon thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("dispatcher already started")
        self._thread = threading.Thread(target=self._run_in_thread, name="dispatcher", daemon=True)
        self._thread.start()
        return self

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # kept for stop() and stats() to report
            self.error = exc
            log.exception("dispatcher stopped by an error")

    def stop(self, timeout_s: float | None = 30.0) -> None:
        """Stop taking records, let in-flight ones finish (within the shutdown grace),
        commit what is done, leave the group. Re-raises an error the thread died of."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error

    def wait_assigned(self, timeout_s: float = 30.0) -> bool:
        """True once the group gave this dispatcher partitions (tests, readiness)."""
        return self._assigned.wait(timeout_s)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "delivered": self._counts[DELIVERED],
                "dead_lettered": self._counts[DEAD_LETTERED],
                "failed": self._counts[FAILED],
                "aborted": self._counts[ABORTED],
                "retried": self._counts["retried"],
                "lag": self._lag,
                "lag_by_partition": dict(self._lag_by_partition),
                **self._snapshot,
            }

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Dispatch until ``stop()`` (or SIGTERM/Ctrl-C handled by the caller)."""
        # Both connect first: a refused TLS handshake or login stops here, on one line.
        if self._create_topics:
            ensure_topics(self.bootstrap, self._topics)
        else:
            connect(self.bootstrap)
        threading.Thread(target=self._keep_topics, name="dispatcher-topics", daemon=True).start()
        own_dlq = self._dlq is None
        if own_dlq:
            self._dlq = make_producer(
                self.bootstrap,
                **{
                    "client.id": f"{self.group_id}-dead-letters",
                    "message.timeout.ms": int(self.dead_letter_timeout_s * 1000),
                },
            )
        self._consumer = Consumer(self._consumer_settings)
        self._workers = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="dispatch")
        self._consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "dispatching %s (group %s) to %s, %s, up to %d in flight",
            self.topic,
            self.group_id,
            self.sink.url,
            self.ordering,
            self.max_in_flight,
        )
        next_lag = 0.0
        try:
            while not self._stopping.is_set():
                finished = self._collect(timeout_s=0.0)
                self._schedule()
                self._commit(sync=False)
                messages = self._consumer.consume(64, timeout=0.0 if self._in_flight else 0.1)
                for message in messages:
                    self._accept(message)
                if not messages and not finished and self._in_flight:
                    self._collect(timeout_s=0.005)
                if time.monotonic() > next_lag:
                    self._update_stats(with_lag=True)
                    next_lag = time.monotonic() + 1.0
            self._drain()
        finally:
            # Jobs not started yet finish at once as ABORTED (see _work); in-flight ones
            # were given the shutdown grace in _drain and are not waited for here.
            self._workers.shutdown(wait=False)
            try:
                self._consumer.close()  # revokes: commits the finished prefix once more
            finally:
                self._consumer = None
                self._update_stats(with_lag=False)
                if own_dlq:
                    self._dlq.flush(self.dead_letter_timeout_s)
                    self._dlq = None
            log.info("dispatcher stopped: %s", self.stats())

    def _drain(self) -> None:
        """On stop: let in-flight events finish (retries are cut short), commit."""
        deadline = time.monotonic() + self.shutdown_grace_s
        while self._in_flight and time.monotonic() < deadline:
            self._collect(timeout_s=0.05)
        if self._in_flight:
            log.warning(
                "%d event(s) still in flight at shutdown: they will be redelivered", self._in_flight
            )
        self._commit(sync=True)
        self._update_stats(with_lag=True)

    def _accept(self, message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer: %s", error)
            return
        state = self._partitions.get(message.partition())
        if state is None or state.revoked:
            return  # a straggler from a partition we no longer own
        kind, stamp = message.timestamp()
        state.waiting.append(
            _Record(
                partition=message.partition(),
                offset=message.offset(),
                key=message.key(),
                value=message.value(),
                headers={k: (v or b"") for k, v in (message.headers() or [])},
                timestamp_ms=stamp if kind else None,
            )
        )
        if len(state.waiting) >= self._buffer_limit and not state.paused:
            self._consumer.pause([TopicPartition(self.topic, state.number)])
            state.paused = True

    def _schedule(self) -> None:
        """Hand waiting records to workers, one partition at a time, round robin."""
        states = list(self._partitions.values())
        progress = True
        while progress and self._in_flight < self.max_in_flight:
            progress = False
            for i in range(len(states)):
                state = states[(self._rotation + i) % len(states)]
                if not state.waiting or state.revoked:
                    continue
                if self.ordering == "ordered" and state.in_flight:
                    continue
                record = state.waiting.popleft()
                state.offsets.start(record.offset)
                state.in_flight += 1
                self._in_flight += 1
                self._workers.submit(self._work, _Job(state, record))
                progress = True
                if self._in_flight >= self.max_in_flight:
                    break
            self._rotation += 1
        for state in states:
            if state.paused and len(state.waiting) <= self._buffer_limit // 2:
                self._consumer.resume([TopicPartition(self.topic, state.number)])
                state.paused = False

    def _collect(self, timeout_s: float) -> int:
        """Take finished jobs back; returns how many."""
        count = 0
        while True:
            try:
                job, outcome = (
                    self._results.get(timeout=timeout_s)
                    if timeout_s
                    else self._results.get_nowait()
                )
            except queue.Empty:
                return count
            timeout_s = 0.0
            count += 1
            self._in_flight -= 1
            job.state.in_flight -= 1
            with self._lock:
                self._counts[outcome] += 1
            if outcome in (DELIVERED, DEAD_LETTERED):
                job.state.offsets.done(job.record.offset)
            # FAILED and ABORTED stay outstanding: the commit point never passes them

    def _commit(self, sync: bool, only: set[int] | None = None) -> None:
        """Commit every partition's finished prefix that moved (at most every
        ``commit_interval_s`` unless ``sync``)."""
        if not sync and time.monotonic() - self._last_commit < self.commit_interval_s:
            return
        self._last_commit = time.monotonic()
        offsets = []
        for number, state in self._partitions.items():
            if only is not None and number not in only:
                continue
            point = state.offsets.to_commit()
            if point is not None:
                offsets.append(TopicPartition(self.topic, number, point))
                state.offsets.committed = point
        if not offsets:
            self._update_stats(with_lag=False)
            return
        try:
            if sync:
                for tp in self._consumer.commit(offsets=offsets, asynchronous=False) or []:
                    if tp.error is not None:
                        self._commit_failed(tp.partition, tp.error)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            log.warning("commit failed (will retry): %s", exc)
            for tp in offsets:
                self._commit_failed(tp.partition, exc)
        self._update_stats(with_lag=False)

    def _on_commit(self, err, partitions) -> None:
        # Runs inside consume(), on the loop thread.
        for tp in partitions or []:
            if err is not None or tp.error is not None:
                self._commit_failed(tp.partition, err or tp.error)

    def _commit_failed(self, partition: int, error) -> None:
        if isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET:
            return
        log.warning("commit of partition %d failed: %s", partition, error)
        state = self._partitions.get(partition)
        if state is not None:
            state.offsets.committed = None  # try again at the next commit

    def _update_stats(self, with_lag: bool) -> None:
        lag, by_partition = self._lag, self._lag_by_partition
        if with_lag and self._consumer is not None:
            by_partition = {}
            for number, state in self._partitions.items():
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, number), cached=True
                )
                point = state.offsets.commit_point()
                if high is not None and high >= 0 and point is not None and point != OFFSET_INVALID:
                    by_partition[number] = max(high - point, 0)
            lag = sum(by_partition.values())
        with self._lock:
            self._lag = lag
            self._lag_by_partition = by_partition
            self._snapshot = {
                "in_flight": self._in_flight,
                "buffered": sum(len(s.waiting) for s in self._partitions.values()),
                "partitions": sorted(self._partitions),
                "committed": {n: s.offsets.committed for n, s in self._partitions.items()},
            }

    def _keep_topics(self) -> None:
        """Recreate missing topics (a broker back empty), or say once that they are
        missing when this dispatcher may not create them."""
        admin = AdminClient(client_settings(self.bootstrap))
        while not self._stopping.wait(self.topic_check_s):
            try:
                existing = admin.list_topics(timeout=self.topic_check_s).topics
            except KafkaException:
                continue  # broker unreachable: librdkafka reconnects; check again later
            missing = [spec for spec in self._topics if spec.name not in existing]
            if not missing:
                self._missing_logged.clear()
                continue
            names = [spec.name for spec in missing]
            if not self._create_topics:
                if set(names) - self._missing_logged:
                    log.error("topic(s) %s do not exist: nothing to dispatch", names)
                    self._missing_logged.update(names)
                continue
            log.warning("topic(s) %s missing (broker restarted empty?): recreating", names)
            try:
                ensure_topics(self.bootstrap, missing, timeout_s=self.topic_check_s * 2)
            except KafkaException as exc:
                log.warning("recreating %s failed (will retry): %s", names, exc)

    # --- rebalance callbacks (called inside consume(), on the loop thread) ----------------

    def _on_assign(self, consumer, partitions) -> None:
        mine = [tp for tp in partitions if tp.topic == self.topic]
        for tp in mine:
            self._partitions[tp.partition] = _Partition(tp.partition)
        if mine:
            consumer.resume(mine)  # a partition paused by a former owner state starts fresh
        log.info("assigned partitions %s", [tp.partition for tp in mine])
        self._assigned.set()
        self._update_stats(with_lag=False)

    def _on_revoke(self, consumer, partitions) -> None:
        numbers = {tp.partition for tp in partitions if tp.topic == self.topic}
        states = [self._partitions[n] for n in numbers if n in self._partitions]
        for state in states:
            state.revoked = True
            state.waiting.clear()
        deadline = time.monotonic() + self.revoke_grace_s
        while any(s.in_flight for s in states) and time.monotonic() < deadline:
            self._collect(timeout_s=0.05)
        self._commit(sync=True, only=numbers)
        for n in numbers:
            self._partitions.pop(n, None)
        log.info("revoked partitions %s", sorted(numbers))
        self._update_stats(with_lag=False)

    def _on_lost(self, consumer, partitions) -> None:
        # The group moved on without us: committing now would be rejected or wrong.
        for tp in partitions:
            if tp.topic == self.topic:
                self._partitions.pop(tp.partition, None)
        log.warning("lost partitions %s", [tp.partition for tp in partitions])

    # --- workers --------------------------------------------------------------------------

    def _work(self, job: _Job) -> None:
        """One record, in a worker thread; the outcome goes back to the loop thread."""
        if self._stopping.is_set():  # queued but not started: leave it for next time
            self._results.put((job, ABORTED))
            return
        try:
            outcome = self._dispatch(job.record)
        except Exception:  # a bug must not lose the job's result
            log.exception(
                "dispatching offset %d of partition %d failed",
                job.record.offset,
                job.record.partition,
            )
            outcome = FAILED
        self._results.put((job, outcome))

    def _dispatch(self, record: _Record) -> str:
        try:
            event = kafkasource_event(
                source=self.source,
                topic=self.topic,
                partition=record.partition,
                offset=record.offset,
                timestamp_ms=record.timestamp_ms,
                key=record.key,
                value=record.value,
                headers=record.headers,
            )
        except Exception as exc:  # a CloudEvent record we cannot read
            return self._dead_letter_raw(record, f"not a readable CloudEvent: {exc}")
        headers, body = to_binary(event, data_marshaller=raw_data)
        result = deliver(
            self.sink,
            headers,
            body,
            self.delivery,
            self._stopping,
            self._retried,
            max_waiting_s=self.max_waiting_s,
        )
        if result.delivered:
            return DELIVERED
        if result.aborted:
            return ABORTED
        log.warning(
            "dead-lettering partition %d offset %d (key %r): %s after %d attempt(s)",
            record.partition,
            record.offset,
            record.key,
            result.status if result.status is not None else result.error,
            result.attempts,
        )
        annotate(event, self.sink.url, result.status, result.body)
        try:
            produce_and_wait(
                self._dlq,
                self.dead_letter_topic,
                kafka_binary(event, record.key),
                self.dead_letter_timeout_s,
            )
        except ProduceError as exc:
            log.error(
                "offset %d of partition %d neither delivered nor dead-lettered, "
                "holding its commit: %s",
                record.offset,
                record.partition,
                exc,
            )
            return FAILED
        return DEAD_LETTERED

    def _dead_letter_raw(self, record: _Record, reason: str) -> str:
        """A record that claims to be a CloudEvent but cannot be read goes to the
        dead-letter topic as it is, with the reason in a ``lensflow-error`` header."""
        headers = {**record.headers, "lensflow-error": reason.encode()}
        message = KafkaMessage(headers=headers, key=record.key, value=record.value or b"")
        try:
            produce_and_wait(self._dlq, self.dead_letter_topic, message, self.dead_letter_timeout_s)
        except ProduceError as exc:
            log.error("unreadable record at offset %d not dead-lettered: %s", record.offset, exc)
            return FAILED
        return DEAD_LETTERED

    def _retried(self, attempt: int, status: int | None) -> None:
        with self._lock:
            self._counts["retried"] += 1
