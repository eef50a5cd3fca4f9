"""Produces prediction events to Kafka; the broker's acknowledgement is a future.

A KafkaSource discards its sink's reply, so the function itself must put the prediction
on the output topic *before* answering 2xx; otherwise an acknowledged event could vanish.
The server waits for that future on its event loop (``lensflow_predict.main``), so no
request thread sits blocked on the broker.
"""

from __future__ import annotations

from concurrent.futures import Future

from cloudevents.abstract import AnyCloudEvent
from cloudevents.kafka import to_binary

from lensflow_core.kafka import KafkaConnection
from lensflow_eventing.producer import Poller, ProduceError, make_producer, send, wait_acked

__all__ = ["CLIENT_ID", "PRODUCE_TIMEOUT_S", "PredictionProducer", "ProduceError"]

CLIENT_ID = "lensflow-predict"  # librdkafka's name for it, in its log lines too

# How long a prediction may wait for the broker's acknowledgement before the request
# answers 503 (and the dispatcher delivers the event again).
PRODUCE_TIMEOUT_S = 10.0


class PredictionProducer:
    def __init__(
        self, bootstrap: KafkaConnection | str, topic: str, timeout_s: float = PRODUCE_TIMEOUT_S
    ):
        self.topic = topic
        self.timeout_s = timeout_s
        self._producer = make_producer(
            bootstrap,
            **{
                "client.id": CLIENT_ID,
                "linger.ms": 0,  # every event waits for its ack: batching only adds latency
                "message.timeout.ms": int(timeout_s * 1000),
                "socket.connection.setup.timeout.ms": int(timeout_s * 1000),
            },
        )
        self._poller = Poller(self._producer)  # made in the worker (PredictApp is lazy)

    def produce(self, event: AnyCloudEvent, data: bytes | None = None) -> Future[None]:
        """Queue ``event`` (binary mode, keyed by its partitionkey); the future resolves
        when the broker has it, or fails with ``ProduceError`` (transient: 503).

        ``data``: the event's data already serialised, so it is not serialised twice.
        """
        message = to_binary(event, data_marshaller=None if data is None else lambda _: data)
        return send(self._producer, self.topic, message.key, message.value, message.headers)

    def wait(self, futures: list[Future[None]]) -> None:
        """Block until every future resolved; raise ``ProduceError`` if one failed."""
        wait_acked(self._producer, futures, self.timeout_s + 1, polled=True)

    def close(self) -> None:
        self._poller.stop()
        self._producer.flush(self.timeout_s)
