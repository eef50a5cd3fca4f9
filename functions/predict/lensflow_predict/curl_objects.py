"""A bucket's objects for the model store's readers and writers, through the replica's libcurl.

``lensflow_model_store`` reads and writes through an ``Objects`` (boto3 by default);
the predict replica hands it this one where it asks often: the labelling queue's
conditional PUTs (a batch at a time) and LIST, and the model pointer's conditional GET
every half TTL. boto3 costs ~1.5 ms of CPU a request on a replica's core, libcurl a
fraction of that (docs/benchmarks.md). Errors are the store's own
(``lensflow_model_store.errors``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lensflow_core.s3_get import GetResult, ObjectGetter, Unreachable
from lensflow_model_store.errors import (
    ConflictError,
    ModelStoreError,
    NotFoundError,
    StoreUnavailableError,
)

POINTER_BYTES = 64 * 1024  # a pointer is a few hundred bytes


class CurlObjects:
    """The objects of ``bucket`` the labelling queue and the pointer need, over libcurl."""

    def __init__(self, getter: ObjectGetter, bucket: str):
        self.getter = getter
        self.bucket = bucket

    def get(self, key: str, *, if_none_match: str | None = None) -> tuple[bytes, str] | None:
        """(body, etag); None when ``if_none_match`` matched (304 Not Modified)."""
        what = f"read s3://{self.bucket}/{key}"
        try:
            result = self.getter.get(self.bucket, key, POINTER_BYTES, if_none_match or "")
        except Unreachable as exc:
            raise StoreUnavailableError(f"{what}: {exc}") from None
        if result.status == 304 and if_none_match:
            return None
        if result.status == 200:  # the ETag quoted, as S3 sends it and boto3 hands it over
            return result.body, f'"{result.etag}"'
        if result.status == 404:
            raise NotFoundError(f"{what}: not found")
        if result.status >= 500:
            raise StoreUnavailableError(f"{what}: object store answered {result.status}")
        raise ModelStoreError(f"{what}: {result.error_code}")

    def put(self, key: str, body: bytes, *, content_type: str, if_absent: bool = False) -> str:
        written = self.put_many([(key, body)], content_type=content_type, if_absent=if_absent)[0]
        if isinstance(written, ModelStoreError):
            raise written
        return written

    def put_many(
        self, items: Sequence[tuple[str, bytes]], *, content_type: str, if_absent: bool = False
    ) -> list[str | ModelStoreError]:
        """``put`` for each (key, body), as one batch of parallel requests: the ETag, or
        the error ``put`` would raise (``ConflictError`` when the record exists)."""
        if not if_absent:
            raise ValueError("the labelling queue only writes records that do not exist yet")
        answers = self.getter.put_many_if_absent(self.bucket, items, content_type)
        return [
            _written(f"write s3://{self.bucket}/{key}", answer)
            for (key, _), answer in zip(items, answers, strict=True)
        ]

    def list_keys(self, prefix: str) -> list[str]:
        try:
            return self.getter.list_keys(self.bucket, prefix)
        except OSError as exc:  # Unreachable, or the store's error code
            raise StoreUnavailableError(f"list s3://{self.bucket}/{prefix}: {exc}") from None


def _written(what: str, answer: GetResult | Unreachable) -> str | ModelStoreError:
    if isinstance(answer, Unreachable):
        return StoreUnavailableError(f"{what}: {answer}")
    if answer.status in (409, 412):
        return ConflictError(f"{what}: the record exists")
    if answer.status != 200:
        return StoreUnavailableError(f"{what}: {answer.error_code}")
    return answer.etag
