"""The labelling queue: uncertain predictions waiting for a person.

Everything lives in the train bucket, next to the ImageFolder splits::

    to-label/<model version>/<sha256("<bucket>/<key>")[:32]>.json   one uncertain image
    decisions/<sha256("<bucket>/<key>")[:32]>/<n>.json               who labelled it, when
    labeled/<class>/<name>                                          what rounds train on
    holdout/<class>/<name>                                          what rounds are judged on

A queue record is written with If-None-Match ``*``: the key is a function of the image
path and the model version, so a re-delivered event (or another replica predicting the
same image) finds the record there and changes nothing. The queue is bounded per model
version: ``LabelQueue`` keeps in memory the records it knows of per version (the last
LIST's and its own writes since), seeded by one LIST of the version's folder on first use
and refreshed by another LIST every ``limit // 8`` records it writes and every 30 s
(others write, people label). Between two LISTs a replica only sees its own writes, so
with R replicas the queue can overshoot the limit by about R x limit / 8 (more only if
replicas write over a limit/8 each within the same 30 s). An offer that this record
settles (a full queue, an image already queued) costs no request: ``known``.

``lensflow_model_store.label_images`` turns queued images into labels and takes them off the queue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from lensflow_model_store.errors import ConflictError, ModelStoreError, NotFoundError
from lensflow_model_store.layout import (
    QUEUE,
    version_number,
)
from lensflow_model_store.objects import Objects

log = logging.getLogger(__name__)

TOP_K = 3


def top1_and_margin(predictions: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The best score and how far it is ahead of the second (scores sorted best first)."""
    scores = [float(p["score"]) for p in predictions]
    top1 = scores[0] if scores else 0.0
    return top1, top1 - (scores[1] if len(scores) > 1 else 0.0)


def is_uncertain(predictions: Sequence[dict[str, Any]], min_top1: float, min_margin: float) -> bool:
    """Whether a prediction is worth a person's look: top-1 or its margin below a setting."""
    top1, margin = top1_and_margin(predictions)
    return top1 < min_top1 or margin < min_margin


def image_id(bucket: str, key: str) -> str:
    return hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:32]


def record_key(version: str, bucket: str, key: str) -> str:
    return f"{QUEUE}/{version}/{image_id(bucket, key)}.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class QueueEntry:
    """One queued image: where it is, which model was unsure, and how unsure."""

    bucket: str
    key: str
    etag: str | None
    model: dict[str, str]
    top: list[dict[str, Any]]
    top1: float
    margin: float
    recorded_at: str
    record: str = ""  # the queue object's own key

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"

    def to_json(self) -> dict[str, Any]:
        # shallow: asdict's deep copy cost the predict replica ~0.03 ms per queued image
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def body(self) -> bytes:
        """What its queue record holds (everything but the record's own key)."""
        return json.dumps({name: getattr(self, name) for name in _BODY}).encode()

    @classmethod
    def from_json(cls, value: dict[str, Any], record: str) -> QueueEntry:
        return cls(
            bucket=str(value["bucket"]),
            key=str(value["key"]),
            etag=value.get("etag"),
            model=dict(value.get("model") or {}),
            top=list(value.get("top") or []),
            top1=float(value["top1"]),
            margin=float(value["margin"]),
            recorded_at=str(value.get("recorded_at", "")),
            record=record,
        )


_BODY = tuple(f.name for f in fields(QueueEntry) if f.name != "record")


# One offer: (bucket, key, etag, model, predictions), as ``LabelQueue.offer`` takes them.
Offer = tuple[str, str, "str | None", dict[str, str], Sequence[dict[str, Any]]]


def _entry(bucket: str, key: str, etag, model: dict[str, str], predictions) -> QueueEntry:
    """The queue entry of an uncertain prediction, recorded now."""
    top1, margin = top1_and_margin(predictions)
    return QueueEntry(
        bucket=bucket,
        key=key,
        etag=(etag or "").strip('"') or None,
        model=model,  # serialised right away: no copies
        top=list(predictions[:TOP_K]),
        top1=round(top1, 6),
        margin=round(margin, 6),
        recorded_at=_now(),
    )


@dataclass
class _Known:
    """What a replica knows of one version's queue: the last LIST's records and its own since."""

    records: set[str]
    written: int = 0  # records this replica wrote since the LIST
    listed_at: float = field(default_factory=time.monotonic)


