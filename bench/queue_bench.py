"""What a queued photo costs a predict replica's core (issue 22).

The labelling queue as the predict function runs it (``LabelWriter`` over ``LabelQueue``)
against the bench's S3 server (moto) pinned to another CPU, with this process pinned to
the first: a burst of uncertain offers, every one a new image of a new model version
(the worst case), paced like a replica's requests. Measured in thread CPU time, so other
work on a shared machine is left out:

- ``request_ms``: the request thread's part of an offer (the in-memory record, the pacing,
  the hand-off), per offer;
- ``write_ms``: the writer's part, per record written (the conditional PUT, its JSON and
  signature, now and then a LIST);
- for the libcurl client the replica uses, and for boto3 (the client before issue 22);
- and an offer once the version's queue is full (``full_request_ms``: no request at all).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench.common import write_json

OFFERS = int(os.environ.get("LENSFLOW_BENCH_QUEUE_OFFERS", "400"))
REPEATS = 3
SPACING_S = 0.004  # a replica's pace: ~250 offers a second at most


def _measure(writer, queue, version: str, offers: int) -> tuple[float, float, int]:
    """(request ms per offer, writer ms per write, writes) for ``offers`` new images."""
    from lensflow_eventing.contracts import ObjectEvent

    spent: list[float] = []
    offer = queue.offer

    def timed(*args):
        started = time.thread_time()
        try:
            return offer(*args)
        finally:
            spent.append(time.thread_time() - started)

    queue.offer = timed
    model = {"name": "bench", "version": version, "sha256": "ab" * 32}
    top = [{"label": "a", "score": 0.4}, {"label": "b", "score": 0.35}]
    request = 0.0
    for i in range(offers):
        record = ObjectEvent("s3:ObjectCreated:Put", "drone-images", f"{version}/{i}.jpg", "e")
        started = time.thread_time()
        writer.offer(record, "e", model, top)
        request += time.thread_time() - started
        time.sleep(SPACING_S)
    time.sleep(1.5)  # the writers finish
    queue.offer = offer
    return request * 1000 / offers, sum(spent) * 1000 / max(1, len(spent)), len(spent)


def run(out_dir: Path) -> dict:
    from lensflow.servers import S3Server
    from lensflow_core.s3 import ensure_buckets, s3_client
    from lensflow_core.s3_get import ObjectGetter
    from lensflow_core.settings import Config
    from lensflow_model_store.label_queue import LabelQueue
    from lensflow_predict.curl_objects import CurlObjects
    from lensflow_predict.labels import LabelWriter

    cpus = sorted(os.sched_getaffinity(0))
    result: dict = {"offers": OFFERS, "repeats": REPEATS, "cpus": cpus}
    with S3Server() as server:
        os.sched_setaffinity(server.proc.pid, {cpus[-1]})
        os.sched_setaffinity(0, {cpus[0]})
        config = Config.from_env({"LENSFLOW_S3_ENDPOINT": server.endpoint})
        s3 = s3_client(config)
        ensure_buckets(s3, [config.train_bucket])
        clients = {
            "libcurl": CurlObjects(ObjectGetter(config), config.train_bucket),
            "boto3": None,  # LabelQueue's default: boto3's Objects
        }
        runs: dict[str, dict[str, list[float]]] = {}
        for repeat in range(REPEATS):
            for name, objects in clients.items():  # taking turns: drifting load hits both
                queue = LabelQueue(s3, config.train_bucket, 10**6, objects)
                writer = LabelWriter(queue, rate=10**6)  # unpaced: the cost of each write
                request, write, writes = _measure(writer, queue, f"{name}-{repeat}", OFFERS)
                got = runs.setdefault(name, {"request_ms": [], "write_ms": [], "writes": []})
                got["request_ms"].append(request)
                got["write_ms"].append(write)
                got["writes"].append(writes)
        full = LabelQueue(s3, config.train_bucket, 1, clients["libcurl"])
        writer = LabelWriter(full)
        _measure(writer, full, "full", 1)
        result["full_request_ms"] = round(_measure(writer, full, "full", OFFERS)[0], 4)
    os.sched_setaffinity(0, set(cpus))
    for name, got in runs.items():
        result[name] = {key: round(statistics.median(v), 4) for key, v in got.items()}
    curl = result["libcurl"]
    result["libcurl_per_queued_photo_ms"] = round(curl["request_ms"] + curl["write_ms"], 3)
    result["targets"] = {"queued_photo<=0.2ms": result["libcurl_per_queued_photo_ms"] <= 0.2}
    write_json(out_dir, "queue", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
