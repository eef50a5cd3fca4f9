"""Helpers test modules share (they were in tests/test_knative_security.py)."""

from __future__ import annotations


def obj(bucket: str, key: str) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"
