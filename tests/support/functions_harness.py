"""Helpers for tests that talk to a function the way Knative and MinIO do."""

from __future__ import annotations

import requests

from lensflow.function_server import FunctionServer, knative_post
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, notification_record

__all__ = ["FunctionServer", "knative_post", "put_and_notify"]


def put_and_notify(
    url: str,
    config: Config,
    s3,
    bucket: str,
    key: str,
    data: bytes,
    content_type: str = "image/jpeg",
    **post,
) -> requests.Response:
    """Upload ``data`` to S3 and deliver the bucket notification MinIO would write."""
    etag = s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)["ETag"]
    record_key, value = notification_record(
        ObjectEvent("s3:ObjectCreated:Put", bucket, key, etag, len(data), content_type)
    )
    return knative_post(url, config, value, record_key, **post)
