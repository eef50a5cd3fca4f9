"""lensflow's model store: versions, the manifest pointer, compare-and-swap flips, history."""

from lensflow_model_store.errors import (
    ConflictError,
    IntegrityError,
    InvalidModelError,
    ModelStoreError,
    NotFoundError,
    PinnedError,
    StoreUnavailableError,
)
from lensflow_model_store.integrity import parse_labels, sha256_hex
from lensflow_model_store.lease import Lease, LeaseFile, LeaseHeldError
from lensflow_model_store.pointer import Pointer, PointerFile
from lensflow_model_store.store import NO_POINTER, ModelStore, VersionInfo

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
