"""Dead letters as a workflow: read them, group them by reason, send their records again.

A dead letter (``lensflow_eventing.dead_letter``) is the CloudEvent a KafkaSource made of an images
record, in Kafka binary mode, plus ``knativeerrordest``/``code``/``data``. The original
record is in it: the key is the dead letter's key (also the ``key`` extension), the value
its data, and each original header is a ``kafkaheader<name>`` extension. So ``original``
rebuilds the record as MinIO wrote it, and ``replay`` produces it to the images topic
again, where the dispatcher (or the KafkaSource) takes it like any new upload.

Only records of the images topic are replayed: a dead letter whose ``source`` is not a
KafkaSource's of that topic (``...#<images topic>``, type ``dev.knative.kafka.event``) is
refused, and so is a raw record the dispatcher could not even read as a CloudEvent.

Replay is at least once, and a re-run does not replay again: after a record is acked by
the broker, a marker object ``<prefix>/<dlq topic>/<partition>/<offset>.json`` is written
(``ReplayLedger``, in the model bucket, by ``lensflow_core.s3.put_if_absent``) naming
the dead letter's event id. A crash between the produce and the marker replays that one record again next time.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cloudevents.kafka import KafkaMessage
from confluent_kafka import Producer

from lensflow_core.kafka import KafkaConnection
from lensflow_core.s3 import put_if_absent
from lensflow_eventing.contracts import KAFKA_EVENT_TYPE
from lensflow_eventing.predictions import TopicReader
from lensflow_eventing.producer import produce_and_wait

ERROR_HEADER = "lensflow-error"  # a raw record the dispatcher could not read (dispatcher.py)
HEADER_PREFIX = "kafkaheader"
MAX_REASON = 200
NETWORK = "network error (no response)"


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic, decoded."""

    partition: int
    offset: int
    dead_lettered_at: float | None  # the DLQ record's timestamp (Unix seconds)
    attributes: dict[str, str]  # the CloudEvent's attributes, knativeerror* included
    key: bytes | None
    value: bytes
    code: int | None
    reason: str
    error_data: str  # knativeerrordata decoded (at most 1024 bytes of the sink's reply)
    refusal: str | None = None  # why it cannot be replayed; None if it can
    original_headers: dict[str, bytes] = field(default_factory=dict)

    @property
    def replayable(self) -> bool:
        return self.refusal is None

    @property
    def event_id(self) -> str:
        return self.attributes.get("id", f"partition:{self.partition}/offset:{self.offset}")

    @property
    def position(self) -> tuple[int, int]:
        return self.partition, self.offset

    def original(self) -> KafkaMessage:
        """The images-topic record this dead letter was made of: key, value, headers."""
        return KafkaMessage(headers=dict(self.original_headers), key=self.key, value=self.value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "dead_lettered_at": _iso(self.dead_lettered_at),
            "event_id": self.event_id,
            "key": _text(self.key),
            "code": self.code,
            "reason": self.reason,
            "error_data": self.error_data,
            "replayable": self.replayable,
            "refusal": self.refusal,
            "attributes": self.attributes,
            "value": _text(self.value),
            "headers": {k: _text(v) for k, v in self.original_headers.items()},
        }


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _reason(code: int | None, data: str, key: str | None) -> str:
    """One line saying why: the reply's JSON ``error``, else its text; the object path
    replaced by ``<object>`` so letters of one cause group together."""
    if code is None:
        return NETWORK
    text = data.strip()
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict) and parsed.get("error"):
            text = str(parsed["error"])
    except ValueError:
        pass
    text = " ".join(text.split()) or f"HTTP {code}"
    if key:
        text = text.replace(key, "<object>")
    return text[:MAX_REASON]


