"""MinIO policy helpers test modules share: a role's policy file and whether it allows a
request (the dashboard's tests use them beside tests/test_knative_security.py)."""

from __future__ import annotations

import fnmatch
import json
from typing import Any

from tests.support.knative_manifests import KNATIVE, Doc


def obj(bucket: str, key: str) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


def policy(role: str) -> Doc:
    return json.loads((KNATIVE / "minio" / "policies" / f"{role}.json").read_text())


def as_list(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def allowed(doc: Doc, action: str, arn: str) -> bool:
    """Whether any Allow statement matches (conditions taken as met: errs towards allowing)."""
    assert all(s["Effect"] == "Allow" for s in doc["Statement"]), "lensflow grants, never denies"
    return any(
        any(fnmatch.fnmatchcase(action, a) for a in as_list(s["Action"]))
        and any(fnmatch.fnmatchcase(arn, r) for r in as_list(s["Resource"]))
        for s in doc["Statement"]
    )
