"""Thin S3 helpers: JSON in and out, conditional writes, errors mapped to the store's own."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, SSLError

from lensflow_core.s3 import precondition_failed
from lensflow_model_store.errors import (
    ConflictError,
    ModelStoreError,
    NotFoundError,
    StoreUnavailableError,
)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


def status_of(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def translate(exc: Exception, what: str) -> ModelStoreError:
    """The store error for a boto3 failure while doing ``what``."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = status_of(exc)
        if code in _NOT_FOUND or status == 404:
            return NotFoundError(f"{what}: not found")
        if precondition_failed(exc):
            return ConflictError(f"{what}: precondition failed (someone else wrote first)")
        if status >= 500 or status == 0:
            return StoreUnavailableError(f"{what}: object store answered {status or code}")
        return ModelStoreError(f"{what}: {code or status}")
    if isinstance(exc, SSLError):
        return StoreUnavailableError(
            f"{what}: TLS with the object store failed; is LENSFLOW_S3_CA_BUNDLE the CA "
            f"that signed its certificate? ({' '.join(str(exc).split())})"
        )
    if isinstance(exc, BotoCoreError):
        return StoreUnavailableError(f"{what}: object store unreachable ({type(exc).__name__})")
    raise exc


class Objects:
    """The objects of one bucket, with the operations the model store needs."""

    def __init__(self, s3, bucket: str):
        self.s3 = s3
        self.bucket = bucket

    def get(self, key: str, *, if_none_match: str | None = None) -> tuple[bytes, str] | None:
        """(body, etag); None when ``if_none_match`` matched (304 Not Modified)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_none_match:
            kwargs["IfNoneMatch"] = if_none_match
        try:
            response = self.s3.get_object(**kwargs)
            return response["Body"].read(), response["ETag"]
        except ClientError as exc:
            if if_none_match and status_of(exc) == 304:
                return None
            raise translate(exc, f"read s3://{self.bucket}/{key}") from None
        except BotoCoreError as exc:
            raise translate(exc, f"read s3://{self.bucket}/{key}") from None

    def get_json(self, key: str) -> tuple[dict, str]:
        body, etag = self.get(key)  # type: ignore[misc]
        try:
            return json.loads(body), etag
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelStoreError(f"s3://{self.bucket}/{key} is not valid JSON") from None

    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_match: str | None = None,
        if_absent: bool = False,
    ) -> str:
        """Write ``body``; with ``if_absent`` or ``if_match`` only under that condition."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "ContentType": content_type,
        }
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if if_match:
            kwargs["IfMatch"] = if_match
        try:
            return self.s3.put_object(**kwargs)["ETag"]
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"write s3://{self.bucket}/{key}") from None

    def put_many(
        self, items: Sequence[tuple[str, bytes]], **options: Any
    ) -> list[str | ModelStoreError]:
        """``put`` for each (key, body), one after the other: the ETag, or the error ``put``
        raised. (The predict replica's libcurl objects send a batch in parallel.)"""
        written: list[str | ModelStoreError] = []
        for key, body in items:
            try:
                written.append(self.put(key, body, **options))
            except ModelStoreError as exc:
                written.append(exc)
        return written

    def put_json(self, key: str, value: dict, **conditions: Any) -> str:
        body = json.dumps(value, indent=2, sort_keys=True).encode()
        return self.put(key, body, content_type="application/json", **conditions)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete ``key``; with ``if_match`` only while its ETag is still that one."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match:
            kwargs["IfMatch"] = if_match
        try:
            self.s3.delete_object(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"delete s3://{self.bucket}/{key}") from None

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"list s3://{self.bucket}/{prefix}") from None
        return keys

    def list_folders(self, prefix: str) -> list[str]:
        """Names of the 'folders' directly below ``prefix``."""
        names: list[str] = []
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            ):
                names.extend(
                    p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                )
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"list s3://{self.bucket}/{prefix}") from None
        return names