def parse_dead_letter(message: Any, images_topic: str) -> DeadLetter:
    """Decode one consumed dead-letter record (a confluent-kafka ``Message``)."""
    headers = {k: (v or b"") for k, v in (message.headers() or [])}
    kind, stamp = message.timestamp()
    at = stamp / 1000 if kind and stamp and stamp > 0 else None
    key = message.key()
    value = message.value() or b""
    common = {"partition": message.partition(), "offset": message.offset(), "dead_lettered_at": at}
    if ERROR_HEADER in headers or "ce_specversion" not in {k.lower() for k in headers}:
        reason = headers.get(ERROR_HEADER, b"not a binary-mode CloudEvent").decode(errors="replace")
        return DeadLetter(
            **common,
            attributes={},
            key=key,
            value=value,
            code=None,
            reason=" ".join(reason.split())[:MAX_REASON],
            error_data="",
            refusal="not a readable CloudEvent: replaying it would fail the same way",
            original_headers={k: v for k, v in headers.items() if k != ERROR_HEADER},
        )
    attributes = {
        k[3:].lower(): v.decode("utf-8", errors="replace")
        for k, v in headers.items()
        if k.lower().startswith("ce_")
    }
    raw_code = attributes.get("knativeerrorcode")
    code = int(raw_code) if raw_code and raw_code.isdigit() else None
    try:
        data = base64.b64decode(attributes.get("knativeerrordata", ""), validate=False)
    except ValueError:
        data = b""
    data_text = data.decode("utf-8", errors="replace")
    text_key = _text(key) or attributes.get("key")
    refusal = None
    if attributes.get("type") != KAFKA_EVENT_TYPE or not attributes.get("source", "").endswith(
        f"#{images_topic}"
    ):
        refusal = (
            f"not an {images_topic}-topic record (type {attributes.get('type')!r}, "
            f"source {attributes.get('source')!r})"
        )
    original_headers = {
        name[len(HEADER_PREFIX) :]: val.encode()
        for name, val in attributes.items()
        if name.startswith(HEADER_PREFIX) and len(name) > len(HEADER_PREFIX)
    }
    if key is None and attributes.get("key") is not None:
        key = attributes["key"].encode()
    return DeadLetter(
        **common,
        attributes=attributes,
        key=key,
        value=value,
        code=code,
        reason=_reason(code, data_text, text_key),
        error_data=data_text,
        refusal=refusal,
        original_headers=original_headers,
    )


def read_dead_letters(
    bootstrap: KafkaConnection | str, topic: str, images_topic: str, timeout_s: float = 10.0
) -> list[DeadLetter]:
    """Every dead letter on ``topic`` now, oldest first per partition."""
    letters: list[DeadLetter] = []
    with TopicReader(bootstrap, topic, timeout_s=timeout_s, group="lensflow-dlq") as reader:
        deadline = time.monotonic() + timeout_s
        while reader.partitions and not reader.caught_up and time.monotonic() < deadline:
            letters += (parse_dead_letter(m, images_topic) for m in reader.poll(0.2))
    return sorted(letters, key=lambda d: d.position)


