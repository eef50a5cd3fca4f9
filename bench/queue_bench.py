"""What a queued photo costs a predict replica's core (issue 22).

The labelling queue as the predict function runs it (``LabelWriter`` over ``LabelQueue``,
the shipped pacing and batching) against the bench's S3 server (moto) pinned to another
CPU, with this process pinned to the first: every photo of a replica's stream uncertain,
each a new image of a new model version (the worst case: a new version's first minute).
Measured in thread CPU time, so other work on a shared machine is left out:

- ``request_ms``: the request thread's part of an offer (the in-memory record, the pacing,
  the hand-off), per offer;
- ``write_ms``: all the writer thread's CPU (its wake-ups, the batch's conditional PUTs,
  their JSON and signatures, now and then a LIST), per record written;
- for the libcurl client the replica uses, and for boto3 (the client before issue 22);
- ``lone``: offers a batch apart, so each batch holds one record (uncertain photos rare);
- and an offer once the version's queue is full (``full_request_ms``: no request at all).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

from bench.common import write_json

SECONDS = float(os.environ.get("LENSFLOW_BENCH_QUEUE_SECONDS", "12"))
REPEATS = 3
SPACING_S = 0.004  # a replica's pace: ~250 offers a second at most
LONE = 8  # offers a batch apart


def _writer(queue):
    """A ``LabelWriter`` over ``queue`` and its thread's CPU clock."""
    from lensflow_predict.labels import LabelWriter

    before = set(threading.enumerate())
    writer = LabelWriter(queue)
    (thread,) = set(threading.enumerate()) - before
    return writer, time.pthread_getcpuclockid(thread.ident)


def _measure(queue, version: str, offers: int, spacing_s: float) -> dict[str, float]:
    """Request ms per offer, writer ms per record written, records and batches written,
    for ``offers`` new images ``spacing_s`` apart."""
    from lensflow_eventing.contracts import ObjectEvent

    writer, clock = _writer(queue)
    warm = ObjectEvent("s3:ObjectCreated:Put", "drone-images", f"{version}/warm.jpg", "e")
    writer.offer(warm, "e", {"name": "bench", "version": f"{version}-warm"}, [])
    time.sleep(writer.BATCH_S + 1.0)  # its thread's handles and connections: once a replica
    batches: list[int] = []
    offer_many = queue.offer_many

    def counted(many):
        batches.append(len(many))
        return offer_many(many)

    queue.offer_many = counted
    model = {"name": "bench", "version": version, "sha256": "ab" * 32}
    top = [{"label": "a", "score": 0.4}, {"label": "b", "score": 0.35}]
    request, written = 0.0, time.clock_gettime(clock)
    for i in range(offers):
        record = ObjectEvent("s3:ObjectCreated:Put", "drone-images", f"{version}/{i}.jpg", "e")
        started = time.thread_time()
        writer.offer(record, "e", model, top)
        request += time.thread_time() - started
        time.sleep(spacing_s)
    time.sleep(writer.BATCH_S + 1.0)  # the last batch is written
    written = time.clock_gettime(clock) - written
    return {
        "request_ms": request * 1000 / offers,
        "write_ms": written * 1000 / max(1, sum(batches)),
        "writes": sum(batches),
        "batches": len(batches),
    }


def run(out_dir: Path) -> dict:
    from lensflow.servers import S3Server
    from lensflow_core.s3 import ensure_buckets, s3_client
    from lensflow_core.s3_get import ObjectGetter
    from lensflow_core.settings import Config
    from lensflow_model_store.label_queue import LabelQueue
    from lensflow_predict.curl_objects import CurlObjects
    from lensflow_predict.labels import LabelWriter

    cpus = sorted(os.sched_getaffinity(0))
    offers = int(SECONDS / SPACING_S)
    result: dict = {"offers": offers, "repeats": REPEATS, "cpus": cpus}
    result["batch_s"] = LabelWriter.BATCH_S
    with S3Server() as server:
        os.sched_setaffinity(server.proc.pid, {cpus[-1]})
        os.sched_setaffinity(0, {cpus[0]})
        config = Config.from_env({"LENSFLOW_S3_ENDPOINT": server.endpoint})
        s3 = s3_client(config)
        ensure_buckets(s3, [config.train_bucket])
        curl = CurlObjects(ObjectGetter(config), config.train_bucket)
        plans = [("libcurl", curl, offers, SPACING_S)] * REPEATS
        plans.insert(1, ("boto3", None, offers, SPACING_S))  # LabelQueue's default objects
        plans.append(("lone", curl, LONE, LabelWriter.BATCH_S + 0.2))
        runs: dict[str, list[dict[str, float]]] = {}
        for i, (name, objects, count, spacing) in enumerate(plans):
            queue = LabelQueue(s3, config.train_bucket, 10**6, objects)
            runs.setdefault(name, []).append(_measure(queue, f"{name}-{i}", count, spacing))
        full = LabelQueue(s3, config.train_bucket, 1, curl)
        _measure(full, "full", 1, 0.0)
        result["full_request_ms"] = round(_measure(full, "full", 400, SPACING_S)["request_ms"], 4)
    os.sched_setaffinity(0, set(cpus))
    for name, got in runs.items():
        result[name] = {k: round(statistics.median(r[k] for r in got), 4) for k in got[0]}
        result[name]["runs"] = got
    result["writes_per_s"] = round(result["libcurl"]["writes"] / SECONDS, 1)
    curl_ms = result["libcurl"]
    result["libcurl_per_queued_photo_ms"] = round(curl_ms["request_ms"] + curl_ms["write_ms"], 3)
    result["targets"] = {"queued_photo<=0.2ms": result["libcurl_per_queued_photo_ms"] <= 0.2}
    write_json(out_dir, "queue", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
