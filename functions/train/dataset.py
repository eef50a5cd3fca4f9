"""Labelled images in the train bucket, ImageFolder style.

``labeled/<class>/<anything>`` trains, ``holdout/<class>/<anything>`` judges. Objects are
listed with one paginated LIST per split and fetched with parallel GETs.
(``lensflow.seeding`` fills a bucket with synthetic scenes for the demo, tests and bench.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model_store.labelqueue import HOLDOUT, LABELED

__all__ = ["HOLDOUT", "LABELED", "Split", "fetch", "list_split", "upload"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FETCH_THREADS = 16


@dataclass
class Split:
    """The images of one split: parallel lists of class names, object keys, ETags (and
    bodies)."""

    name: str
    classes: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    etags: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.classes).items()))

    @property
    def labels(self) -> list[str]:
        """The class names present, sorted (the ImageFolder order)."""
        return sorted(set(self.classes))


def list_split(s3, bucket: str, split: str) -> Split:
    """Every image object under ``<split>/<class>/``; other objects are ignored."""
    out = Split(split)
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{split}/"):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            parts = key.split("/")
            if len(parts) < 3 or not parts[1] or not key.lower().endswith(IMAGE_SUFFIXES):
                continue
            out.classes.append(parts[1])
            out.keys.append(key)
            out.etags.append(obj.get("ETag", "").strip('"'))
    return out


def fetch(s3, bucket: str, split: Split, threads: int = FETCH_THREADS) -> Split:
    """``split`` with every object's body, fetched in parallel."""

    def get(key: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        split.blobs = list(pool.map(get, split.keys))
    return split


def upload(
    s3,
    bucket: str,
    split: str,
    items: Iterable[tuple[str, bytes]],
    tag: str,
    threads: int = FETCH_THREADS,
) -> int:
    """PUT ``(class, jpeg)`` items as ``<split>/<class>/<tag>-<n>.jpg`` (n counts per class)."""
    seen: Counter[str] = Counter()
    jobs = []
    for cls, body in items:
        jobs.append((f"{split}/{cls}/{tag}-{seen[cls]:05d}.jpg", body))
        seen[cls] += 1

    def put(job: tuple[str, bytes]) -> None:
        key, body = job
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="image/jpeg")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(put, jobs))
    return len(jobs)
