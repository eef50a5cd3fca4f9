"""The labelling queue as the predict function writes it: off the request's path, over libcurl.

``LabelWriter`` offers uncertain images on a background thread to
``lensflow_model_store.label_queue.LabelQueue``, which writes through the replica's libcurl
client (``lensflow_predict.curl_objects``), a batch of conditional PUTs in parallel: about
1.1 ms of a replica's CPU per queued image through boto3, ~0.21 ms through libcurl one at
a time, 0.14 ms in batches (docs/benchmarks.md, "The labelling queue on the replica's
core"). An offer the queue's in-memory record settles (full, already queued) is counted on
the request's thread and costs no request and no thread hand-off.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from lensflow_eventing.contracts import ObjectEvent
from lensflow_model_store.label_queue import LabelQueue
from lensflow_predict import metrics

log = logging.getLogger("lensflow.predict")
# A fresh model finds most pictures uncertain, and a person needs a few hundred of them,
# not each one; past this backlog offers are dropped (busy).
LABEL_BACKLOG = 64
# At most this many writes a second per replica (offers past it are counted ``paced``):
# the queue's 500 places fill in 50 s, for well under 1% of a core and a bounded load on
# the store, however many uncertain photos a new model version meets.
LABEL_WRITES_PER_S = 10.0  # why: docs/benchmarks.md, "The pacing, reviewed"


class LabelWriter:
    """Offers uncertain images to the labelling queue on a background thread, so that its
    S3 writes (conditional PUTs, now and then a LIST) never delay or fail a prediction.

    At most ``rate`` offers a second are written (past that they are counted ``paced``)
    and at most ``backlog`` wait or run at once (past that: ``busy``). Each write's
    outcome is counted when it completes. Offers wait in a deque that the writer drains
    ``BATCH_S`` after the first of a batch arrived, writing the batch's records in
    parallel: two seconds of offers cost one wake-up and one wait for the store.
    """

    BATCH_S = 2.0  # a record lands within about two seconds: nobody labels faster

    def __init__(
        self,
        queue: LabelQueue,
        backlog: int = LABEL_BACKLOG,
        rate: float = LABEL_WRITES_PER_S,
    ):
        self.queue = queue
        self.rate = rate
        self._tokens, self._refilled = rate, time.monotonic()  # a second's worth to start
        self._room = threading.BoundedSemaphore(backlog)
        self._pending: collections.deque = collections.deque()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="label-queue", daemon=True).start()

    def offer(self, record: ObjectEvent, etag, model: dict[str, str], predictions) -> None:
        """Hand the offer to the writer, or count it: never waits, never raises."""
        settled = self.queue.known(model["version"], record.bucket, record.key)
        if settled is not None:  # full, or queued already: nothing to write
            metrics.LABEL_QUEUE.labels(settled).inc()
            return
        if not self._paced():
            metrics.LABEL_QUEUE.labels("paced").inc()
            return
        if not self._room.acquire(blocking=False):
            metrics.LABEL_QUEUE.labels("busy").inc()
            return
        self._pending.append((record, etag, model, predictions))
        if not self._wake.is_set():
            self._wake.set()

    def _paced(self) -> bool:
        """Take a token of the writes-per-second bucket (no lock: two request threads
        racing may let one write more or fewer through, which does not matter)."""
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.BATCH_S)  # let a batch gather
            self._wake.clear()
            batch = [self._pending.popleft() for _ in range(len(self._pending))]
            if batch:
                self._write(batch)

    def _write(self, batch: list[tuple]) -> None:
        offers = [(r.bucket, r.key, etag, model, top) for r, etag, model, top in batch]
        try:
            outcomes = self.queue.offer_many(offers)
        except Exception as exc:  # counted and logged; the predictions are out
            outcomes = [exc] * len(batch)
        for (record, *_), outcome in zip(batch, outcomes, strict=True):
            self._room.release()
            if isinstance(outcome, Exception):
                log.warning("could not queue %s for labelling: %s", record.path, outcome)
                outcome = "error"
            metrics.LABEL_QUEUE.labels(outcome).inc()
