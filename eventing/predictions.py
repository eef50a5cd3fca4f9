"""Reading the predictions topic: binary-mode Kafka CloudEvents, one per image.

Used by ``lensflow predictions tail``. It reads without a consumer group (``assign``, no
commits), so tailing never moves anyone's offsets and any number of people can tail.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloudevents.kafka import KafkaMessage, from_binary, from_structured
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from lensflow.config import Config


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
    lowered = {k.lower(): v for k, v in headers.items()}
    kafka_message = KafkaMessage(headers=headers, key=message.key(), value=message.value() or b"")
    if "ce_specversion" in lowered:
        event = from_binary(kafka_message, data_unmarshaller=_json_or_raw)
    elif lowered.get("content-type", b"").startswith(b"application/cloudevents"):
        event = from_structured(kafka_message)
    else:
        return None
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


def read_predictions(
    config: Config,
    *,
    follow: bool = False,
    from_beginning: bool = False,
    last: int = 10,
    timeout_s: float = 10.0,
) -> Iterator[Prediction]:
    """Predictions on the topic: the ``last`` newest (or all with ``from_beginning``),
    then, with ``follow``, new ones as they come until the caller stops iterating.

    Without ``follow`` it ends once every partition has been read to its end (or after
    ``timeout_s`` without reaching it, e.g. an unreachable broker).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": config.kafka_bootstrap,
            "group.id": f"lensflow-tail-{uuid.uuid4().hex[:8]}",  # required, never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        topic = config.topic_predictions
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return  # no predictions yet
        assignment = []
        for number in sorted(metadata.partitions):
            tp = TopicPartition(topic, number, OFFSET_BEGINNING)
            if not from_beginning:
                # Tansu answers ListOffsets(latest) too low when the producer batched
                # (5 records in one batch: high 1), so this may start earlier than needed;
                # the backlog is trimmed to ``last`` below either way.
                low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
                tp.offset = max(low, high - last)
            assignment.append(tp)
        consumer.assign(assignment)

        backlog: list[Prediction] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(assignment):  # catching up
            message = consumer.poll(0.2)
            if message is None:
                if time.monotonic() > deadline:
                    break
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                continue
            prediction = parse_prediction(message)
            if prediction is not None:
                backlog.append(prediction)
        if not from_beginning:
            backlog = sorted(backlog, key=lambda p: p.time)[-last:] if last > 0 else []
        yield from backlog
        while follow:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            prediction = parse_prediction(message)
            if prediction is not None:
                yield prediction
    finally:
        consumer.close()
