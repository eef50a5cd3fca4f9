"""Dynamic micro-batching of invokes, after Triton's dynamic batcher (kept small).

Request threads fetch, decode and preprocess; then ``Batcher.scores`` hands the input
tensor to one of ``workers`` inference threads (one per CPU the replica may use, each
with its own interpreter), and waits for its scores. A worker takes the oldest waiting
request and joins to it others waiting for the same model, up to ``max_batch``; it waits
for more at most ``delay_s`` after the first arrived, and only while another request is
on its way (inside the replica, not yet handed over: ``coming``). A request alone is
never held back. The batch runs as one invoke (``LiteModel.scores_batch``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from lensflow_core.runtime import LiteModel


@dataclass
class _Waiting:
    runtime: LiteModel
    tensor: np.ndarray
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> batches


class Batcher:
    def __init__(self, workers: int, max_batch: int, delay_s: float):
        self.max_batch = max(1, max_batch)
        self.delay_s = max(0.0, delay_s)
        self.stats = BatchStats()
        self._queue: deque[_Waiting] = deque()
        self._coming = 0
        self._local = threading.local()
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._work, name=f"infer-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Around a request that may reach ``scores``: while it is on its way, a worker
        holding a partial batch waits (up to the delay) for it."""
        with self._cond:
            self._coming += 1
        self._local.coming = True
        try:
            yield
        finally:
            self._arrived()

    def scores(self, runtime: LiteModel, tensor: np.ndarray) -> np.ndarray:
        """float32 scores of one picture (``runtime.tensor``), batched with others waiting."""
        waiting = _Waiting(runtime, tensor)
        with self._cond:
            self._queue.append(waiting)
            self._cond.notify_all()
        self._arrived()
        return waiting.future.result()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5)

    def _arrived(self) -> None:
        if getattr(self._local, "coming", False):
            self._local.coming = False
            with self._cond:
                self._coming -= 1
                self._cond.notify_all()

    def _take(self) -> list[_Waiting] | None:
        with self._cond:
            while not self._queue:
                if self._stop:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            deadline = first.arrived + self.delay_s
            while True:
                for item in [w for w in self._queue if w.runtime is first.runtime]:
                    if len(batch) == self.max_batch:
                        break
                    self._queue.remove(item)
                    batch.append(item)
                left = deadline - time.monotonic()
                if len(batch) == self.max_batch or self._coming == 0 or left <= 0:
                    return batch
                self._cond.wait(left)

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            try:
                tensors = np.concatenate([w.tensor for w in batch])
                scores = batch[0].runtime.scores_batch(tensors)
            except Exception as exc:  # every waiting request answers, none hangs
                for w in batch:
                    w.future.set_exception(exc)
                continue
            with self._cond:
                self.stats.batches += 1
                self.stats.images += len(batch)
                self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
            for w, s in zip(batch, scores, strict=True):
                w.future.set_result(s)
