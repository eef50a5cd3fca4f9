"""The archive's files in the object store: names, writes, and which files are current.

Layout (in ``LENSFLOW_ARCHIVE_BUCKET``), Hive-partitioned by the prediction's UTC date::

    predictions/date=YYYY-MM-DD/<topic>+<partition>+<first>-<last>.parquet
    rejects/date=YYYY-MM-DD/<topic>+<partition>+<first>-<last>.jsonl

``<first>`` and ``<last>`` are the Kafka offsets of the file's first and last record
(zero-padded): the name says exactly which records the file holds, so a replay of the
same records writes the same name (Kafka Connect's S3 sink names files the same way).

Exactly once rests on one rule. Offsets are committed only after every file of a batch
is stored, and a batch of partition ``p`` always starts at ``p``'s committed offset ``B``.
So a file of ``p`` whose first offset is ``>= B`` was written by a run that died before
committing it: an orphan, whose records are being read again. Before a batch is written,
``replace`` deletes such orphans in each folder it writes to, then writes the batch's
file. A replay with other batch boundaries (another size, a timed flush cut elsewhere)
therefore never leaves two files holding one record. Files whose last offset is below
the committed offset are never touched except by compaction.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

PREDICTIONS = "predictions"
REJECTS = "rejects"
PAD = 19  # digits of the largest int64 offset: names sort by offset


class ArchiveUnwritable(RuntimeError):
    """The archive bucket cannot be written (or read back): stop, commit nothing."""


@dataclass(frozen=True, order=True)
class ArchiveFile:
    key: str
    topic: str
    partition: int
    first: int
    last: int
    size: int = 0

    def contains(self, other: ArchiveFile) -> bool:
        """This file's offset range covers ``other``'s (same topic and partition)."""
        return (
            self is not other
            and (self.topic, self.partition) == (other.topic, other.partition)
            and self.first <= other.first
            and other.last <= self.last
            and (self.first, self.last) != (other.first, other.last)
        )


def folder(prefix: str, day: str) -> str:
    return f"{prefix}/date={day}/"


def file_key(prefix: str, day: str, topic: str, partition: int, first: int, last: int) -> str:
    ext = "parquet" if prefix == PREDICTIONS else "jsonl"
    return f"{folder(prefix, day)}{topic}+{partition}+{first:0{PAD}d}-{last:0{PAD}d}.{ext}"


def parse_key(key: str, size: int = 0) -> ArchiveFile | None:
    """The file a key names, or None for anything else in the bucket."""
    name = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    try:
        topic, partition, offsets = name.rsplit("+", 2)  # topic names have no '+'
        first, last = offsets.split("-")
        return ArchiveFile(key, topic, int(partition), int(first), int(last), size)
    except ValueError:
        return None


def current(files: Iterable[ArchiveFile]) -> list[ArchiveFile]:
    """The files a reader should see: leaving out any whose range another file of the
    same folder covers (the inputs of a compaction that stopped before deleting them)."""
    files = list(files)
    by_folder: dict[str, list[ArchiveFile]] = {}
    for f in files:
        by_folder.setdefault(f.key.rsplit("/", 1)[0], []).append(f)
    return [f for f in files if not any(g.contains(f) for g in by_folder[f.key.rsplit("/", 1)[0]])]


class ArchiveStore:
    """Reads and writes the archive's objects with a boto3 client."""

    def __init__(self, s3, bucket: str):
        self.s3 = s3
        self.bucket = bucket

    def _fail(self, action: str, exc: Exception) -> ArchiveUnwritable:
        reason = exc.response["Error"].get("Code", "") if isinstance(exc, ClientError) else ""
        text = " ".join(str(exc).split())
        return ArchiveUnwritable(
            f"archive bucket {self.bucket!r} cannot be {action} "
            f"(LENSFLOW_ARCHIVE_BUCKET){': ' + reason if reason else ''}: {text}"
        )

    def list(self, prefix: str) -> list[ArchiveFile]:
        """Every archive file under ``prefix`` (a folder or a whole tree)."""
        found = []
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    parsed = parse_key(item["Key"], item.get("Size", 0))
                    if parsed is not None:
                        found.append(parsed)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("listed", exc) from None
        return sorted(found)

    def days(self, prefix: str = PREDICTIONS) -> list[str]:
        """The dates that have a folder under ``prefix``, oldest first."""
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{prefix}/date=", Delimiter="/"
            )
            names = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("listed", exc) from None
        return sorted(n.rstrip("/").rsplit("=", 1)[-1] for n in names)

    def put(self, key: str, body: bytes) -> None:
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("written", exc) from None

    def get(self, key: str) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("read", exc) from None

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 at most
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                answer = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk})
            except (ClientError, BotoCoreError) as exc:
                raise self._fail("written", exc) from None
            if answer.get("Errors"):
                error = answer["Errors"][0]
                raise ArchiveUnwritable(
                    f"archive bucket {self.bucket!r} refused to delete {error.get('Key')}: "
                    f"{error.get('Code')} {error.get('Message', '')}".strip()
                )

    def replace(self, key: str, body: bytes, batch_start: int) -> None:
        """Write ``key``, first deleting the orphans in its folder: files of its topic
        and partition starting at or after ``batch_start`` (the committed offset)."""
        mine = parse_key(key)
        # before the write: a reader may miss them, never double them
        folder_of = key.rsplit("/", 1)[0] + "/"
        self.delete_orphans(folder_of, mine.topic, mine.partition, batch_start, keep=key)
        self.put(key, body)

    def delete_orphans(
        self, where: str, topic: str, partition: int, batch_start: int, keep: str = ""
    ) -> None:
        """Delete the files in folder ``where`` of ``topic`` and ``partition`` that start at
        or after ``batch_start``, except ``keep`` (about to be written again)."""
        orphans = [
            f.key
            for f in self.list(where)
            if (f.topic, f.partition) == (topic, partition)
            and f.first >= batch_start
            and f.key != keep
        ]
        if orphans:
            self.delete(orphans)


def parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
