"""Labelling: a person's (or the demo's scripted) labels for arriving images.

``label`` copies images server-side into ``labeled/<class>/`` (or ``holdout/<class>/``) of
the train bucket, keeping their names, and takes them off the labelling queue
(``lensflow_model_store.label_queue``). It validates every image first and refuses the whole
request, writing nothing, when any one is wrong.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from lensflow_model_store.decisions import LABEL, UNDO, Decision, DecisionLog
from lensflow_model_store.errors import ConflictError, NotFoundError
from lensflow_model_store.label_queue import LabelQueue, QueueEntry
from lensflow_model_store.layout import LABELED, SPLITS, TRAINING_PREFIXES
from lensflow_model_store.objects import Objects, translate


class LabelRefused(ValueError):
    """A labelling request that cannot be carried out; nothing was written."""


class LabelConflict(LabelRefused):
    """The image is not (or no longer) on the queue, is labelled already, or another
    labeller decided about it first; nothing was written."""


@dataclass
class Labelled:
    """One image as labelling copied it."""

    source: str  # <bucket>/<key>
    etag: str
    target: str  # <split>/<class>/<name> in the train bucket
    replaced: list[str] = field(default_factory=list)  # the same image under another class
    unchanged: bool = False  # it was there already
    dequeued: int = 0
    sequence: int = 0  # its decision's number (``lensflow_model_store.decisions``)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_image_path(path: str) -> tuple[str, str]:
    """``<bucket>/<key>`` or ``s3://<bucket>/<key>`` as (bucket, key)."""
    text = path[len("s3://") :] if path.startswith("s3://") else path
    bucket, _, key = text.partition("/")
    if not bucket or not key:
        raise LabelRefused(f"{path!r} is not <bucket>/<key>")
    return bucket, key


