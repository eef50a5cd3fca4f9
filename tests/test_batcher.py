"""Dynamic micro-batching: requests waiting together run as one invoke, with the same
scores each would get alone; a request alone is not held back."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lensflow.scenes import CLASSES, render_scene
from lensflow_core.runtime import LiteModel
from lensflow_predict.batcher import Batcher


@pytest.fixture
def runtime(tiny_models) -> LiteModel:
    return LiteModel(tiny_models["random"], max_interpreters=1)


def test_requests_on_their_way_are_batched_and_score_as_alone(runtime):
    batcher = Batcher(workers=1, max_batch=4, delay_s=5.0)
    tensors = [runtime.tensor(render_scene(CLASSES[i], i, (64, 48))) for i in range(4)]
    alone = [runtime.scores(t) for t in tensors]
    got: list = [None] * 4
    ready = threading.Barrier(4)

    def request(i: int) -> None:
        with batcher.coming():  # all four inside the replica before any hands over
            ready.wait()
            time.sleep(0.05 * i)  # arriving one after another, well within the delay
            got[i] = batcher.scores(runtime, tensors[i])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop()
    assert time.monotonic() - started < 4  # ran once all four were in, not after the delay
    assert batcher.stats.sizes == {4: 1}
    for g, a in zip(got, alone, strict=True):
        assert np.allclose(g, a, atol=1e-6)


def test_a_request_alone_is_not_held_for_the_delay(runtime):
    batcher = Batcher(workers=1, max_batch=4, delay_s=30.0)
    tensor = runtime.tensor(render_scene("forest", 1, (64, 48)))
    started = time.monotonic()
    with batcher.coming():
        scores = batcher.scores(runtime, tensor)
    assert time.monotonic() - started < 10
    assert np.allclose(scores, runtime.scores(tensor))
    batcher.stop()


def test_a_failed_invoke_fails_every_request_of_its_batch(runtime):
    batcher = Batcher(workers=1, max_batch=4, delay_s=0.01)
    with pytest.raises(ValueError):
        batcher.scores(runtime, np.zeros((1, 5, 5, 3), np.float32))  # wrong shape
    batcher.stop()
