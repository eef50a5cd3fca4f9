"""lensflow's model store: versions, the manifest pointer, compare-and-swap flips, history."""

from model_store.errors import (
    ConflictError,
    IntegrityError,
    InvalidModelError,
    ModelStoreError,
    NotFoundError,
    PinnedError,
    StoreUnavailableError,
)
from model_store.integrity import parse_labels, sha256_hex
from model_store.lease import Lease, LeaseFile, LeaseHeldError
from model_store.pointer import Pointer, PointerFile
from model_store.store import NO_POINTER, ModelStore, VersionInfo

__all__ = [
    "ConflictError",
    "IntegrityError",
    "InvalidModelError",
    "Lease",
    "LeaseFile",
    "LeaseHeldError",
    "ModelStore",
    "ModelStoreError",
    "NO_POINTER",
    "NotFoundError",
    "PinnedError",
    "Pointer",
    "PointerFile",
    "StoreUnavailableError",
    "VersionInfo",
    "parse_labels",
    "sha256_hex",
]
