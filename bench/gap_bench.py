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
  does not preempt an invoke under way;
- ``ack_on_thread``: the broker's ack awaited on the request thread (as before issue 22),
  not on the event loop;
- ``floor_asgi`` and ``floor_ff``: not the replica but the least work a prediction needs
  per event (GET, decode, invoke, the prediction produced and acknowledged), on bare
  uvicorn and under functions-framework (``FLOOR`` below);
- ``floor_contract``: ``floor_ff`` plus what the contract keeps per event (the CloudEvents
  SDK's parse and reply, the notification's parse, trace context, metrics).

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
import dataclasses
import lensflow_predict.app as _app
_answer = _app.PredictApp.answer
def _no_wait(self, headers, body):  # produced, but nobody waits for the ack
    return dataclasses.replace(_answer(self, headers, body), unacked=())
_app.PredictApp.answer = _no_wait
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
# The broker's ack awaited on a request thread, as before issue 22 (the thread blocks until
# the poller thread wakes it), instead of on the event loop.
ACK_ON_THREAD = """
import lensflow_predict.app as _app
_app.PredictApp.answer = lambda self, headers, body: self.handler.handle(headers, body)
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

# The floor (issue 22): the least a replica can do per event and still answer with a
# prediction produced and acknowledged, served by uvicorn with no framework: the body read
# on the event loop, one hop to a thread for the GET, decode and invoke (the same code the
# replica runs), the prediction CloudEvent produced from the loop and its ack awaited
# there, a small JSON answer. No log line, no metrics, no trace context, no labelling
# queue. If this cannot reach a ratio, no arrangement of the replica's own code can;
# ``floor_ff`` is the same work under functions-framework's ASGI decorator, to see what the
# framework itself costs.
FLOOR = """
import asyncio, json, os, resource, sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote_plus
from lensflow_core.imaging import decode_image
from lensflow_eventing.contracts import ObjectEvent, prediction_event
from lensflow_predict.app import get_replica
from lensflow_predict.sink import ProduceError
_pool = ThreadPoolExecutor(int(os.environ.get("THREADS", "4")))

def _work(replica, bucket, key):
    data, etag = replica.handler.fetcher.fetch(bucket, key)
    model = replica.watcher.model
    side = max(model.spec.height, model.spec.width)
    image = decode_image(data, (side, side), max_pixels=replica.config.max_image_pixels)
    return etag, model, model.predict(image)

async def _floor(body: bytes, event_id: str):
    loop = asyncio.get_running_loop()
    replica = get_replica()
    s3 = json.loads(body)["Records"][0]["s3"]
    bucket, key = s3["bucket"]["name"], unquote_plus(s3["object"]["key"])
    etag, model, predictions = await loop.run_in_executor(_pool, _work, replica, bucket, key)
    event = prediction_event(
        image=ObjectEvent("s3:ObjectCreated:Put", bucket, key, etag),
        model=model.identity, predictions=predictions, source_event_id=event_id,
    )
    data = json.dumps(event.data).encode()
    try:
        await asyncio.wrap_future(replica.handler.producer.produce(event, data))
    except ProduceError:
        return 503, data
    return 200, data

def _get(path):
    replica = get_replica()
    if path == "/stats":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return 200, json.dumps({"max_rss_mb": round(rss, 1)}).encode()
    status, body = replica.health()
    return status, json.dumps(body).encode()
"""
FLOOR_ASGI = (
    FLOOR
    + """
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":
        status, body = await asyncio.get_running_loop().run_in_executor(_pool, _get, scope["path"])
    else:
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        event_id = dict(scope["headers"]).get(b"ce-id", b"").decode()
        status, body = await _floor(b"".join(chunks), event_id)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

_port = int(sys.argv[sys.argv.index("--port") + 1])
uvicorn.run(app, host="127.0.0.1", port=_port, loop="uvloop", http="httptools",
            log_level="warning", access_log=False, lifespan="off")
