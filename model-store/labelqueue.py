"""The labelling queue: uncertain predictions waiting for a person, and labelling them.

Everything lives in the train bucket, next to the ImageFolder splits::

    to-label/<model version>/<sha256("<bucket>/<key>")[:32]>.json   one uncertain image
    labeled/<class>/<name>                                          what rounds train on
    holdout/<class>/<name>                                          what rounds are judged on

A queue record is written with If-None-Match ``*``: the key is a function of the image
path and the model version, so a re-delivered event (or another replica predicting the
same image) finds the record there and changes nothing. The queue is bounded per model
version: ``LabelQueue`` keeps a per-replica count, seeded by one LIST of the version's
folder on first use and refreshed by another LIST every ``limit // 8`` records it writes
and every 30 s (others write, people label). Between two LISTs a replica only sees its own
writes, so with R replicas the queue can overshoot the limit by about R x limit / 8 (more
only if replicas write over a limit/8 each within the same 30 s).

``label`` copies images server-side into ``labeled/<class>/`` (or ``holdout/<class>/``),
keeping their names, and takes them off the queue; it validates every image first and
refuses the whole request, writing nothing, when any one is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from model_store.errors import ConflictError, NotFoundError
from model_store.layout import version_number
from model_store.objects import Objects, translate

log = logging.getLogger(__name__)

QUEUE = "to-label"
LABELED = "labeled"
HOLDOUT = "holdout"
SPLITS = (LABELED, HOLDOUT)
TRAINING_PREFIXES = (f"{LABELED}/", f"{HOLDOUT}/", f"{QUEUE}/")
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
        return asdict(self)

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


@dataclass
class _Count:
    listed: int  # records the last LIST found
    written: int = 0  # records this replica wrote since
    listed_at: float = field(default_factory=time.monotonic)


class LabelQueue:
    """The ``to-label/`` queue in ``bucket``, at most about ``limit`` images per version."""

    RELIST_S = 30.0  # a count older than this is listed again (others write, people label)

    def __init__(self, s3, bucket: str, limit: int):
        self.objects = Objects(s3, bucket)
        self.bucket = bucket
        self.limit = max(0, int(limit))
        self.relist_every = max(1, self.limit // 8)
        self._counts: dict[str, _Count] = {}
        self._lock = threading.Lock()

    # --- writing (the predict function) -------------------------------------------------

    def offer(
        self,
        bucket: str,
        key: str,
        etag: str | None,
        model: dict[str, str],
        predictions: Sequence[dict[str, Any]],
    ) -> str:
        """Record an uncertain image once: ``recorded``, ``duplicate`` (already queued for
        this version) or ``full``. Raises ``ModelStoreError`` when S3 fails."""
        version = model["version"]
        if not self._has_room(version):
            return "full"
        top1, margin = top1_and_margin(predictions)
        entry = QueueEntry(
            bucket=bucket,
            key=key,
            etag=(etag or "").strip('"') or None,
            model=dict(model),
            top=[dict(p) for p in predictions[:TOP_K]],
            top1=round(top1, 6),
            margin=round(margin, 6),
            recorded_at=_now(),
        )
        body = json.dumps({k: v for k, v in entry.to_json().items() if k != "record"}).encode()
        try:
            self.objects.put(
                record_key(version, bucket, key),
                body,
                content_type="application/json",
                if_absent=True,
            )
        except ConflictError:
            return "duplicate"
        with self._lock:
            self._counts[version].written += 1
        return "recorded"

    def _has_room(self, version: str) -> bool:
        with self._lock:
            count = self._counts.get(version)
            stale = (
                count is None
                or count.written >= self.relist_every
                or time.monotonic() - count.listed_at > self.RELIST_S
            )
        if stale:
            listed = self.size(version)
            with self._lock:
                self._counts[version] = _Count(listed)
        with self._lock:
            count = self._counts[version]
            return count.listed + count.written < self.limit

    def size(self, version: str) -> int:
        """Images queued by ``version`` (one LIST)."""
        return len(self.objects.list_keys(f"{QUEUE}/{version}/"))

    # --- reading and removing (the operator) --------------------------------------------

    def count(self) -> int:
        """Records in the queue, every model version's (one LIST, no reads)."""
        return sum(k.endswith(".json") for k in self.objects.list_keys(f"{QUEUE}/"))

    def entries(self) -> list[QueueEntry]:
        """Every record in the queue (one per image and model version)."""
        out = []
        for record in self.objects.list_keys(f"{QUEUE}/"):
            if not record.endswith(".json"):
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

    def remove(self, bucket: str, key: str, entries: Iterable[QueueEntry] | None = None) -> int:
        """Take an image off the queue (every model version's record); how many went."""
        wanted = image_id(bucket, key)
        records = [e.record for e in (self.entries() if entries is None else entries)]
        gone = [r for r in records if posixpath.basename(r) == f"{wanted}.json"]
        for record in gone:
            _delete(self.objects, record)
        return len(gone)


def _version_order(entry: QueueEntry) -> tuple[int, str]:
    return version_number(entry.model.get("version", "")) or 0, entry.recorded_at


def _delete(objects: Objects, key: str) -> None:
    try:
        objects.s3.delete_object(Bucket=objects.bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"delete s3://{objects.bucket}/{key}") from None


# --- labelling ---------------------------------------------------------------------------


class LabelRefused(ValueError):
    """A labelling request that cannot be carried out; nothing was written."""


