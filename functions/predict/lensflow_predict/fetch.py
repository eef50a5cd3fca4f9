"""Reads an uploaded image from S3/MinIO, bounded in size, on the per-event hot path.

The GET itself is ``lensflow_core.s3.ObjectGetter`` (libcurl, signed by MinIO's signer);
this maps its answers to what the function replies: permanent problems are 413/422,
anything the store may get over is 503.
"""

from __future__ import annotations

from lensflow_core.s3_get import ObjectGetter, ObjectTooLarge, Unreachable
from lensflow_core.settings import Config
from lensflow_predict.errors import Rejected

_GONE = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion"}
_FORBIDDEN = {"AccessDenied", "InvalidObjectState", "AllAccessDisabled"}


class ImageFetcher:
    def __init__(self, config: Config, getter: ObjectGetter | None = None):
        self.limit = config.max_image_bytes
        self.getter = getter or ObjectGetter(config)

    def fetch(self, bucket: str, key: str) -> tuple[bytes, str]:
        """(bytes, etag) of ``bucket/key``. Raises Rejected: 413/422 permanent, 503 transient."""
        path = f"{bucket}/{key}"  # never an empty key: parse_notification refuses those
        try:
            result = self.getter.get(bucket, key, self.limit)
        except ObjectTooLarge:
            raise Rejected(413, f"{path} is over the limit of {self.limit} bytes") from None
        except Unreachable as exc:
            raise Rejected(503, str(exc)) from None
        if result.status == 200:
            return result.body, result.etag
        code = result.error_code
        if code in _GONE:
            raise Rejected(422, f"{path} does not exist (any more)")
        if code in _FORBIDDEN:
            raise Rejected(422, f"{path} cannot be read: {code}")
        raise Rejected(503, f"object store answered {code}")
