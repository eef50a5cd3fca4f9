"""The archiver: the predictions topic into Parquet files in the object store, once each.

A consumer of the group ``LENSFLOW_ARCHIVE_GROUP`` reads the topic from its committed
offsets and holds records in memory until ``LENSFLOW_ARCHIVE_BATCH`` of them wait, one
waited ``LENSFLOW_ARCHIVE_FLUSH_S``, its partitions are revoked, or (``follow=False``)
every assigned partition has been read to its end. Then it writes them (one Parquet file
per partition and date, a JSON-lines file for rejected records; ``store.ArchiveStore``
explains the names and the orphan rule) and only then commits the offsets after them.

One row per upload: an image event delivered twice, or a notification sent twice, within
the at-least-once window is predicted twice (two prediction events of one upload:
``records.upload_of``), and both land on one partition (the topic is keyed by the image).
The archiver keeps the first: it remembers
the uploads of each partition it archived, seeded from the partition's newest committed
files of the batch's dates and the day before, and leaves a later prediction of one out.

A failed write stops the run (``ArchiveUnwritable``) without a commit: the next run reads
the same records again and the deterministic names make its files replace any that were
written. A record that is not a prediction event goes to ``rejects/`` with its reason.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from lensflow_archive.compact import compact_closed_days
from lensflow_archive.records import (
    SCHEMA,
    UPLOAD,
    Rejected,
    record_time,
    reject_line,
    to_row,
    upload_of,
)
from lensflow_archive.store import (
    PREDICTIONS,
    REJECTS,
    ArchiveStore,
    file_key,
    folder,
    parquet_bytes,
)
from lensflow_core.kafka import client_settings
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.offsets import committed_offsets

log = logging.getLogger("lensflow.archive")

COMPACT_EVERY_S = 3600.0  # a following archiver compacts closed days this often
SESSION_S = 6.0  # the consumer's session timeout: how long a dead member keeps partitions
# Uploads remembered per partition (hashes): ~15 minutes of a partition at 100 images/s,
# longer than a redelivery takes (Knative's default backoff totals ~614 s).
REMEMBERED = 100_000
# Committed files read to seed that memory (the newest): a redelivery comes within minutes
# of the first prediction, so in one of the last files; a bound for a day of small files.
SEED_FILES = 32


class Archiver:
    """One consumer of the predictions topic writing the archive. ``run`` once per life."""

    def __init__(self, config: Config, *, store: ArchiveStore | None = None, **overrides: Any):
        self.config = config
        self.topic = config.topic_predictions
        self.store = store or ArchiveStore(s3_client(config), config.archive_bucket)
        self.group = overrides.get("group", config.archive_group)
        self.batch_max = overrides.get("batch_max", config.archive_batch)
        self.flush_s = overrides.get("flush_s", config.archive_flush_s)
        self.stats: Counter[str] = Counter()
        self.days: set[str] = set()  # dates this run wrote to (compacted once closed)
        self._buffer: dict[int, list] = {}
        self._held = 0
        self._oldest: float | None = None
        self._assigned: set[int] = set()
        self._assigned_at = 0.0
        self._all: set[int] | None = None  # the topic's partitions
        self._at_end: set[int] = set()
        self._error: BaseException | None = None
        self._consumer: Consumer | None = None
        self._uploads: dict[int, OrderedDict[int, None]] = {}  # partition -> hashes, oldest first

    def settings(self) -> dict[str, Any]:
        """The consumer's librdkafka settings."""
        extra = {
            "group.id": self.group,
            "client.id": "lensflow-archive",
            "enable.auto.commit": False,  # offsets move only after the files are stored
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # how a drain knows it has read everything
            "session.timeout.ms": int(SESSION_S * 1000),  # Tansu's join is slow with the default
            "heartbeat.interval.ms": 2000,
        }
        return client_settings(self.config.kafka, extra)

    def _make_consumer(self) -> Consumer:
        return Consumer(self.settings())

    def run(
        self,
        *,
        follow: bool = False,
        stop: threading.Event | None = None,
        join_timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Archive until caught up (``follow=False``) or until ``stop`` is set. Raises
        ``ArchiveUnwritable`` (nothing committed) or ``KafkaException``."""
        stop = stop or threading.Event()
        self._consumer = consumer = self._make_consumer()
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        started = time.monotonic()
        last_compact = started
        try:
            while not stop.is_set():
                # a batch never exceeds its size
                room = max(1, min(1000, self.batch_max - self._held))
                self._take(consumer.consume(room, timeout=0.5))
                if self._due():
                    self._flush()
                if not follow and self._done(time.monotonic() - started > join_timeout_s):
                    break
                if follow and time.monotonic() - last_compact >= COMPACT_EVERY_S:
                    self.compact()
                    last_compact = time.monotonic()
            self._flush()
        except BaseException as exc:
            self._error = exc  # leaving the group must not flush what could not be written
            raise
        finally:
            consumer.close()  # leaves the group (its revoke flushes what is held, if any)
        if self._error is not None:  # a flush on revoke failed
            raise self._error
        return self.report()

    def _take(self, messages: list) -> None:
        if self._error is not None:
            raise self._error
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add(message.partition())
                elif error.fatal():
                    raise KafkaException(error)
                else:
                    log.warning("consumer: %s", error.str())
                continue
            self._at_end.discard(message.partition())
            self._buffer.setdefault(message.partition(), []).append(message)
            self._held += 1
            if self._oldest is None:
                self._oldest = time.monotonic()

    def _due(self) -> bool:
        if self._held >= self.batch_max:
            return True
        return self._oldest is not None and time.monotonic() - self._oldest >= self.flush_s

    def _done(self, join_expired: bool) -> bool:
        """A drain ends when every assigned partition is read to its end and either it
        has them all or its assignment has held for a session timeout (a member that died
        without leaving keeps its share until then; afterwards what is not ours belongs to
        a live archiver), or when no partition was assigned in time."""
        if not self._assigned:
            return join_expired
        if not self._assigned <= self._at_end:
            return False
        settled = time.monotonic() - self._assigned_at >= SESSION_S + 2
        return settled or self._assigned >= self._partitions()

    def _partitions(self) -> set[int]:
        if self._all is None:
            topic = self._consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
            self._all = set(topic.partitions) if topic is not None and not topic.error else set()
        return self._all

    def _on_assign(self, consumer, partitions) -> None:
        self._assigned |= {tp.partition for tp in partitions}
        self._at_end -= {tp.partition for tp in partitions}
        self._assigned_at = time.monotonic()
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer, partitions) -> None:
        # Write and commit what is held before another consumer takes these partitions:
        # it starts from the commit, so nothing is archived twice.
        try:
            if self._error is None:
                self._flush()
        except BaseException as exc:  # raised again from run(
            self._error = exc
        self._buffer.clear()
        self._held, self._oldest = 0, None
        self._assigned -= {tp.partition for tp in partitions}
        for tp in partitions:  # another archiver may write them meanwhile: read them again
            self._uploads.pop(tp.partition, None)

    def _flush(self) -> None:
        if not self._buffer:
            return
        commits = []
        for partition, messages in sorted(self._buffer.items()):
            self._write(partition, messages)
            commits.append(TopicPartition(self.topic, partition, messages[-1].offset() + 1))
        self._consumer.commit(offsets=commits, asynchronous=False)
        self.stats["commits"] += 1
        self._buffer.clear()
        self._held, self._oldest = 0, None

    def _write(self, partition: int, messages: list) -> None:
        """Store one partition's held records: rows by date, rejects by date."""
        start = messages[0].offset()  # the committed offset: the orphan rule's bound
        rows: dict[str, list[dict[str, Any]]] = {}
        rejects: dict[str, list[dict[str, Any]]] = {}
        for message in messages:
            try:
                row = to_row(message)
                rows.setdefault(row["time"].date().isoformat(), []).append(row)
            except Rejected as exc:
                day = record_time(message).date().isoformat()
                rejects.setdefault(day, []).append(reject_line(message, str(exc)))
        self._write_rows(partition, rows, start)
        for day, batch in sorted(rejects.items()):
            key = file_key(REJECTS, day, self.topic, partition, *_span(batch))
            body = "".join(json.dumps(line, sort_keys=True) + "\n" for line in batch)
            self.store.replace(key, body.encode(), start)
            self.stats["rejected"] += len(batch)
            for line in batch:
                log.warning(
                    "set aside %s/%s@%s: %s",
                    line["topic"],
                    line["partition"],
                    line["offset"],
                    line["reason"],
                )

    def _write_rows(self, partition: int, rows: dict[str, list], start: int) -> None:
        kept = self._first_of_each_upload(partition, rows, start)
        for day in sorted(set(rows) - set(kept)):  # only second predictions: no file
            where = folder(PREDICTIONS, day)
            self.store.delete_orphans(where, self.topic, partition, start)
        for day, batch in sorted(kept.items()):
            key = file_key(PREDICTIONS, day, self.topic, partition, *_span(batch))
            self.store.replace(key, parquet_bytes(pa.Table.from_pylist(batch, SCHEMA)), start)
            self.days.add(day)
            self.stats["archived"] += len(batch)
            self.stats["files"] += 1

    def _first_of_each_upload(
        self, partition: int, rows: dict[str, list[dict[str, Any]]], committed: int
    ) -> dict[str, list[dict[str, Any]]]:
        """``rows`` without the predictions of uploads already archived (or earlier in
        the batch); what is kept is remembered."""
        if not rows:  # rejects only: nothing to seed the memory for yet
            return rows
        seen = self._seen(partition, set(rows), committed)
        kept: dict[str, list[dict[str, Any]]] = {}
        for day, batch in rows.items():
            for row in batch:
                upload = hash(upload_of(row))
                if upload in seen:
                    self.stats["duplicates"] += 1
                    log.info("left out %s: a second prediction of %s", row["id"], row["key"])
                    continue
                seen[upload] = None
                kept.setdefault(day, []).append(row)
        while len(seen) > REMEMBERED:
            seen.popitem(last=False)
        return kept

    def _seen(self, partition: int, days: set[str], committed: int) -> OrderedDict[int, None]:
        """The uploads archived on ``partition``: what this run wrote, and, read once per
        assignment, what its newest ``SEED_FILES`` committed files (last offset below
        ``committed``) of ``days`` and the day before each hold. Files at or past the
        commit are orphans the batch replaces, so their rows are not counted. While this
        archiver holds the partition nobody else writes it."""
        seen = self._uploads.get(partition)
        if seen is not None:
            return seen
        seen = self._uploads[partition] = OrderedDict()
        wanted = sorted({d for given in days for d in (given, _day_before(given))})
        files = [
            f
            for day in wanted
            for f in self.store.list(folder(PREDICTIONS, day))
            if (f.topic, f.partition) == (self.topic, partition) and f.last < committed
        ]
        for f in sorted(files, key=lambda f: f.last)[-SEED_FILES:]:
            table = pq.read_table(io.BytesIO(self.store.get(f.key)), columns=list(UPLOAD))
            seen.update((hash(upload_of(row)), None) for row in table.to_pylist())
        return seen

    def compact(self) -> list[dict[str, Any]]:
        """Compact the closed dates this run wrote to (and yesterday)."""
        committed = committed_offsets(self.config.kafka, self.topic, self.group)
        done = compact_closed_days(self.store, self.topic, committed, self.days)
        self.stats["compacted"] += sum(d["merged"] for d in done)
        return done

    def report(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "group": self.group,
            "bucket": self.store.bucket,
            "archived": self.stats["archived"],
            "rejected": self.stats["rejected"],
            "duplicates_left_out": self.stats["duplicates"],
            "files": self.stats["files"],
            "commits": self.stats["commits"],
            "compacted_files": self.stats["compacted"],
            "days": sorted(self.days),
            "at": datetime.now(timezone.utc).isoformat(),
        }


def _day_before(day: str) -> str:
    return (date.fromisoformat(day) - timedelta(days=1)).isoformat()


def _span(batch: list[dict[str, Any]]) -> tuple[int, int]:
    return batch[0]["offset"], batch[-1]["offset"]