class LabelQueue:
    """The ``to-label/`` queue in ``bucket``, at most about ``limit`` images per version.

    ``objects``: what reads and writes the bucket (``put`` with ``if_absent``, raising
    ``ConflictError`` when the record exists; ``list_keys``); by default boto3's
    ``Objects``. The predict function passes its libcurl one.
    """

    RELIST_S = 30.0  # a count older than this is listed again (others write, people label)
    VERSIONS = 4  # versions remembered: a replica serves one, and the one before for a while

    def __init__(self, s3, bucket: str, limit: int, objects=None):
        self.objects = objects or Objects(s3, bucket)
        self.bucket = bucket
        self.limit = max(0, int(limit))
        self.relist_every = max(1, self.limit // 8)
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()

    # --- writing (the predict function) -------------------------------------------------

    def known(self, version: str, bucket: str, key: str) -> str | None:
        """``duplicate`` or ``full`` when what this replica knows settles an offer without
        a request (and its knowledge is not due for a LIST); otherwise None."""
        return self._settled(version, record_key(version, bucket, key))

    def _settled(self, version: str, record: str, pending: int = 0) -> str | None:
        """``known``, with ``pending`` more records of ``version`` about to be written."""
        with self._lock:
            known = self._known.get(version)
            if known is None or self._stale(known):
                return None
            if record in known.records:
                return "duplicate"
            return "full" if len(known.records) + pending >= self.limit else None

    def offer(
        self,
        bucket: str,
        key: str,
        etag: str | None,
        model: dict[str, str],
        predictions: Sequence[dict[str, Any]],
    ) -> str:
        """Record an uncertain image once: ``recorded``, ``duplicate`` (already queued for
        this version) or ``full``. Raises ``ModelStoreError`` (or ``OSError``, from the
        libcurl ``objects``) when S3 fails."""
        outcome = self.offer_many([(bucket, key, etag, model, predictions)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def offer_many(self, offers: Sequence[Offer]) -> list[str | Exception]:
        """``offer`` for each (bucket, key, etag, model, predictions), the new records
        written as one batch (``objects.put_many``): each outcome, or the error ``offer``
        would raise."""
        outcomes: list[str | Exception] = [""] * len(offers)
        writes: list[tuple[int, str, str]] = []  # (offer, version, record)
        bodies: list[tuple[str, bytes]] = []
        for i, (bucket, key, etag, model, predictions) in enumerate(offers):
            version, record = model["version"], record_key(model["version"], bucket, key)
            try:
                settled = self._settled_in(writes, version, record)
            except (ModelStoreError, OSError) as exc:  # the version's LIST failed
                outcomes[i] = exc
                continue
            if settled is not None:
                outcomes[i] = settled
                continue
            writes.append((i, version, record))
            bodies.append((record, _entry(bucket, key, etag, model, predictions).body()))
        if not bodies:
            return outcomes
        written = self.objects.put_many(bodies, content_type="application/json", if_absent=True)
        for (i, version, record), answer in zip(writes, written, strict=True):
            if isinstance(answer, ConflictError):  # another replica wrote it first
                outcomes[i] = "duplicate"
                self._remember(version, record, written=False)
            elif isinstance(answer, Exception):
                outcomes[i] = answer
            else:
                outcomes[i] = "recorded"
                self._remember(version, record, written=True)
        return outcomes

    def _settled_in(self, writes: list[tuple[int, str, str]], version: str, record: str):
        """``_settled`` for one offer of a batch, counting the batch's ``writes`` so far
        (after a LIST of ``version``, if due)."""
        batch = [r for _, v, r in writes if v == version]
        if record in batch:
            return "duplicate"
        self._refresh(version)
        return self._settled(version, record, len(batch))

    def _stale(self, known: _Known) -> bool:
        return (
            known.written >= self.relist_every or time.monotonic() - known.listed_at > self.RELIST_S
        )

    def _refresh(self, version: str) -> None:
        """One LIST of ``version``'s records when this replica's knowledge is due for one."""
        with self._lock:
            known = self._known.get(version)
            if known is not None and not self._stale(known):
                return
        records = set(self.objects.list_keys(f"{QUEUE}/{version}/"))
        with self._lock:
            self._known.pop(version, None)
            self._known[version] = _Known(records)  # the newest last
            while len(self._known) > self.VERSIONS:
                self._known.pop(next(iter(self._known)))

    def _remember(self, version: str, record: str, written: bool) -> None:
        with self._lock:
            known = self._known.get(version)
            if known is not None:
                known.records.add(record)
                known.written += written

    def size(self, version: str) -> int:
        """Images queued by ``version`` (one LIST)."""
        return len(self.objects.list_keys(f"{QUEUE}/{version}/"))

    # --- reading and removing (the operator) --------------------------------------------

    def count(self) -> int:
        """Records in the queue, every model version's (one LIST, no reads)."""
        return sum(k.endswith(".json") for k in self.objects.list_keys(f"{QUEUE}/"))

    def entries(self, paths: Iterable[str] | None = None) -> list[QueueEntry]:
        """Every record in the queue (one per image and model version); with ``paths``
        (``<bucket>/<key>``), only those images' records (one LIST, and GETs of theirs)."""
        wanted = None if paths is None else {f"{image_id(*p.split('/', 1))}.json" for p in paths}
        out = []
        for record in self.objects.list_keys(f"{QUEUE}/"):
            if not record.endswith(".json"):
                continue
            if wanted is not None and posixpath.basename(record) not in wanted:
                continue
            try:
                body, _ = self.objects.get(record)  # type: ignore[misc]
                out.append(QueueEntry.from_json(json.loads(body), record))
            except NotFoundError:
                continue  # labelled (removed) while we listed
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring unreadable queue record %s: %s", record, exc)
        return out

    def pending(self) -> list[QueueEntry]:
        """One entry per queued image (the newest model version's), most uncertain first:
        smallest margin between the top two classes, then lowest top-1 score."""
        latest: dict[str, QueueEntry] = {}
        for entry in self.entries():
            seen = latest.get(entry.path)
            if seen is None or _version_order(entry) > _version_order(seen):
                latest[entry.path] = entry
        return sorted(latest.values(), key=lambda e: (e.margin, e.top1, e.path))

    def restore(self, entry: QueueEntry) -> bool:
        """Put a record taken off the queue back (an undone label); False if it is there."""
        try:
            self.objects.put(
                entry.record, entry.body(), content_type="application/json", if_absent=True
            )
        except ConflictError:
            return False
        return True

    def remove(self, bucket: str, key: str, entries: Iterable[QueueEntry] | None = None) -> int:
        """Take an image off the queue (every model version's record); how many went."""
        wanted = image_id(bucket, key)
        records = [e.record for e in (self.entries() if entries is None else entries)]
        gone = [r for r in records if posixpath.basename(r) == f"{wanted}.json"]
        for record in gone:
            self.objects.delete(record)
        return len(gone)


def _version_order(entry: QueueEntry) -> tuple[int, str]:
    return version_number(entry.model.get("version", "")) or 0, entry.recorded_at
