"""Compaction: a date's small Parquet files of one partition become one file.

When: a following archiver compacts every hour, and a draining run (the Knative Job) at
its end, the closed dates (before today, UTC) it wrote to, and yesterday;
``lensflow archive compact`` does any date on demand (today's too).

Only files whose last offset is below the group's committed offset are merged: those
are final (``store`` explains why a file at or after the commit may still be replaced).
Of the predictions of one upload (an image event delivered twice) the merged file keeps
the first. The merged file is named by its first and last offsets, so it covers the
range of every input; it is written first, then the inputs are deleted. A compaction
stopped between the two leaves inputs inside the merged file's range: readers skip such
covered files (``store.current``) and the next compaction deletes them, so no row is
seen twice.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lensflow_archive.records import SCHEMA, UPLOAD, upload_of
from lensflow_archive.store import (
    PREDICTIONS,
    ArchiveFile,
    ArchiveStore,
    current,
    file_key,
    folder,
    parquet_bytes,
)


def compact_day(
    store: ArchiveStore, day: str, topic: str, committed: dict[int, int]
) -> dict[str, Any]:
    """Merge ``day``'s final files of ``topic``, one file per partition."""
    files = [f for f in store.list(folder(PREDICTIONS, day)) if f.topic == topic]
    live = current(files)
    covered = [f.key for f in files if f not in live]
    if covered:
        store.delete(covered)  # a stopped compaction's inputs
    merged = 0
    for partition in sorted({f.partition for f in live}):
        final = [
            f for f in live if f.partition == partition and f.last < committed.get(partition, 0)
        ]
        if len(final) >= 2:
            _merge(store, day, topic, partition, final)
            merged += len(final)
    return {"day": day, "merged": merged, "covered_deleted": len(covered)}


def _merge(store: ArchiveStore, day: str, topic: str, partition: int, files: list[ArchiveFile]):
    tables = [pq.read_table(io.BytesIO(store.get(f.key)), schema=SCHEMA) for f in files]
    table = pa.concat_tables(tables).sort_by("offset")
    if table.num_rows != len(set(table.column("offset").to_pylist())):
        raise RuntimeError(f"{day} partition {partition}: files overlap; not compacted")
    table = first_of_each_upload(table)
    files = sorted(files, key=lambda f: f.first)
    key = file_key(PREDICTIONS, day, topic, partition, files[0].first, files[-1].last)
    store.put(key, parquet_bytes(table))
    store.delete([f.key for f in files if f.key != key])


def first_of_each_upload(table: pa.Table) -> pa.Table:
    """``table`` (sorted by offset) keeping the first prediction of each upload (files
    written before the archiver left second predictions out may hold both)."""
    first: dict[tuple, int] = {}
    for i, row in enumerate(table.select(list(UPLOAD)).to_pylist()):
        first.setdefault(upload_of(row), i)
    if len(first) == table.num_rows:
        return table
    return table.take(sorted(first.values()))


def closed_days(days: Iterable[str], today: date | None = None) -> list[str]:
    """``days`` before today (UTC), and yesterday."""
    today = today or datetime.now(timezone.utc).date()
    yesterday = (today - timedelta(days=1)).isoformat()
    return sorted({d for d in days if d < today.isoformat()} | {yesterday})


def compact_closed_days(
    store: ArchiveStore, topic: str, committed: dict[int, int], days: Iterable[str]
) -> list[dict[str, Any]]:
    present = set(store.days())
    return [
        compact_day(store, day, topic, committed) for day in closed_days(days) if day in present
    ]
