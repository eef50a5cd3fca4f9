"""One way to build an S3 client from the configuration."""

from __future__ import annotations

import boto3
from botocore.config import Config as BotoConfig

from lensflow.config import Config


def s3_client(config: Config, *, timeout_s: float = 10.0, retries: int = 2):
    """A boto3 S3 client for the configured endpoint (MinIO, moto or AWS)."""
    return boto3.client(
        "s3",
        endpoint_url=config.s3_endpoint,
        aws_access_key_id=config.s3_access_key,
        aws_secret_access_key=config.s3_secret_key,
        region_name=config.s3_region,
        config=BotoConfig(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": retries, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=32,
        ),
    )
