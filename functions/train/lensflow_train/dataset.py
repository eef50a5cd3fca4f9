"""Labelled images in the train bucket, ImageFolder style.

``labeled/<class>/<anything>`` trains, ``holdout/<class>/<anything>`` judges. Objects are
listed with one paginated LIST per split, then streamed by ``load``: parallel GETs, each
image decoded once, as the predict function decodes it, straight into preallocated uint8
arrays at the models' input sizes, and its bytes dropped. A round holds
``n x height x width x 3`` bytes per input size, never the objects themselves.
(``lensflow.seeding`` fills a bucket with synthetic scenes for the demo, tests and bench.)
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lensflow_core.imaging import ImageError, decode_image
from lensflow_core.runtime import resize

__all__ = ["Pictures", "Split", "list_split", "load", "upload"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FETCH_THREADS = 16  # uploads (seeding)
# A round's load: its transient memory is at most LOAD_THREADS objects' bytes (each at most
# LENSFLOW_MAX_IMAGE_BYTES) plus DECODE_SLOTS decoded pictures (each at most
# LENSFLOW_MAX_IMAGE_PIXELS x 3 bytes; a JPEG decodes reduced, near the model's size).
LOAD_THREADS = 8
DECODE_SLOTS = 2  # the training Job's CPUs: more decoders would only hold more pictures


@dataclass
class Split:
    """The images of one split: parallel lists of class names, object keys, ETags and sizes."""

    name: str
    classes: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    etags: list[str] = field(default_factory=list)

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
            out.sizes.append(int(obj.get("Size", 0)))
            out.etags.append(obj.get("ETag", "").strip('"'))
    return out


Size = tuple[int, int]  # (height, width)


@dataclass
class Pictures:
    """A split decoded: per input size a uint8 array ``[n, height, width, 3]`` (RGB, resized
    as ``lensflow_core.runtime`` resizes), the class of each row, the keys that did not decode."""

    classes: list[str]
    arrays: dict[Size, np.ndarray]
    undecodable: list[str]

    def __len__(self) -> int:
        return len(self.classes)


def load(
    s3,
    bucket: str,
    split: Split,
    sizes: Iterable[Size],
    max_pixels: int,
    max_bytes: int,
    threads: int = LOAD_THREADS,
) -> Pictures:
    """Fetch every image of ``split`` and decode it once into arrays of each of ``sizes``.

    At most ``threads`` objects' bytes are alive at a time, each dropped once decoded, and
    at most ``DECODE_SLOTS`` decodes run at once. An object over ``max_bytes`` is not
    fetched; it and any image that does not decode (or is over ``max_pixels``) are left
    out and named in ``undecodable``. Raises botocore errors when the store cannot be read.
    """
    sizes = list(dict.fromkeys(sizes))
    n = len(split)
    arrays = {size: np.empty((n, *size, 3), np.uint8) for size in sizes}
    decoded = np.zeros(n, dtype=bool)
    decoders = threading.Semaphore(DECODE_SLOTS)

    def one(i: int) -> None:
        if split.sizes and split.sizes[i] > max_bytes:
            return
        data = s3.get_object(Bucket=bucket, Key=split.keys[i])["Body"].read(max_bytes + 1)
        if len(data) > max_bytes:
            return
        with decoders:
            try:
                for side in sorted({max(size) for size in sizes}):  # as predict decodes
                    image = decode_image(data, (side, side), max_pixels=max_pixels)
                    for size in sizes:
                        if max(size) == side:
                            arrays[size][i] = np.asarray(resize(image, *size))
            except ImageError:
                return
        decoded[i] = True

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(one, range(n)):
            pass
    keep = np.flatnonzero(decoded)
    if len(keep) < n:  # close the gaps in place: no second copy of the arrays
        for array in arrays.values():
            for row, i in enumerate(keep):
                array[row] = array[i]
        arrays = {size: array[: len(keep)] for size, array in arrays.items()}
    return Pictures(
        [split.classes[i] for i in keep],
        arrays,
        [split.keys[i] for i in np.flatnonzero(~decoded)],
    )


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
