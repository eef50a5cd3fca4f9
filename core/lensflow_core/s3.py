"""S3 clients made from the settings: boto3 for the model store and the tools.

The predict function's hot GET is ``lensflow_core.s3_get`` (libcurl). Both trust the CAs
in ``LENSFLOW_S3_CA_BUNDLE`` for an https endpoint signed by a private CA (the system's
trust store otherwise).
"""

from __future__ import annotations

import os

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from lensflow_core.settings import Config

CA_BUNDLE = "LENSFLOW_S3_CA_BUNDLE"


def ca_bundle(config: Config) -> str | None:
    """The CA bundle to verify the endpoint with (None: the system's), checked readable."""
    path = config.s3_ca_bundle
    if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise FileNotFoundError(f"{CA_BUNDLE}: no readable file at {path}")
    return path


def s3_client(config: Config, *, timeout_s: float = 10.0, retries: int = 2):
    """A boto3 S3 client for the configured endpoint (MinIO, moto or AWS)."""
    return boto3.client(
        "s3",
        endpoint_url=config.s3_endpoint,
        aws_access_key_id=config.s3_access_key,
        aws_secret_access_key=config.s3_secret_key,
        region_name=config.s3_region,
        verify=ca_bundle(config),  # None: botocore's default trust store
        config=BotoConfig(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": retries, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=32,
        ),
    )


def ensure_buckets(s3, buckets: list[str] | tuple[str, ...]) -> None:
    """Create the buckets that do not exist yet."""
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)


# What S3 and MinIO answer a conditional write whose condition failed (412), or one that
# raced another conditional write to the same key (409): someone else wrote first.
PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def precondition_failed(exc: ClientError) -> bool:
    """Whether ``exc`` says a conditional request lost to another writer."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in PRECONDITION_FAILED or status in (409, 412)


def put_if_absent(
    s3, bucket: str, key: str, body: bytes, content_type: str = "application/octet-stream"
) -> str | None:
    """Write ``key`` only while no object has that name (If-None-Match ``*``): its ETag, or
    None when one is there already. Any other failure raises."""
    try:
        return s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*"
        )["ETag"]
    except ClientError as exc:
        if precondition_failed(exc):
            return None
        raise
