"""Where an isolated replica's time goes (issue 9): take one suspect away at a time.

Every variant is a predict replica pinned alone to the first CPU (as in
``bench/isolated_bench.py``, batching off so that only the suspect changes) draining the
same backlogs; the ratio to the bare loop on that CPU moves by what the suspect cost:

- ``baseline``: the replica as shipped (one interpreter per usable CPU), batching off;
- ``stages``: the baseline with each request's stages timed in thread CPU time;
- ``interpreters_3``: as many interpreters as the old sizing made on a 2-CPU machine
  (``min(THREADS, os.cpu_count()) + 1``), though it may use one CPU;
- ``no_s3``: the image GET replaced by the same bytes from memory;
- ``no_kafka_ack``: the prediction produced without waiting for the broker's ack;
- ``no_watcher``: the model pointer never polled (TTL of a day);
- ``no_metrics``: no per-event Prometheus observation, count or log line;
- ``no_log``: ``LENSFLOW_LOG_LEVEL=WARNING`` (no per-event log line);
- ``no_thread_hop``: the event loop runs the handler itself (no hand-off to a request
  thread and back; the loop blocks meanwhile, so this is a measure, not a design);
- ``threads_2``: ``THREADS=2`` request threads instead of 4 (the dispatcher keeps 4 in flight);
- ``sched_batch``: every thread of the replica ``SCHED_BATCH``: a thread woken by its I/O
  does not preempt an invoke under way.

py-spy (``--native``, active samples) profiles the baseline replica during one more backlog:
``bench/results/profiles/baseline.txt`` (collapsed stacks), summarised by stage in
``gap.json``. The server (uvicorn, Starlette), CloudEvent parsing and JSON are read off that
profile.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from bench.common import write_json
from bench.isolated_bench import PROFILES, Spec, measure

BACKLOGS = int(os.environ.get("LENSFLOW_BENCH_GAP_BACKLOGS", "3"))
OFF = {"LENSFLOW_BATCH_DELAY_MS": "0"}

NO_S3 = """
import lensflow_predict.fetch as _fetch
from lensflow.scenes import CLASSES, scene_jpeg
_photos = [scene_jpeg(CLASSES[i % len(CLASSES)], i, (640, 480), 88) for i in range(16)]
def _from_memory(self, bucket, key):
    return _photos[int(key.rsplit("/", 1)[1].split(".")[0]) % 16], '"etag"'
_fetch.ImageFetcher.fetch = _from_memory
"""
NO_KAFKA_ACK = """
import lensflow_predict.sink as _sink
import lensflow_eventing.producer as _producer
def _no_wait(producer, topic, message, timeout_s, polled=False):  # produced, but nobody waits for the ack
    _producer.send(producer, topic, message.key, message.value, message.headers)
    producer.poll(0)
_sink.produce_and_wait = _no_wait
"""
# The per-event Prometheus observations and counts, and the log line, taken away.
NO_METRICS = """
import lensflow_predict.handler as _handler
_handler._observe = lambda *args: None
"""
# One request thread fewer in the hand-off: the event loop calls the handler itself (the
# loop blocks while it runs: fine for this measure, not for serving).
NO_THREAD_HOP = """
import lensflow_predict.main as _main
async def _inline(function, *args):
    return function(*args)
_main._on_thread = _inline
"""
# Every thread of the replica SCHED_BATCH (inherited by the worker and its threads): a
# thread woken by its I/O (an S3 answer, a Kafka ack) no longer preempts an invoke.
SCHED_BATCH = """
import os
os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
"""
THREE_INTERPRETERS = """
import lensflow_core.cpus as _cpus
_cpus.usable_cpus = lambda *args, **kwargs: 3
"""

# Thread CPU time of each stage of every request (a request runs on one thread, so
# time.thread_time() deltas are exact), summed; /stats reports them as stage_cpu_s.
STAGE_CPU = """
import collections, json, threading, time
import lensflow_predict.app as _app
import lensflow_predict.fetch as _fetch
import lensflow_predict.handler as _handler
import lensflow_predict.sink as _sink
import lensflow_core.runtime as _runtime
_cpu = collections.Counter()
_lock = threading.Lock()
def _timed(owner, name, label):
    original = getattr(owner, name)
    def timed(*args, **kwargs):
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            with _lock:
                _cpu[label] += time.thread_time() - started
    setattr(owner, name, timed)
