"""Reading the predictions topic: binary-mode Kafka CloudEvents, one per image.

``TopicReader`` is lensflow's one way to read a topic from outside a consumer group: used
by ``lensflow predictions tail`` (``read_predictions``), the demo's and the benchmark's
watchers, and the tests. ``parse_prediction`` turns a record into a ``Prediction``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloudevents.kafka import KafkaMessage, from_binary, from_structured
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

from eventing.contracts import is_cloudevent_record
from lensflow_core.kafka import KafkaConnection, client_settings


@dataclass(frozen=True)
class Prediction:
    time: str
    subject: str
    label: str | None
    score: float | None
    model_version: str | None
    event_id: str
    partition: int
    offset: int
    data: Any

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "subject": self.subject,
            "label": self.label,
            "score": self.score,
            "model_version": self.model_version,
            "id": self.event_id,
            "partition": self.partition,
            "offset": self.offset,
            "data": self.data,
        }

    def line(self) -> str:
        score = f"{self.score:.3f}" if isinstance(self.score, (int, float)) else "-"
        return (
            f"{self.time}  {self.subject}  {self.label or '-'} {score}  "
            f"model {self.model_version or '-'}"
        )


def _json_or_raw(value: bytes) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def parse_prediction(message) -> Prediction | None:
    """The prediction in a consumed record, or None if the record is not a CloudEvent."""
    headers = {k: (v or b"") for k, v in (message.headers() or [])}
    if not is_cloudevent_record(headers):
        return None
    kafka_message = KafkaMessage(headers=headers, key=message.key(), value=message.value() or b"")
    if "ce_specversion" in {k.lower() for k in headers}:
        event = from_binary(kafka_message, data_unmarshaller=_json_or_raw)
    else:
        event = from_structured(kafka_message)
    data = event.get_data()
    label, score = _top(data.get("predictions") if isinstance(data, dict) else None)
    model = data.get("model") if isinstance(data, dict) else None
    kind, stamp = message.timestamp()
    when = event.get("time") or (
        datetime.fromtimestamp(stamp / 1000, timezone.utc).isoformat() if kind else ""
    )
    return Prediction(
        time=str(when),
        subject=str(event.get("subject") or ""),
        label=label,
        score=score,
        model_version=str(model.get("version")) if isinstance(model, dict) else None,
        event_id=str(event["id"]),
        partition=message.partition(),
        offset=message.offset(),
        data=data,
    )


def _top(predictions: Any) -> tuple[str | None, float | None]:
    """The best label: the first entry (the function sorts them), in whatever shape."""
    if not isinstance(predictions, list) or not predictions:
        return None, None
    first = predictions[0]
    if isinstance(first, dict):
        label = first.get("label", first.get("name"))
        score = first.get("score", first.get("probability"))
        return (
            str(label) if label is not None else None,
            float(score) if isinstance(score, (int, float)) else None,
        )
    if isinstance(first, (list, tuple)) and len(first) == 2:
        return str(first[0]), float(first[1])
    return str(first), None


class TopicReader:
    """Reads every partition of one topic without joining a consumer group.

    ``assign``, never ``subscribe``, and no commits: reading never moves anyone's offsets,
    and any number of readers can read at once. Starts at the beginning of each
    partition, at its end (``from_end``), or ``last`` records before its end; ``start``
    (partition -> offset) resumes where an earlier reader stopped, on a log that still
    reaches there (a durable broker). A topic that does not exist yet has no partitions:
    reading it gives nothing.
    """

    def __init__(
        self,
        bootstrap: KafkaConnection | str,
        topic: str,
        *,
        from_end: bool = False,
        last: int | None = None,
        timeout_s: float = 10.0,
        group: str = "lensflow-reader",
        start: Mapping[int, int] | None = None,
    ):
        self.topic = topic
        self._consumer = Consumer(
            client_settings(
                bootstrap,
                {
                    # required by the client; never joined or committed
                    "group.id": f"{group}-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    "auto.offset.reset": "earliest",
                },
            )
        )
        self.at_end: set[int] = set()
        try:
            metadata = self._consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
            ok = metadata is not None and metadata.error is None
            self.partitions = sorted(metadata.partitions) if ok else []
            assignment = []
            for number in self.partitions:
                tp = TopicPartition(topic, number, OFFSET_END if from_end else OFFSET_BEGINNING)
                if start and number in start:
                    tp.offset = start[number]
                if last is not None:
                    # Tansu answers ListOffsets(latest) too low when the producer batched
                    # (5 records in one batch: high 1), so this may start earlier than
                    # asked; callers trim to ``last`` themselves.
                    low, high = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)
                    tp.offset = max(low, high - last)
                assignment.append(tp)
            self._consumer.assign(assignment)
        except BaseException:
            self._consumer.close()
            raise

    def poll(self, timeout_s: float, max_records: int = 500) -> list:
        """The records that arrive within ``timeout_s`` (errors and end markers left out)."""
        records = []
        for message in self._consumer.consume(max_records, timeout=timeout_s):
            error = message.error()
            if error is None:
                records.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                self.at_end.add(message.partition())
        return records

    @property
    def caught_up(self) -> bool:
        """Every partition has been read to its end at least once."""
        return len(self.at_end) >= len(self.partitions)

    def high_watermark(self, topic: str, partition: int = 0, timeout_s: float = 5.0) -> int:
        """One past the newest offset of ``topic``/``partition`` (any topic)."""
        tp = TopicPartition(topic, partition)
        return self._consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)[1]

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_predictions(
    bootstrap: KafkaConnection | str,
    topic: str,
    *,
    follow: bool = False,
    from_beginning: bool = False,
    last: int = 10,
    timeout_s: float = 10.0,
) -> Iterator[Prediction]:
    """Predictions on ``topic``: the ``last`` newest (or all with ``from_beginning``),
    then, with ``follow``, new ones as they come until the caller stops iterating.

    Without ``follow`` it ends once every partition has been read to its end (or after
    ``timeout_s`` without reaching it, e.g. an unreachable broker).
    """
    with TopicReader(
        bootstrap,
        topic,
        last=None if from_beginning else last,
        timeout_s=timeout_s,
        group="lensflow-tail",
    ) as reader:
        if not reader.partitions:
            return  # no predictions yet
        backlog: list[Prediction] = []
        deadline = time.monotonic() + timeout_s
        while not reader.caught_up and time.monotonic() < deadline:
            backlog += filter(None, map(parse_prediction, reader.poll(0.2)))
        if not from_beginning:
            backlog = sorted(backlog, key=lambda p: p.time)[-last:] if last > 0 else []
        yield from backlog
        while follow:
            yield from filter(None, map(parse_prediction, reader.poll(0.5)))