@dataclass
class Labelled:
    """One image as labelling copied it."""

    source: str  # <bucket>/<key>
    etag: str
    target: str  # <split>/<class>/<name> in the train bucket
    replaced: list[str] = field(default_factory=list)  # the same image under another class
    unchanged: bool = False  # it was there already
    dequeued: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_image_path(path: str) -> tuple[str, str]:
    """``<bucket>/<key>`` or ``s3://<bucket>/<key>`` as (bucket, key)."""
    text = path[len("s3://") :] if path.startswith("s3://") else path
    bucket, _, key = text.partition("/")
    if not bucket or not key:
        raise LabelRefused(f"{path!r} is not <bucket>/<key>")
    return bucket, key


def check_class_name(cls: str, known: Sequence[str] | None) -> None:
    if not cls or "/" in cls or cls in (".", "..") or cls != cls.strip():
        raise LabelRefused(f"{cls!r} is not a class name")
    if known is not None and cls not in known:
        raise LabelRefused(
            f"unknown class {cls!r}: the current model knows {', '.join(known) or 'no class'}"
        )


def label(
    s3,
    *,
    train_bucket: str,
    image_buckets: Sequence[str],
    known_labels: Sequence[str] | None,
    cls: str,
    paths: Sequence[str],
    split: str = LABELED,
    by: str = "lensflow",
    queue: LabelQueue | None = None,
) -> list[Labelled]:
    """Copy the images ``paths`` (``<bucket>/<key>``) to ``<split>/<cls>/<name>`` in the
    train bucket and take them off the queue.

    Refused, with nothing written, when: the class is not one of ``known_labels`` (None:
    no model yet, any well-formed name); a path is outside ``image_buckets``, names a
    training object (``labeled/``, ``holdout/``, ``to-label/``), or does not exist; two
    paths share a name; a different image already has the target name; or an image is
    already in the other split (training data and holdout never share an image).
    The same image under another class of the same split is a relabel: it moves.
    """
    if split not in SPLITS:
        raise LabelRefused(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    check_class_name(cls, known_labels)
    if not paths:
        raise LabelRefused("no image given")
    existing = _existing_by_name(s3, train_bucket)
    plan: list[tuple[Labelled, dict[str, Any]]] = []
    targets: dict[str, str] = {}
    for path in paths:
        bucket, key = parse_image_path(path)
        if bucket not in image_buckets:
            raise LabelRefused(
                f"{path}: bucket {bucket!r} is not one of the image buckets "
                f"({', '.join(image_buckets)})"
            )
        if bucket == train_bucket and key.startswith(TRAINING_PREFIXES):
            raise LabelRefused(f"{path}: already a training object, not an arriving image")
        head = _head(s3, bucket, key, path)
        name = posixpath.basename(key)
        target = f"{split}/{cls}/{name}"
        if target in targets:
            raise LabelRefused(f"{path} and {targets[target]} would both become {target}")
        targets[target] = path
        etag = head["ETag"].strip('"')
        item = Labelled(source=f"{bucket}/{key}", etag=etag, target=target)
        for other_key, other_etag in existing.get(name, []):
            other_split, other_cls = other_key.split("/")[:2]
            if other_key == target:
                if other_etag != etag:
                    raise LabelRefused(f"{path}: {target} already holds a different image")
                item.unchanged = True
            elif other_etag == etag and other_split != split:
                raise LabelRefused(
                    f"{path}: already in {other_key}; an image is training data or holdout, "
                    "never both"
                )
            elif other_etag == etag and other_cls != cls:
                item.replaced.append(other_key)
        plan.append((item, head))

    entries = queue.entries() if queue is not None else []
    for item, head in plan:  # every check passed: now act
        bucket, key = parse_image_path(item.source)
        if not item.unchanged:
            _copy(s3, bucket, key, item, head, train_bucket, cls, by)
        for old in item.replaced:
            _delete(Objects(s3, train_bucket), old)
        if queue is not None:
            item.dequeued = queue.remove(bucket, key, entries)
    return [item for item, _ in plan]


def _existing_by_name(s3, bucket: str) -> dict[str, list[tuple[str, str]]]:
    """Every object of both splits, by file name: [(key, etag)]."""
    by_name: dict[str, list[tuple[str, str]]] = {}
    try:
        paginator = s3.get_paginator("list_objects_v2")
        for split in SPLITS:
            for page in paginator.paginate(Bucket=bucket, Prefix=f"{split}/"):
                for obj in page.get("Contents", []):
                    if obj["Key"].count("/") == 2:
                        name = posixpath.basename(obj["Key"])
                        by_name.setdefault(name, []).append((obj["Key"], obj["ETag"].strip('"')))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise LabelRefused(f"the train bucket {bucket!r} does not exist") from None
        raise translate(exc, f"list s3://{bucket}") from None
    except BotoCoreError as exc:
        raise translate(exc, f"list s3://{bucket}") from None
    return by_name


def _head(s3, bucket: str, key: str, path: str) -> dict[str, Any]:
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise LabelRefused(f"{path}: no such object") from None
        raise translate(exc, f"read s3://{bucket}/{key}") from None
    except BotoCoreError as exc:
        raise translate(exc, f"read s3://{bucket}/{key}") from None


def _copy(s3, bucket, key, item: Labelled, head, train_bucket, cls, by) -> None:
    """Server-side copy, only of the bytes that were checked (CopySourceIfMatch)."""
    metadata = {**head.get("Metadata", {}), "label": cls, "labelled-by": by}
    try:
        s3.copy_object(
            Bucket=train_bucket,
            Key=item.target,
            CopySource={"Bucket": bucket, "Key": key},
            CopySourceIfMatch=item.etag,
            MetadataDirective="REPLACE",
            Metadata=metadata,
            ContentType=head.get("ContentType") or "application/octet-stream",
        )
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"copy s3://{item.source} to {item.target}") from None
