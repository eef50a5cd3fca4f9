"""A scripted labeller for the demo: takes the most uncertain queued photos and labels them
with the simulator's ground truth.

The simulated drones store each photo's true class as object metadata (``x-amz-meta-class``);
a person would look at the photo instead. This labeller only ever writes ``labeled/``: the
holdout takes human labels only (``lensflow label holdout``), never scripted ones.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lensflow_core.settings import Config
from lensflow_model_store.label_images import label
from lensflow_model_store.label_queue import LabelQueue
from lensflow_model_store.layout import LABELED

BY = "demo-labeller (simulator ground truth)"


def label_queued(config: Config, s3, budget: int, known_labels: list[str] | None) -> dict[str, Any]:
    """Label up to ``budget`` of the most uncertain queued photos; what was labelled.

    Photos without ground truth (not the simulator's) are left on the queue.
    """
    queue = LabelQueue(s3, config.train_bucket, config.label_queue_max)
    pending = queue.pending()
    by_class: dict[str, list[str]] = defaultdict(list)
    chosen = 0
    for entry in pending:
        if chosen >= budget:
            break
        head = s3.head_object(Bucket=entry.bucket, Key=entry.key)
        truth = head.get("Metadata", {}).get("class")
        if not truth or (known_labels is not None and truth not in known_labels):
            continue
        by_class[truth].append(entry.path)
        chosen += 1
    done = []
    for cls, paths in sorted(by_class.items()):
        done += label(
            s3,
            train_bucket=config.train_bucket,
            image_buckets=config.image_buckets,
            known_labels=known_labels,
            cls=cls,
            paths=paths,
            split=LABELED,
            by=BY,
            queue=queue,
        )
    return {
        "queued": len(pending),
        "labelled": len(done),
        "per_class": {cls: len(paths) for cls, paths in sorted(by_class.items())},
    }
