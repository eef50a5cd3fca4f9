"""The model store: immutable versions, one pointer, and a history of every change to it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from lensflow_model_store import layout
from lensflow_model_store.errors import (
    ConflictError,
    IntegrityError,
    InvalidModelError,
    ModelStoreError,
    NotFoundError,
    PinnedError,
)
from lensflow_model_store.integrity import check_labels, inspect_model, parse_labels, sha256_hex
from lensflow_model_store.lease import LeaseFile
from lensflow_model_store.objects import Objects
from lensflow_model_store.pointer import Pointer, PointerFile, utc_now

log = logging.getLogger(__name__)

NO_POINTER = ""  # flip(expect=NO_POINTER): only while no version is current
DEFAULT_INPUT_SPEC = {"scale": 1 / 255, "offset": 0.0}
_PUBLISH_ATTEMPTS = 50


@dataclass(frozen=True)
class VersionInfo:
    version: str
    sha256: str
    metadata: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])


class ModelStore:
    """Versions of one model (``name``) in one bucket."""

    def __init__(self, s3, bucket: str, name: str):
        if not name or "/" in name:
            raise ValueError(f"invalid model name {name!r}")
        self.bucket = bucket
        self.name = name
        self.objects = Objects(s3, bucket)
        self.pointer = PointerFile(self.objects, name)

    @classmethod
    def from_config(cls, config, s3=None) -> ModelStore:
        from lensflow_core.s3 import s3_client

        return cls(s3 or s3_client(config), config.model_bucket, config.model_name)

    # --- versions ------------------------------------------------------------------------

    def publish(
        self,
        model: bytes,
        labels: list[str],
        *,
        metrics: dict[str, Any] | None = None,
        parent: str | None = None,
        input_spec: dict[str, float] | None = None,
        extra_files: dict[str, bytes] | None = None,
        created_by: str = "lensflow",
    ) -> VersionInfo:
        """Validate ``model`` and store it as the next version; never overwrites one.

        The model must load in LiteRT and have as many outputs as ``labels``. Files are
        written with If-None-Match, metadata.json last: a version without it is incomplete
        and invisible. Two concurrent publishers get two different versions.
        """
        shape = inspect_model(model)
        check_labels(labels, shape["output_size"])
        digest = sha256_hex(model)
        extra_files = dict(extra_files or {})
        reserved = {layout.MODEL_FILE, layout.LABELS_FILE, layout.METADATA_FILE} & set(extra_files)
        if reserved:
            raise ValueError(f"extra files may not be named {sorted(reserved)}")
        version = self._claim_version(model)
        self.objects.put(
            self._key(version, layout.LABELS_FILE),
            ("\n".join(labels) + "\n").encode(),
            content_type="text/plain",
            if_absent=True,
        )
        for filename, body in extra_files.items():
            self.objects.put(self._key(version, filename), body, if_absent=True)
        metadata = {
            "name": self.name,
            "version": version,
            "sha256": digest,
            "size": len(model),
            "labels": labels,
            **_shape_metadata(shape, input_spec),
            "metrics": metrics or {},
            "parent": parent,
            "files": sorted([layout.MODEL_FILE, layout.LABELS_FILE, *extra_files]),
            "extra_sha256": {f: sha256_hex(b) for f, b in extra_files.items()},
            "created_at": utc_now(),
            "created_by": created_by,
        }
        self.objects.put_json(self._key(version, layout.METADATA_FILE), metadata, if_absent=True)
        log.info("published %s/%s (%s)", self.name, version, digest[:12])
        return VersionInfo(version, digest, metadata)

    def _claim_version(self, model: bytes) -> str:
        """The next free version, claimed by writing its model file first (If-None-Match)."""
        number = self._next_number()
        for _ in range(_PUBLISH_ATTEMPTS):
            version = layout.version_name(number)
            try:
                self.objects.put(self._key(version, layout.MODEL_FILE), model, if_absent=True)
                return version
            except ConflictError:
                number += 1  # someone published this number first
        raise ModelStoreError("could not claim a version number")

    def get_version(self, version: str) -> VersionInfo:
        try:
            metadata, _ = self.objects.get_json(self._key(version, layout.METADATA_FILE))
        except NotFoundError:
            raise NotFoundError(f"no version {version} of model {self.name}") from None
        return VersionInfo(version, metadata["sha256"], metadata)

    def list_versions(self) -> list[VersionInfo]:
        """Complete versions, oldest first."""
        folders = self.objects.list_folders(layout.versions_prefix(self.name))
        numbered = sorted((n, f) for f in folders if (n := layout.version_number(f)) is not None)
        versions = []
        for _, folder in numbered:
            try:
                versions.append(self.get_version(folder))
            except NotFoundError:
                continue  # still being published, or abandoned half-way
        return versions

    def read_file(self, version: str, filename: str) -> bytes:
        """A stored file of ``version``; model.tflite and extra files are digest-checked."""
        info = self.get_version(version)
        body, _ = self.objects.get(self._key(version, filename))  # type: ignore[misc]
        expected = (
            info.sha256
            if filename == layout.MODEL_FILE
            else (info.metadata.get("extra_sha256", {}).get(filename))
        )
        if expected and sha256_hex(body) != expected:
            raise IntegrityError(f"{version}/{filename}: sha256 does not match its metadata")
        return body

    def verify(self, version: str) -> dict[str, Any]:
        """Re-check ``version``: digest, that it loads in LiteRT, and that labels fit."""
        info = self.get_version(version)
        model = self.read_file(version, layout.MODEL_FILE)
        labels = parse_labels(self.read_file(version, layout.LABELS_FILE).decode())
        shape = inspect_model(model)
        check_labels(labels, shape["output_size"])
        if labels != info.labels:
            raise InvalidModelError(f"{version}: labels.txt differs from metadata labels")
        return {"version": version, "sha256": info.sha256, "ok": True, **shape}

    # --- the pointer ---------------------------------------------------------------------

    def current(self) -> Pointer | None:
        return self.pointer.read()

    def flip(
        self,
        version: str,
        *,
        expect: str | None = None,
        reason: str = "",
        by: str = "lensflow",
        metrics: dict[str, Any] | None = None,
        honour_pin: bool = False,
        action: str = "flip",
    ) -> Pointer:
        """Point at ``version`` by compare-and-swap.

        ``expect``: the version the caller believes is current, or NO_POINTER for "none
        yet" (ConflictError if not; None skips the check);
        ``honour_pin``: refuse with PinnedError while an operator has pinned the pointer.
        The target is verified (digest, loads) first: nobody can point at a broken model.
        """
        current = self.pointer.read()
        found = current.version if current else NO_POINTER
        if expect is not None and found != expect:
            raise ConflictError(f"pointer is at {found or 'no version'}, not {expect or 'empty'}")
        if honour_pin and current is not None and current.pinned:
            raise PinnedError(f"pointer is pinned at {current.version}: {current.reason}")
        self.verify(version)  # the write below is still conditional on ``current``
        info = self.get_version(version)
        new = Pointer(
            version=version,
            sha256=info.sha256,
            flipped_at=utc_now(),
            flipped_by=by,
            reason=reason,
            action=action,
            previous=current.version if current else None,
            sequence=(current.sequence + 1) if current else 1,
            pinned=current.pinned if current else False,
            metrics=metrics if metrics is not None else dict(info.metadata.get("metrics", {})),
        )
        return self._commit(new, current)

    def rollback(self, *, reason: str = "", by: str = "lensflow") -> Pointer:
        """Flip back to the version the pointer named before its last flip."""
        current = self._require_current()
        if not current.previous:
            raise ModelStoreError(f"nothing to roll back to: {current.version} is the first")
        return self.flip(
            current.previous, expect=current.version, reason=reason, by=by, action="rollback"
        )

    def set_pinned(self, pinned: bool, *, reason: str = "", by: str = "lensflow") -> Pointer:
        """Pin (or unpin) the current version: training may publish but not promote."""
        current = self._require_current()
        new = replace(
            current,
            pinned=pinned,
            flipped_at=utc_now(),
            flipped_by=by,
            reason=reason,
            action="pin" if pinned else "unpin",
            previous=current.previous,
            sequence=current.sequence + 1,
            etag=None,
        )
        return self._commit(new, current)

    def history(self) -> list[dict[str, Any]]:
        """Every change of the pointer, oldest first."""
        records = []
        for key in sorted(self.objects.list_keys(layout.history_prefix(self.name))):
            record, _ = self.objects.get_json(key)
            records.append(record)
        return records

    def lease(self, ttl_s: float) -> LeaseFile:
        """The training lease of this model (``<name>/lock.json``), ``ttl_s`` long."""
        return LeaseFile(self.objects, self.name, ttl_s)

    # --- internals -----------------------------------------------------------------------

    def _commit(self, new: Pointer, current: Pointer | None) -> Pointer:
        try:
            written = self.pointer.write(new, replacing=current)
        except ConflictError:
            raise ConflictError("the pointer moved while flipping; nothing was written") from None
        record = {**written.to_json(), "from": current.version if current else None}
        try:
            self.objects.put_json(
                layout.history_key(self.name, new.sequence, new.action), record, if_absent=True
            )
        except ModelStoreError as exc:  # the flip stands; the gap in sequence shows it
            log.error("pointer flipped to %s but its history record failed: %s", new.version, exc)
        return written

    def _require_current(self) -> Pointer:
        current = self.pointer.read()
        if current is None:
            raise NotFoundError(f"model {self.name} has no pointer yet")
        return current

    def _next_number(self) -> int:
        folders = self.objects.list_folders(layout.versions_prefix(self.name))
        numbers = [n for f in folders if (n := layout.version_number(f)) is not None]
        return max(numbers, default=0) + 1

    def _key(self, version: str, filename: str) -> str:
        return layout.version_key(self.name, version, filename)


def _shape_metadata(shape: dict[str, Any], input_spec: dict[str, float] | None) -> dict[str, Any]:
    """The metadata's ``input`` and ``output``: the model's tensors and how to feed it."""
    _, height, width, channels = shape["input_shape"]
    return {
        "input": {
            "height": height,
            "width": width,
            "channels": channels,
            "dtype": shape["input_dtype"],
            **(input_spec or DEFAULT_INPUT_SPEC),
        },
        "output": {"size": shape["output_size"], "dtype": shape["output_dtype"]},
    }
