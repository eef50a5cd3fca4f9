"""Producing to Kafka: one producer factory and one way to wait for the broker's ack.

Every writer in lensflow goes through here: the predict function's prediction sink, the
dispatcher's dead letters, the embedded S3's bucket notifications (``notify_queue``),
``lensflow dlq replay`` and the tests' hand-made records.
``send`` queues a record and returns a future that the delivery report resolves;
``wait_acked`` polls the producer until every future is resolved (or the time is up);
``produce_and_wait`` is the two together for one message. Safe from many threads at
once: whichever thread's ``poll`` serves a delivery report resolves that record's future.

``publish_object_event`` writes what MinIO's Kafka notification target writes for an
object (``lensflow_eventing.contracts.notification_record``): keyed ``<bucket>/<key>``, no headers.
Uploads never call it (the bucket's notification does that); tests do, to hand a record
straight to the dispatcher.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, wait
from typing import Any

from cloudevents.kafka import KafkaMessage
from confluent_kafka import KafkaException, Producer

from lensflow_core.kafka import KafkaConnection, client_settings
from lensflow_eventing.contracts import ObjectEvent, notification_record


class ProduceError(RuntimeError):
    """The broker did not confirm a record: it may not have been written."""


def make_producer(bootstrap: KafkaConnection | str, **overrides: Any) -> Producer:
    """A producer that waits for all in-sync replicas and gives up after 15 s.

    The short delivery timeout is deliberate: a person running ``lensflow upload``
    against an unreachable broker should hear about it in seconds, not minutes.
    """
    settings = {
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 15000,
        "client.id": "lensflow-producer",
        # A topic the broker does not know fails in a second with "unknown topic" (it is
        # never auto-created: see lensflow_core.kafka), not after the delivery timeout.
        "topic.metadata.propagation.max.ms": 1000,
        **overrides,
    }
    return Producer(client_settings(bootstrap, settings))


_NO_TOPIC = {"UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC", "_UNKNOWN_PARTITION"}


def _failure(topic: str, error) -> str:
    """One line on why a record was not written; a missing topic is said plainly."""
    name = error.name() if hasattr(error, "name") else ""
    if name in _NO_TOPIC:
        return (
            f"topic {topic} does not exist on the broker (lensflow creates topics only with "
            f"ensure_topics: `lensflow up`, or the cluster's KafkaTopic): {error}"
        )
    return f"{topic}: {error}"


def send(
    producer: Producer,
    topic: str,
    key: bytes | str | None,
    value: bytes | None,
    headers: dict[str, bytes] | None = None,
) -> Future[None]:
    """Queue one record; the future resolves when the broker has it (or says why not)."""
    delivered: Future[None] = Future()

    def on_delivery(err, _msg) -> None:
        if err is not None:
            delivered.set_exception(ProduceError(f"{_failure(topic, err)} (key {key!r})"))
        else:
            delivered.set_result(None)

    try:
        producer.produce(
            topic,
            key=key,
            value=value,
            headers=list((headers or {}).items()),
            on_delivery=on_delivery,
        )
    except (BufferError, KafkaException) as exc:  # both mean "not written"
        reason = _failure(topic, exc.args[0]) if isinstance(exc, KafkaException) else str(exc)
        delivered.set_exception(ProduceError(f"could not produce: {reason}"))
    return delivered


class Poller:
    """Serves one producer's delivery reports from a thread of its own.

    For a producer many threads produce to at once (the predict function): each waiter
    then sleeps on its own future (``wait_acked(..., polled=True)``) and wakes once, when
    its report is served, instead of polling in turns every millisecond.
    """

    def __init__(self, producer: Producer):
        self._producer = producer
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._producer.poll(0.1)  # returns as soon as a report was served

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(1)


def wait_acked(
    producer: Producer,
    futures: Iterable[Future[None]],
    timeout_s: float,
    polled: bool = False,
) -> None:
    """Wait until every record was acknowledged; raise ``ProduceError`` if any was not.

    ``polled``: a ``Poller`` serves this producer's reports, so only wait; else poll.
    """
    pending = list(futures)
    deadline = time.monotonic() + timeout_s
    if polled:
        wait(pending, timeout=timeout_s)
    while not all(f.done() for f in pending):
        if time.monotonic() > deadline:
            left = sum(not f.done() for f in pending)
            raise ProduceError(
                f"{left} record(s) not confirmed by the broker after {timeout_s:g} s"
            )
        # Short: when another thread's poll serves our report, we notice within 1 ms.
        producer.poll(0.001)
    errors = [str(f.exception()) for f in pending if f.exception() is not None]
    if errors:
        raise ProduceError("; ".join(errors))


def produce_and_wait(
    producer: Producer,
    topic: str,
    message: KafkaMessage,
    timeout_s: float,
    polled: bool = False,
) -> None:
    """Produce one message and wait for the broker's acknowledgement, or raise.
    ``polled``: as for ``wait_acked``."""
    future = send(producer, topic, message.key, message.value, message.headers)
    wait_acked(producer, [future], timeout_s, polled)


def publish_object_event(producer: Producer, topic: str, event: ObjectEvent) -> Future[None]:
    """Queue ``notification_record(event)`` on ``topic``; the future resolves at the ack."""
    key, value = notification_record(event)
    return send(producer, topic, key, value)