raise SystemExit(0)
"""
)
# Serves ``_post(request) -> (status, headers, body)`` under functions-framework's ASGI
# decorator: the tail of ``floor_ff`` and ``floor_contract``.
FF_SERVE = """
import tempfile
import functions_framework.aio
from starlette.responses import Response

@functions_framework.aio.http
async def predict(request):
    if request.method == "GET":
        status, body = await asyncio.get_running_loop().run_in_executor(_pool, _get, request.url.path)
        return Response(body, status, media_type="application/json")
    status, headers, body = await _post(request)
    return Response(body, status, headers)

_source = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
_source.write("import __main__\\npredict = __main__.predict\\n")
_source.close()
sys.argv[sys.argv.index("--source") + 1] = _source.name
"""
FLOOR_FF = (
    FLOOR
    + """
async def _post(request):
    status, body = await _floor(await request.body(), request.headers.get("ce-id", ""))
    return status, {"content-type": "application/json"}, body
"""
    + FF_SERVE
)

# The floor plus what the contract and this project's style keep per event, and nothing
# else: the incoming CloudEvent parsed and the reply made by the CloudEvents SDK, the
# notification parsed, the trace context carried, the request and stage metrics; no log
# fields, limits, own-object check or labelling queue. Beside ``floor_ff`` in one run, it
# measures what that work costs the ratio.
FLOOR_CONTRACT = (
    FLOOR
    + """
import time
from cloudevents.conversion import to_binary
from cloudevents.http import from_http
from lensflow_eventing.contracts import parse_notification
from lensflow_eventing.tracing import incoming_trace, span
from lensflow_predict import metrics

async def _contract(headers, body):
    loop = asyncio.get_running_loop()
    replica = get_replica()
    incoming = from_http(headers, body, data_unmarshaller=lambda data: data)
    record = parse_notification(incoming.data)[0]
    with span("lensflow.predict", incoming_trace(incoming.get_attributes(), headers)) as trace:
        t0 = time.perf_counter()
        etag, model, predictions = await loop.run_in_executor(
            _pool, _work, replica, record.bucket, record.key)
        t1 = time.perf_counter()
    event = prediction_event(
        image=ObjectEvent(record.event_name, record.bucket, record.key, etag),
        model=model.identity, predictions=predictions, source_event_id=incoming["id"],
    )
    event["traceparent"] = trace.traceparent
    data = json.dumps(event.data).encode()
    try:
        await asyncio.wrap_future(replica.handler.producer.produce(event, data))
    except ProduceError:
        return 503, {}, data
    for stage in ("fetch", "decode", "invoke"):  # one timing for the three: their cost
        metrics.STAGE_SECONDS.labels(stage).observe(t1 - t0)
    metrics.STAGE_SECONDS.labels("produce").observe(time.perf_counter() - t1)
    metrics.predicted(model.name, predictions[0]["label"])
    metrics.REQUESTS.labels("200").inc()
    out_headers, out_body = to_binary(event, data_marshaller=lambda _: data)
    return 200, dict(out_headers), out_body

async def _post(request):
    return await _contract(dict(request.headers), await request.body())
"""
    + FF_SERVE
)

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
_timed(_sink.PredictionProducer, "produce", "Kafka produce (its ack is awaited on the loop)")
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
    Spec("ack_on_thread", env=OFF, prelude=ACK_ON_THREAD),
    Spec("floor_asgi", env=OFF, prelude=FLOOR_ASGI),
    Spec("floor_ff", env=OFF, prelude=FLOOR_FF),
    Spec("floor_contract", env=OFF, prelude=FLOOR_CONTRACT),
)

# Where a sample is, by the first matching frame (innermost first): stage name, pattern.
STAGES = (
    ("invoke (LiteRT)", "ai_edge_litert"),
    ("resize + normalise", "to_input ("),
    ("decode (Pillow)", "decode_image ("),
    ("S3 GET (libcurl)", "ImageFetcher.fetch"),
    ("Kafka produce", "lensflow_predict/sink.py"),
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
