"""Reads an uploaded image from S3/MinIO, bounded in size, on the per-event hot path.

Uses the MinIO client (``lensflow_core.s3.minio_client``): about half boto3's CPU per GET,
which is most of what a replica spends outside the model.
"""

from __future__ import annotations

import urllib3
from minio import Minio
from minio.error import S3Error

from functions.predict.errors import Rejected
from lensflow_core.s3 import minio_client
from lensflow_core.settings import Config

_GONE = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion"}
_FORBIDDEN = {"AccessDenied", "InvalidObjectState", "AllAccessDisabled"}


class ImageFetcher:
    def __init__(self, config: Config, client: Minio | None = None):
        self.limit = config.max_image_bytes
        self.client = client or minio_client(config)

    def fetch(self, bucket: str, key: str) -> tuple[bytes, str]:
        """(bytes, etag) of ``bucket/key``. Raises Rejected: 413/422 permanent, 503 transient."""
        path = f"{bucket}/{key}"
        try:
            response = self.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code in _GONE:
                raise Rejected(422, f"{path} does not exist (any more)") from None
            if exc.code in _FORBIDDEN:
                raise Rejected(422, f"{path} cannot be read: {exc.code}") from None
            raise Rejected(503, f"object store answered {exc.code}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Rejected(503, f"object store unreachable: {type(exc).__name__}") from None
        except ValueError as exc:  # the client refuses the name itself: permanent
            raise Rejected(422, f"{path} is not a valid object name: {exc}") from None
        try:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > self.limit:
                raise Rejected(413, f"{path} is {declared} bytes, over the limit of {self.limit}")
            data = response.read(self.limit + 1)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Rejected(503, f"object read failed: {type(exc).__name__}") from None
        finally:
            response.close()
            response.release_conn()
        if len(data) > self.limit:
            raise Rejected(413, f"{path} is over the limit of {self.limit} bytes")
        return data, (response.headers.get("ETag") or "").strip('"')
