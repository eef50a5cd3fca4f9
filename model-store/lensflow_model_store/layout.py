"""Object names in the model bucket and the train bucket (docs/contract.md, "Model store layout")."""

from __future__ import annotations

import re

MODEL_FILE = "model.tflite"
LABELS_FILE = "labels.txt"
METADATA_FILE = "metadata.json"

_VERSION = re.compile(r"^v(\d+)$")


def version_name(number: int) -> str:
    return f"v{number}"


def version_number(version: str) -> int | None:
    match = _VERSION.match(version)
    return int(match.group(1)) if match else None


def versions_prefix(name: str) -> str:
    return f"{name}/versions/"


def version_key(name: str, version: str, filename: str) -> str:
    if version_number(version) is None:
        raise ValueError(f"not a version name: {version!r} (expected v1, v2, ...)")
    if "/" in filename or filename in ("", ".", ".."):
        raise ValueError(f"not a file name: {filename!r}")
    return f"{name}/versions/{version}/{filename}"


def pointer_key(name: str) -> str:
    return f"{name}/current.json"


def lease_key(name: str) -> str:
    return f"{name}/lock.json"


def history_prefix(name: str) -> str:
    return f"{name}/history/"


def history_key(name: str, sequence: int, action: str) -> str:
    return f"{name}/history/{sequence:08d}-{action}.json"


def backbone_key(name: str, backbone: str, filename: str) -> str:
    """``<name>/backbones/<backbone>/<filename>``: pretrained weights rounds start from."""
    for part in (backbone, filename):
        if not part or "/" in part or part in (".", ".."):
            raise ValueError(f"not a backbone or file name: {part!r}")
    return f"{name}/backbones/{backbone}/{filename}"


QUEUE = "to-label"
LABELED = "labeled"
HOLDOUT = "holdout"
DECISIONS = "decisions"  # who labelled what, when (lensflow_model_store.decisions)
SPLITS = (LABELED, HOLDOUT)
TRAINING_PREFIXES = (f"{LABELED}/", f"{HOLDOUT}/", f"{QUEUE}/", f"{DECISIONS}/")
