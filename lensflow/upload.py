"""``lensflow upload``: an ordinary S3 upload, nothing more.

The event comes from the bucket's notification, as for any S3 client: MinIO's Kafka
target on a cluster (``mc event add``), the embedded S3 locally (``lensflow.s3_notify``).
``upload_file`` is the one upload path: the CLI, the drone simulator, the demo and the
benchmarks all call it.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config


@dataclass(frozen=True)
class Uploaded:
    bucket: str
    key: str
    etag: str
    size: int
    content_type: str


def object_key(path: Path, prefix: str) -> str:
    """``<prefix>/<file name>``; a prefix is a folder, so one ``/`` joins them."""
    prefix = prefix.strip("/")
    return f"{prefix}/{path.name}" if prefix else path.name


def guess_content_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def upload_file(
    s3,
    bucket: str,
    key: str,
    body: bytes,
    content_type: str = "application/octet-stream",
    metadata: Mapping[str, str] | None = None,
) -> Uploaded:
    """One PUT of ``body`` to ``bucket``/``key`` (so S3 announces ``s3:ObjectCreated:Put``);
    what S3 stored. Raises botocore's errors."""
    reply = s3.put_object(
        Bucket=bucket, Key=key, Body=body, ContentType=content_type, Metadata=dict(metadata or {})
    )
    return Uploaded(bucket, key, reply["ETag"].strip('"'), len(body), content_type)


def upload_files(
    config: Config,
    paths: Iterable[str | Path],
    bucket: str | None = None,
    prefix: str = "",
    *,
    s3=None,
) -> list[Uploaded]:
    """Put each file in ``bucket`` (default: the first image bucket) under ``prefix``."""
    bucket = bucket or config.image_buckets[0]
    s3 = s3 or s3_client(config)
    uploaded = []
    for raw in paths:
        path = Path(raw)
        body = path.read_bytes()
        key = object_key(path, prefix)
        uploaded.append(upload_file(s3, bucket, key, body, guess_content_type(path)))
    return uploaded
