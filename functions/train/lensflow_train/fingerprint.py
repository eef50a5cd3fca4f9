"""What a round trained on, by content: the labelled set as (key, ETag, class) entries.

A count cannot tell a relabelled image (moved from ``labeled/forest/`` to
``labeled/field/``) or a replaced one (same key, new bytes) from no change at all; a set of
(key, ETag, class) entries can. Each round stores its set with the version it publishes
(``fingerprint.json``) and its digest in the version's metrics (``labeled_fingerprint``);
the next round counts the entries that are new or changed since then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

FILE = "fingerprint.json"
METRIC = "labeled_fingerprint"

Entry = tuple[str, str, str]  # (key, etag, class)


def entries(keys: Iterable[str], etags: Iterable[str], classes: Iterable[str]) -> list[Entry]:
    """The sorted entries of a split's parallel lists (ETags without their quotes)."""
    return sorted((k, e.strip('"'), c) for k, e, c in zip(keys, etags, classes, strict=True))


def digest(items: Iterable[Entry]) -> str:
    """sha256 over the sorted entries: equal sets, equal digests."""
    h = hashlib.sha256()
    for key, etag, cls in sorted(items):
        h.update(f"{key}\0{etag}\0{cls}\n".encode())
    return h.hexdigest()


def to_bytes(items: Iterable[Entry]) -> bytes:
    rows = sorted(items)
    return json.dumps({"digest": digest(rows), "entries": [list(r) for r in rows]}).encode()


def from_bytes(data: bytes) -> list[Entry]:
    """The entries of a ``fingerprint.json``; ValueError when it is not one or its digest
    does not match its entries."""
    try:
        value = json.loads(data)
        rows = [(str(k), str(e), str(c)) for k, e, c in value["entries"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a fingerprint file: {exc}") from None
    if value.get("digest") != digest(rows):
        raise ValueError("fingerprint file: digest does not match its entries")
    return rows


@dataclass(frozen=True)
class Change:
    new: int  # entries now that were not there (new images, relabelled or replaced ones)
    removed: int  # entries there before that are gone

    def to_dict(self) -> dict[str, int]:
        return {"new_or_changed": self.new, "removed": self.removed}


def compare(now: Iterable[Entry], before: Iterable[Entry]) -> Change:
    current, previous = set(now), set(before)
    return Change(new=len(current - previous), removed=len(previous - current))
