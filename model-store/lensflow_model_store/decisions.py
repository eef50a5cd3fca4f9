"""The labelling decisions: who labelled which image as what, when, and who undid it.

One object per decision in the train bucket, never rewritten::

    decisions/<sha256("<bucket>/<key>")[:32]>/<sequence:06d>.json

Each is written with If-None-Match ``*`` at the image's next sequence number, read just
before: a compare-and-swap on the image's decisions, as the pointer's history is on flips.
Of two people labelling one photo at once exactly one writes decision n, the other gets
``ConflictError`` and writes nothing else. A decision is written before its copy, so it
doubles as the claim on the image; it keeps the queue records it took off the queue, so an
undo can put them back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lensflow_model_store.errors import NotFoundError
from lensflow_model_store.label_queue import image_id
from lensflow_model_store.layout import DECISIONS
from lensflow_model_store.objects import Objects
from lensflow_model_store.pointer import utc_now

LABEL, UNDO = "label", "undo"


@dataclass
class Decision:
    image: str  # <bucket>/<key>
    action: str  # label | undo
    by: str
    sequence: int = 1
    at: str = field(default_factory=utc_now)
    cls: str = ""
    split: str = ""
    target: str = ""  # <split>/<class>/<name> in the train bucket
    etag: str = ""  # the image's, as copied
    copied: bool = False  # False: the copy was there already (undo leaves it)
    replaced: list[str] = field(default_factory=list)  # a move from another class
    requeue: list[dict[str, Any]] = field(default_factory=list)  # queue records taken off
    undoes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Decision:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in value.items() if k in known})


def decisions_prefix(bucket: str, key: str) -> str:
    return f"{DECISIONS}/{image_id(bucket, key)}/"


class DecisionLog:
    """The decisions of the train bucket ``objects``."""

    def __init__(self, objects: Objects):
        self.objects = objects

    def of(self, bucket: str, key: str) -> list[Decision]:
        """Every decision about one image, oldest first."""
        out = []
        for record in sorted(self.objects.list_keys(decisions_prefix(bucket, key))):
            try:
                body, _ = self.objects.get(record)  # type: ignore[misc]
            except NotFoundError:
                continue
            out.append(Decision.from_json(json.loads(body)))
        return out

    def in_effect(self, decisions: list[Decision]) -> Decision | None:
        """The label that stands (the last decision, unless it was undone)."""
        last = decisions[-1] if decisions else None
        return last if last is not None and last.action == LABEL else None

    def append(self, decision: Decision) -> Decision:
        """Write ``decision`` at its sequence number; ConflictError if someone did first."""
        bucket, _, key = decision.image.partition("/")
        record = f"{decisions_prefix(bucket, key)}{decision.sequence:06d}.json"
        self.objects.put_json(record, decision.to_json(), if_absent=True)
        return decision
