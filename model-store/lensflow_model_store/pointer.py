"""The manifest pointer ``<name>/current.json``: which version serves, and why.

Written only by conditional PUT: If-None-Match ``*`` for the first write, If-Match on the
ETag read for every later one, so two writers can never both win.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from lensflow_model_store.errors import ModelStoreError, NotFoundError
from lensflow_model_store.layout import pointer_key
from lensflow_model_store.objects import Objects


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Pointer:
    version: str
    sha256: str
    flipped_at: str
    flipped_by: str
    reason: str
    action: str = "flip"
    previous: str | None = None
    sequence: int = 1
    pinned: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    etag: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("etag")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], etag: str | None = None) -> Pointer:
        try:
            return cls(
                version=str(data["version"]),
                sha256=str(data["sha256"]),
                flipped_at=str(data.get("flipped_at", "")),
                flipped_by=str(data.get("flipped_by", "")),
                reason=str(data.get("reason", "")),
                action=str(data.get("action", "flip")),
                previous=data.get("previous"),
                sequence=int(data.get("sequence", 1)),
                pinned=bool(data.get("pinned", False)),
                metrics=dict(data.get("metrics") or {}),
                etag=etag,
            )
        except (KeyError, TypeError, ValueError):
            raise ModelStoreError("the pointer is malformed (no version or sha256)") from None


class PointerFile:
    """Reads and conditionally writes one model's pointer."""

    def __init__(self, objects: Objects, name: str):
        self.objects = objects
        self.key = pointer_key(name)

    def read(self) -> Pointer | None:
        try:
            data, etag = self.objects.get_json(self.key)
        except NotFoundError:
            return None
        return Pointer.from_json(data, etag)

    def read_if_changed(self, etag: str | None) -> Pointer | None:
        """The pointer if its ETag differs from ``etag``; None if unchanged (a 304).

        This is the cheap check a serving replica makes every TTL: no body moves when
        nothing changed. Raises NotFoundError when there is no pointer yet.
        """
        import json

        result = self.objects.get(self.key, if_none_match=etag)
        if result is None:
            return None
        body, new_etag = result
        try:
            return Pointer.from_json(json.loads(body), new_etag)
        except ValueError:
            raise ModelStoreError("the pointer is not valid JSON") from None

    def write(self, pointer: Pointer, *, replacing: Pointer | None) -> Pointer:
        """Write ``pointer`` if the stored one is still ``replacing`` (None: no pointer yet).

        Raises ConflictError when another writer got there first.
        """
        if replacing is None:
            etag = self.objects.put_json(self.key, pointer.to_json(), if_absent=True)
        else:
            etag = self.objects.put_json(self.key, pointer.to_json(), if_match=replacing.etag)
        return Pointer.from_json(pointer.to_json(), etag)
