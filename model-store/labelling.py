"""Labelling: a person's (or the demo's scripted) labels for arriving images.

``label`` copies images server-side into ``labeled/<class>/`` (or ``holdout/<class>/``) of
the train bucket, keeping their names, and takes them off the labelling queue
(``model_store.labelqueue``). It validates every image first and refuses the whole
request, writing nothing, when any one is wrong.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from model_store.labelqueue import (
    LABELED,
    SPLITS,
    TRAINING_PREFIXES,
    LabelQueue,
)
from model_store.objects import Objects, translate


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
            Objects(s3, train_bucket).delete(old)
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
