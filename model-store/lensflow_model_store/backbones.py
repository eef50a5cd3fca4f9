"""Pretrained backbone weights kept in the model store, so a training Job needs no download.

``<name>/backbones/<backbone>/<file>`` (the weights) and ``.../metadata.json`` (their
sha256, size, source, preprocessing), each written once with If-None-Match ``*``:
storing the same weights again changes nothing, different weights under the same
backbone name are refused. ``metadata.json`` is written last: without it the backbone is
not there.
"""

from __future__ import annotations

from typing import Any

from lensflow_model_store import layout
from lensflow_model_store.errors import ConflictError, IntegrityError, NotFoundError
from lensflow_model_store.integrity import sha256_hex
from lensflow_model_store.pointer import utc_now

METADATA = "metadata.json"


def backbone_path(store, backbone: str) -> str:
    """``s3://<bucket>/<name>/backbones/<backbone>/``, for messages."""
    return f"s3://{store.bucket}/{layout.backbone_key(store.name, backbone, METADATA)[: -len(METADATA)]}"


def read_metadata(store, backbone: str) -> dict[str, Any] | None:
    """The stored backbone's metadata, or None when there is none."""
    try:
        value, _ = store.objects.get_json(layout.backbone_key(store.name, backbone, METADATA))
    except NotFoundError:
        return None
    return value


def put_backbone(
    store, backbone: str, filename: str, body: bytes, info: dict[str, Any], by: str = "lensflow"
) -> tuple[dict[str, Any], bool]:
    """Store ``body`` as the backbone's weights file, once; (metadata, whether written now).

    Raises ``ConflictError`` when different weights are stored under this name already.
    """
    digest = sha256_hex(body)
    existing = read_metadata(store, backbone)
    if existing is not None:
        if existing.get("sha256") != digest:
            raise ConflictError(
                f"{backbone_path(store, backbone)} already holds other weights "
                f"(sha256 {str(existing.get('sha256'))[:12]}); a backbone is stored once"
            )
        return existing, False
    key = layout.backbone_key(store.name, backbone, filename)
    try:
        store.objects.put(key, body, if_absent=True)
    except ConflictError:  # a half-done earlier import, or a concurrent one: same bytes?
        read = load_file(store, key, digest)
        if read is None:
            raise
    metadata = {
        **info,
        "backbone": backbone,
        "file": filename,
        "sha256": digest,
        "size": len(body),
        "stored_at": utc_now(),
        "stored_by": by,
    }
    store.objects.put_json(
        layout.backbone_key(store.name, backbone, METADATA), metadata, if_absent=True
    )
    return metadata, True


def load_file(store, key: str, digest: str) -> bytes | None:
    body, _ = store.objects.get(key)  # type: ignore[misc]
    return body if sha256_hex(body) == digest else None


def get_backbone(store, backbone: str) -> tuple[bytes, dict[str, Any]]:
    """(weights file, metadata), digest-checked. ``NotFoundError`` when none is stored."""
    metadata = read_metadata(store, backbone)
    if metadata is None:
        raise NotFoundError(f"no backbone stored at {backbone_path(store, backbone)}")
    key = layout.backbone_key(store.name, backbone, metadata["file"])
    body = load_file(store, key, metadata["sha256"])
    if body is None:
        raise IntegrityError(f"{key}: sha256 does not match its metadata")
    return body, metadata
