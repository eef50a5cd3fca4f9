"""Reading the predictions topic: binary-mode Kafka CloudEvents, one per image.

``TopicReader`` is lensflow's one way to read a topic from outside a consumer group: used
by ``lensflow predictions tail`` (``read_predictions``), ``PredictionFeed`` and the tests.
``PredictionFeed`` is the one background reader of the predictions topic (the demo, the
dashboard, the end-to-end benchmark): each prediction handed to a callback as it arrives.
``parse_prediction`` turns a record into a ``Prediction``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloudevents.abstract import AnyCloudEvent
from cloudevents.kafka import KafkaMessage, from_binary, from_structured
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from lensflow_core.kafka import KafkaConnection, client_settings
from lensflow_eventing.contracts import is_cloudevent_record

log = logging.getLogger(__name__)


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


def record_event(message) -> AnyCloudEvent | None:
    """The CloudEvent in a consumed record (binary or structured mode), or None if the
    record is not one. Raises ``cloudevents`` errors (or ValueError) for a malformed one."""
    headers = {k: (v or b"") for k, v in (message.headers() or [])}
    if not is_cloudevent_record(headers):
        return None
    kafka_message = KafkaMessage(headers=headers, key=message.key(), value=message.value() or b"")
    if "ce_specversion" in {k.lower() for k in headers}:
        return from_binary(kafka_message, data_unmarshaller=_json_or_raw)
    return from_structured(kafka_message)


def parse_prediction(message) -> Prediction | None:
    """The prediction in a consumed record, or None if the record is not a CloudEvent."""
    event = record_event(message)
    if event is None:
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
                tp = TopicPartition(topic, number, OFFSET_BEGINNING)
                if start and number in start:
                    tp.offset = start[number]
                elif from_end:
                    # the end now, as a number: OFFSET_END would be resolved only at the
                    # first fetch, missing what arrives between placing and polling
                    tp.offset = self._consumer.get_watermark_offsets(
                        tp, timeout=timeout_s, cached=False
                    )[1]
                elif last is not None:
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


class PredictionFeed:
    """The predictions topic, read in a daemon thread: ``on_prediction(prediction,
    produced_ms)`` for each prediction as it arrives (``produced_ms``: the record's
    timestamp), on the feed's thread.

    Starts where ``TopicReader`` is told (``from_end``, ``last``, else the beginning). A
    topic that does not exist yet, or a broker that is away, is looked at again every
    ``retry_s``. ``on_open(reader)`` runs once the reader is placed, before ``start``
    returns; ``on_poll(reader)`` after every poll (to look at other topics' ends).
    A record that is not a prediction is skipped.
    """

    def __init__(
        self,
        bootstrap: KafkaConnection | str,
        topic: str,
        on_prediction: Callable[[Prediction, int], None],
        *,
        from_end: bool = False,
        last: int | None = None,
        group: str = "lensflow-feed",
        on_open: Callable[[TopicReader], None] | None = None,
        on_poll: Callable[[TopicReader], None] | None = None,
        poll_s: float = 0.2,
        retry_s: float = 2.0,
    ):
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self.on_prediction, self.on_open, self.on_poll = on_prediction, on_open, on_poll
        self.from_end, self.last = from_end, last
        self.poll_s, self.retry_s = poll_s, retry_s
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{group}-feed", daemon=True)

    def start(self, open_timeout_s: float = 15.0) -> PredictionFeed:
        """Start reading; returns once the reader is placed (or after ``open_timeout_s``)."""
        self._thread.start()
        self._opened.wait(open_timeout_s)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._read()
                except Exception as exc:  # the broker may come and go: look again
                    log.warning("reading %s: %s", self.topic, exc)
                self._stop.wait(self.retry_s)
        finally:
            self._opened.set()

    def _read(self) -> None:
        """Read until stopped, or until it turns out the topic does not exist yet."""
        with TopicReader(
            self.bootstrap, self.topic, from_end=self.from_end, last=self.last, group=self.group
        ) as reader:
            if self.on_open is not None:
                self.on_open(reader)
            self._opened.set()
            while not self._stop.is_set():
                for message in reader.poll(self.poll_s, max_records=200):
                    try:
                        prediction = parse_prediction(message)
                    except Exception:  # not ours to judge: skip what we cannot read
                        continue
                    if prediction is not None:
                        self.on_prediction(prediction, message.timestamp()[1])
                if self.on_poll is not None:
                    self.on_poll(reader)
                if not reader.partitions:
                    return  # the topic does not exist yet
