"""What can go wrong in the model store, as exception types a caller can act on."""


class ModelStoreError(Exception):
    """Base class of model store errors."""


class NotFoundError(ModelStoreError):
    """A version, file or pointer does not exist."""


class ConflictError(ModelStoreError):
    """The pointer moved: a stale --expect or a concurrent flip. Nothing was written."""


class PinnedError(ModelStoreError):
    """The pointer is pinned by an operator; automatic promotion must wait."""


class InvalidModelError(ModelStoreError):
    """The model does not load, or its labels do not match its output."""


class IntegrityError(ModelStoreError):
    """Stored bytes do not match their recorded sha256."""


class StoreUnavailableError(ModelStoreError):
    """The object store could not be reached or answered with a server error."""