# --- choosing ----------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds of ``--since``: an ISO-8601 time (UTC unless it says), or an age such
    as ``30m``, ``2h``, ``1d``. Raises ValueError."""
    text = text.strip()
    match = _RELATIVE.match(text.lower())
    if match:
        return (now or time.time()) - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since is an ISO-8601 time or an age like 30m, 2h, 1d; not {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def select(
    letters: Iterable[DeadLetter], reason: str | None = None, since: float | None = None
) -> list[DeadLetter]:
    """Letters whose reason contains ``reason`` (case-insensitive) or whose code is it,
    dead-lettered at or after ``since``."""
    chosen = []
    for letter in letters:
        if reason is not None:
            wanted = reason.strip().lower()
            if wanted not in letter.reason.lower() and wanted != str(letter.code):
                continue
        if since is not None and (letter.dead_lettered_at or 0) < since:
            continue
        chosen.append(letter)
    return chosen


def group_by_reason(
    letters: Iterable[DeadLetter], replayed: set[tuple[int, int]] | None = None
) -> list[dict[str, Any]]:
    """One row per (code, reason): count, replayable, replayed, oldest and newest."""
    groups: dict[tuple[int | None, str], list[DeadLetter]] = {}
    for letter in letters:
        groups.setdefault((letter.code, letter.reason), []).append(letter)
    rows = []
    for (code, reason), members in groups.items():
        times = [m.dead_lettered_at for m in members if m.dead_lettered_at is not None]
        rows.append(
            {
                "code": code,
                "reason": reason,
                "count": len(members),
                "replayable": sum(m.replayable for m in members),
                "replayed": sum(m.position in (replayed or set()) for m in members),
                "oldest": _iso(min(times)) if times else None,
                "newest": _iso(max(times)) if times else None,
            }
        )
    return sorted(rows, key=lambda r: (-r["count"], str(r["code"]), r["reason"]))


# --- remembering and replaying -----------------------------------------------------------


class ReplayLedger:
    """Which dead letters were replayed: one marker object each, in ``bucket``."""

    def __init__(self, s3, bucket: str, prefix: str, dlq_topic: str):
        self.s3 = s3
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/{dlq_topic}"

    def _key(self, partition: int, offset: int) -> str:
        return f"{self.prefix}/{partition}/{offset}.json"

    def replayed(self) -> dict[tuple[int, int], str]:
        """(partition, offset) -> the replayed dead letter's event id."""
        found: dict[tuple[int, int], str] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            for item in page.get("Contents", []):
                parts = item["Key"][len(self.prefix) + 1 : -len(".json")].split("/")
                if len(parts) == 2 and all(p.isdigit() for p in parts):
                    body = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                    found[(int(parts[0]), int(parts[1]))] = json.loads(body).get("event_id", "")
        return found

    def mark(self, letter: DeadLetter, images_topic: str) -> None:
        body = {
            "event_id": letter.event_id,
            "key": _text(letter.key),
            "reason": letter.reason,
            "replayed_to": images_topic,
            "replayed_at": _iso(time.time()),
        }
        # None when a concurrent run marked it already: fine
        put_if_absent(
            self.s3,
            self.bucket,
            self._key(letter.partition, letter.offset),
            json.dumps(body).encode(),
            "application/json",
        )


def already_replayed(letter: DeadLetter, ledger: dict[tuple[int, int], str]) -> bool:
    """Marked, and the marker names this letter (a recreated topic reuses offsets)."""
    return ledger.get(letter.position) == letter.event_id


@dataclass
class ReplayOutcome:
    replayed: list[DeadLetter] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)  # (letter, why)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "replayed": [
                {
                    "partition": d.partition,
                    "offset": d.offset,
                    "key": _text(d.key),
                    "reason": d.reason,
                }
                for d in self.replayed
            ],
            "skipped": [
                {"partition": d.partition, "offset": d.offset, "key": _text(d.key), "why": why}
                for d, why in self.skipped
            ],
        }


def replay(
    letters: Iterable[DeadLetter],
    *,
    producer: Producer | None,
    images_topic: str,
    ledger: ReplayLedger,
    dry_run: bool = False,
    timeout_s: float = 15.0,
) -> ReplayOutcome:
    """Produce each letter's original record to ``images_topic`` (acked), then mark it.
    Letters already marked, or not images-topic records, are skipped with the reason."""
    outcome = ReplayOutcome(dry_run=dry_run)
    done = ledger.replayed()
    for letter in letters:
        if not letter.replayable:
            outcome.skipped.append((letter, f"refused: {letter.refusal}"))
        elif already_replayed(letter, done):
            outcome.skipped.append((letter, "replayed already"))
        elif dry_run:
            outcome.replayed.append(letter)
        else:
            assert producer is not None
            produce_and_wait(producer, images_topic, letter.original(), timeout_s)
            ledger.mark(letter, images_topic)
            outcome.replayed.append(letter)
    return outcome
