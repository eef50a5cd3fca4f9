"""Digests and the check that a model really loads before anyone can point at it."""

from __future__ import annotations

import hashlib

from lensflow_core.runtime import ModelError, describe
from lensflow_model_store.errors import InvalidModelError


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inspect_model(model: bytes) -> dict:
    """Load ``model`` in LiteRT, run it once on zeros, and describe its input and output.

    Raises InvalidModelError when it does not load, is not a single-input image
    classifier, or does not run (``lensflow_core.runtime.describe`` says which).
    """
    try:
        return describe(model)
    except ModelError as exc:
        raise InvalidModelError(str(exc)) from None


def check_labels(labels: list[str], output_size: int) -> None:
    if not labels:
        raise InvalidModelError("no labels")
    if any(not label.strip() or "\n" in label for label in labels):
        raise InvalidModelError("labels must be non-empty single lines")
    if len(set(labels)) != len(labels):
        raise InvalidModelError("labels are not unique")
    if len(labels) != output_size:
        raise InvalidModelError(f"{len(labels)} labels for a model with {output_size} outputs")


def parse_labels(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
