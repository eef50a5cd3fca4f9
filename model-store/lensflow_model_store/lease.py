"""The training lease ``<name>/lock.json``: at most one round trains a model at a time.

A lock object in the model bucket, written only by conditional PUT, like the pointer:

- **acquire**: PUT with If-None-Match ``*``. Exactly one of any number of concurrent
  acquirers creates the object; the others get 412 and read who holds it.
- **take over** a lease whose ``expires_at`` has passed (its holder crashed or was killed):
  PUT with If-Match on the ETag just read, so of several late-comers only one wins.
- **release**: DELETE, only while the object's ETag is still the one our PUT returned (a
  holder whose lease expired and was taken over deletes nothing).

The body says who holds it and until when: ``{"holder", "acquired_at", "expires_at"}``
(ISO-8601 UTC, plus ``expires_at_s``, seconds since the epoch, which is what is compared).
The TTL must outlast the longest round (the training Job's ``activeDeadlineSeconds``):
nothing renews a lease.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from lensflow_model_store.errors import ConflictError, ModelStoreError, NotFoundError
from lensflow_model_store.layout import lease_key
from lensflow_model_store.objects import Objects


class LeaseHeldError(ModelStoreError):
    """Another holder's lease has not expired: this round must not train."""

    def __init__(self, lease: Lease | None, message: str):
        super().__init__(message)
        self.lease = lease


@dataclass(frozen=True)
class Lease:
    holder: str
    acquired_at_s: float
    expires_at_s: float
    etag: str | None = None

    def to_json(self) -> dict:
        return {
            "holder": self.holder,
            "acquired_at": _iso(self.acquired_at_s),
            "expires_at": _iso(self.expires_at_s),
            "acquired_at_s": self.acquired_at_s,
            "expires_at_s": self.expires_at_s,
        }

    @classmethod
    def from_json(cls, data: dict, etag: str | None) -> Lease:
        try:
            return cls(
                str(data["holder"]),
                float(data["acquired_at_s"]),
                float(data["expires_at_s"]),
                etag,
            )
        except (KeyError, TypeError, ValueError):
            # unreadable: treat as expired long ago, so it can be taken over (by If-Match)
            return cls("(unreadable lease)", 0.0, 0.0, etag)

    def describe(self) -> str:
        return f"held by {self.holder} until {_iso(self.expires_at_s)}"


def _iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def default_holder() -> str:
    """Who we are, for the lock's body: host (the Job's pod name), pid and a random tag."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class LeaseFile:
    """Acquire and release the training lease of one model."""

    def __init__(
        self,
        objects: Objects,
        name: str,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ):
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, not {ttl_s}")
        self.objects = objects
        self.key = lease_key(name)
        self.ttl_s = ttl_s
        self.clock = clock

    def read(self) -> Lease | None:
        try:
            body, etag = self.objects.get(self.key)  # type: ignore[misc]
        except NotFoundError:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        return Lease.from_json(data if isinstance(data, dict) else {}, etag)

    def acquire(self, holder: str | None = None) -> Lease:
        """Our lease, or LeaseHeldError while another unexpired one exists.

        StoreUnavailableError (and other ModelStoreErrors) when the store cannot say.
        """
        now = self.clock()
        mine = Lease(holder or default_holder(), now, now + self.ttl_s)
        try:
            etag = self.objects.put_json(self.key, mine.to_json(), if_absent=True)
            return Lease(mine.holder, mine.acquired_at_s, mine.expires_at_s, etag)
        except ConflictError:
            pass
        current = self.read()
        if current is None:  # released between our PUT and our read: no second try, say so
            raise LeaseHeldError(None, "another round holds the lease (it was just released)")
        if current.expires_at_s > now:
            raise LeaseHeldError(current, f"another round holds the lease ({current.describe()})")
        try:
            etag = self.objects.put_json(self.key, mine.to_json(), if_match=current.etag)
        except ConflictError:
            raise LeaseHeldError(
                None, "another round holds the lease (it took over the expired one first)"
            ) from None
        return Lease(mine.holder, mine.acquired_at_s, mine.expires_at_s, etag)

    def release(self, lease: Lease) -> bool:
        """Delete the lock if it is still ``lease``; whether it was (False: expired and
        taken over, or already gone; nothing is deleted then)."""
        current = self.read()
        if current is None or current.etag != lease.etag:
            return False
        self.objects.delete(self.key, if_match=lease.etag)
        return True
