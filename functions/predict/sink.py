"""Produces prediction events to Kafka and waits until the broker has them.

A KafkaSource discards its sink's reply, so the function itself must put the prediction
on the output topic *before* answering 2xx; otherwise an acknowledged event could vanish.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from cloudevents.abstract import AnyCloudEvent
from cloudevents.kafka import to_binary
from confluent_kafka import KafkaException, Producer


class ProduceError(RuntimeError):
    """The broker did not confirm the event in time: a transient failure (503)."""


class PredictionProducer:
    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 10.0):
        self.topic = topic
        self.timeout_s = timeout_s
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "linger.ms": 0,  # every event waits for its ack: batching only adds latency
                "message.timeout.ms": int(timeout_s * 1000),
                "socket.connection.setup.timeout.ms": int(timeout_s * 1000),
            }
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="prediction-producer", daemon=True)
        self._poller.start()

    def send(self, event: AnyCloudEvent, data: bytes | None = None) -> None:
        """Produce ``event`` (binary mode, keyed by its partitionkey); block until acked.

        ``data``: the event's data already serialised, so it is not serialised twice.
        """
        message = to_binary(event, data_marshaller=None if data is None else lambda _: data)
        delivered: Future[None] = Future()

        def on_delivery(err, _msg) -> None:
            if err is not None:
                delivered.set_exception(ProduceError(f"broker refused the prediction: {err}"))
            else:
                delivered.set_result(None)

        try:
            self._producer.produce(
                self.topic,
                key=message.key,
                value=message.value,
                headers=list(message.headers.items()),
                on_delivery=on_delivery,
            )
        except (BufferError, KafkaException) as exc:
            raise ProduceError(f"could not queue the prediction: {exc}") from None
        try:
            delivered.result(timeout=self.timeout_s + 1)
        except TimeoutError:
            raise ProduceError("the broker did not confirm the prediction in time") from None

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=2)
        self._producer.flush(self.timeout_s)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