_timed(_app.PredictApp, "answer", "handler thread: all of it")
_timed(_handler.PredictHandler, "handle", "function handler")
_timed(_handler.PredictHandler, "_parse_cloudevent", "CloudEvent parse")
_timed(_fetch.ImageFetcher, "fetch", "S3 GET")
_timed(_handler, "decode_image", "decode")
_timed(_runtime.LiteModel, "tensor", "resize + normalise")
_timed(_runtime.LiteModel, "scores", "invoke")
_timed(_handler, "prediction_event", "prediction event")
_timed(_sink.PredictionProducer, "send", "Kafka produce + ack")
_stats = _app.PredictApp.stats
_app.PredictApp.stats = lambda self: {**_stats(self), "stage_cpu_s": dict(_cpu)}
"""

SPECS = (
    Spec("baseline", env=OFF),
    Spec("stages", env=OFF, prelude=STAGE_CPU),
    Spec("interpreters_3", env=OFF, prelude=THREE_INTERPRETERS),
    Spec("no_s3", env=OFF, prelude=NO_S3),
    Spec("no_kafka_ack", env=OFF, prelude=NO_KAFKA_ACK),
    Spec("no_watcher", env={**OFF, "LENSFLOW_POINTER_TTL_S": "86400"}),
    Spec("no_metrics", env=OFF, prelude=NO_METRICS),
    Spec("no_log", env={**OFF, "LENSFLOW_LOG_LEVEL": "WARNING"}),
    Spec("no_thread_hop", env=OFF, prelude=NO_THREAD_HOP),
    Spec("threads_2", env={**OFF, "THREADS": "2"}),
    Spec("sched_batch", env=OFF, prelude=SCHED_BATCH),
)

# Where a sample is, by the first matching frame (innermost first): stage name, pattern.
STAGES = (
    ("invoke (LiteRT)", "ai_edge_litert"),
    ("resize + normalise", "to_input ("),
    ("decode (Pillow)", "decode_image ("),
    ("S3 GET (libcurl)", "ImageFetcher.fetch"),
    ("Kafka produce + ack", "produce_and_wait"),
    ("CloudEvent parse", "_parse_cloudevent"),
    ("prediction event", "prediction_event ("),
    ("JSON", "json/"),
    ("model watcher", "model-watcher"),
    ("labelling queue", "label-queue"),
    ("Kafka poller", "kafka-poller"),
    ("metrics + log line", "_observe ("),
    ("uvicorn + Starlette + functions-framework (the rest of a request)", "uvicorn"),
)


def summarise_profile(path: Path) -> dict:
    """Share of the replica's active Python-thread samples by stage (py-spy raw output:
    one collapsed stack and its count a line), each sample counted once, for the first
    stage in ``STAGES`` any of its frames matches."""
    active: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        stage = next(
            (name for name, pattern in STAGES if any(pattern in f for f in frames)), "other"
        )
        active[stage] += int(count)
    total = sum(active.values())
    return {
        "active_samples": total,
        "share_by_stage": {k: round(v / total, 3) for k, v in active.most_common()},
    }


def run(out_dir: Path) -> dict:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    profile = {"baseline": 4.0} if Path(spy).exists() else {}
    wanted = os.environ.get("LENSFLOW_BENCH_GAP_VARIANTS", "")  # a comma list: only these
    specs = [s for s in SPECS if not wanted or s.name in wanted.split(",")]
    result = measure(
        specs, BACKLOGS, profile=profile if "baseline" in [s.name for s in specs] else {}
    )
    base = result["baseline"]
    result["gain_over_baseline"] = {
        s.name: round(result[s.name]["ratio"] / base["ratio"], 3) for s in specs
    }
    if (PROFILES / "baseline.txt").exists():
        result["baseline_profile"] = summarise_profile(PROFILES / "baseline.txt")
    write_json(out_dir, "gap", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