def serving_labels(store) -> list[str] | None:
    """The classes there are: the serving model's labels (None: no model serves yet, so
    any well-formed class is new). ``store``: a ``lensflow_model_store.ModelStore``."""
    pointer = store.current()
    if pointer is None:
        return None
    try:
        return store.get_version(pointer.version).labels
    except NotFoundError:
        return None


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
    strict: bool = False,
) -> list[Labelled]:
    """Copy the images ``paths`` (``<bucket>/<key>``) to ``<split>/<cls>/<name>`` in the
    train bucket, take them off the queue and record each decision (``decisions``).

    Refused, with nothing written, when: the class is not one of ``known_labels`` (None:
    no model yet, any well-formed name); a path is outside ``image_buckets``, names a
    training object (``labeled/``, ``holdout/``, ``to-label/``), or does not exist; two
    paths share a name; a different image already has the target name; or an image is
    already in the other split (training data and holdout never share an image).
    The same image under another class of the same split is a relabel: it moves.
    ``strict`` (the dashboard's rule): the image must be on the queue and not labelled
    yet, else ``LabelConflict``; so is the loser of two labellers racing for one image.
    """
    if split not in SPLITS:
        raise LabelRefused(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    check_class_name(cls, known_labels)
    if not paths:
        raise LabelRefused("no image given")
    wanted = [f"{b}/{k}" for b, k in map(parse_image_path, paths)]
    entries = queue.entries(wanted) if queue is not None else []
    log = DecisionLog(Objects(s3, train_bucket))
    plan = _plan(s3, train_bucket, image_buckets, cls, paths, split, entries, strict, log)
    for item, _head, decision in plan:  # every check passed: claim each image, then act
        if item.unchanged:
            continue  # labelled so already: no decision to record
        decision.by = by
        try:
            log.append(decision)
        except ConflictError:
            raise LabelConflict(f"{item.source}: someone else labelled it just now") from None
        item.sequence = decision.sequence
    for item, head, _decision in plan:
        bucket, key = parse_image_path(item.source)
        if not item.unchanged:
            _copy(s3, bucket, key, item, head, train_bucket, cls, by)
        for old in item.replaced:
            Objects(s3, train_bucket).delete(old)
        if queue is not None:
            item.dequeued = queue.remove(bucket, key, entries)
    return [item for item, _, _ in plan]


def _plan(s3, train_bucket, image_buckets, cls, paths, split, entries, strict, log):
    """[(item, head, decision)] for every path, or LabelRefused before anything is written."""
    existing = _existing_by_name(s3, train_bucket)
    queued = {e.path: [] for e in entries}
    for e in entries:
        queued[e.path].append(e)
    plan: list[tuple[Labelled, dict[str, Any], Decision]] = []
    targets: dict[str, str] = {}
    for path in paths:
        bucket, key = parse_image_path(path)
        if strict and f"{bucket}/{key}" not in queued:
            raise LabelConflict(f"{path}: not on the labelling queue (labelled already?)")
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
        item = Labelled(source=f"{bucket}/{key}", etag=head["ETag"].strip('"'), target=target)
        _compare(item, existing.get(name, []), split, cls, path)
        decisions = log.of(bucket, key)
        standing = log.in_effect(decisions)
        if strict and (item.unchanged or item.replaced or standing is not None):
            done = standing.target if standing else (item.replaced or [target])[0]
            who = f" by {standing.by} at {standing.at}" if standing else ""
            raise LabelConflict(f"{path}: already labelled ({done}{who})")
        decision = Decision(
            image=item.source,
            action=LABEL,
            by="",
            sequence=(decisions[-1].sequence + 1) if decisions else 1,
            cls=cls,
            split=split,
            target=target,
            etag=item.etag,
            copied=not item.unchanged,
            replaced=list(item.replaced),
            requeue=[e.to_json() for e in queued.get(item.source, [])],
        )
        plan.append((item, head, decision))
    return plan


def _compare(item: Labelled, same_name: list[tuple[str, str]], split, cls, path) -> None:
    """Mark ``item`` unchanged or a move, or refuse it, by what already has its name."""
    for other_key, other_etag in same_name:
        other_split, other_cls = other_key.split("/")[:2]
        if other_key == item.target:
            if other_etag != item.etag:
                raise LabelRefused(f"{path}: {item.target} already holds a different image")
            item.unchanged = True
        elif other_etag == item.etag and other_split != split:
            raise LabelRefused(
                f"{path}: already in {other_key}; an image is training data or holdout, never both"
            )
        elif other_etag == item.etag and other_cls != cls:
            item.replaced.append(other_key)


def undo(s3, *, train_bucket: str, path: str, by: str, queue: LabelQueue | None = None) -> Decision:
    """Undo the label that stands for ``path``: delete its copy (only while it still holds
    the bytes that were copied), put its queue records back, record the undo.

    ``LabelConflict`` when no label of it stands (never labelled, undone already, or
    someone decided about it just now); a move is not undone (label it back instead).
    """
    bucket, key = parse_image_path(path)
    objects = Objects(s3, train_bucket)
    log = DecisionLog(objects)
    decisions = log.of(bucket, key)
    standing = log.in_effect(decisions)
    if standing is None:
        raise LabelConflict(f"{path}: no label of it to undo")
    if standing.replaced:
        raise LabelConflict(
            f"{path}: its label moved it from {', '.join(standing.replaced)}; label it back instead"
        )
    done = Decision(
        image=standing.image,
        action=UNDO,
        by=by,
        sequence=standing.sequence + 1,
        cls=standing.cls,
        split=standing.split,
        target=standing.target,
        etag=standing.etag,
        undoes=standing.sequence,
    )
    try:
        log.append(done)
    except ConflictError:
        raise LabelConflict(f"{path}: someone else decided about it just now") from None
    if standing.copied:
        try:
            objects.delete(standing.target, if_match=f'"{standing.etag}"')
        except (ConflictError, NotFoundError):
            pass  # replaced or gone since: not ours to delete
    if queue is not None:
        done.requeue = [
            entry
            for entry in standing.requeue
            if queue.restore(QueueEntry.from_json(entry, entry["record"]))
        ]
    return done


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
