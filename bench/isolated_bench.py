"""A predict replica alone on its core vs the bare loop on that core (issue 9).

Measures the design rather than the crowd. One replica (containerConcurrency 4: THREADS 4,
the dispatcher unordered with 4 in flight) drains backlogs of 640x480 JPEG records; the
bare decode + resize + invoke loop runs on the replica's CPUs just before and just after
each backlog; the ratio is the backlog's images/s over the mean of the two.

Variants, interleaved backlog by backlog so that the machine's load drifts over all alike:

- ``isolated``: the replica pinned (``taskset``) to the first CPU; S3 (moto), the broker
  (Tansu), the dispatcher and the load on the others; the bare loop (1 thread) pinned to
  the replica's CPU. Micro-batching as configured by default.
- ``isolated_no_batch``: the same with ``LENSFLOW_BATCH_DELAY_MS=0``.
- ``shared``: nothing pinned, everything on every CPU; the bare loop with one thread per
  CPU.

``LENSFLOW_BENCH_BACKLOGS`` (default 5) backlogs of ``LENSFLOW_BENCH_BACKLOG_IMAGES``
(default 400) per variant; medians over them. Each backlog records ``/proc/loadavg``, the
busy share of every CPU, the replica's CPU time per image and the batches it ran.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

from bench.common import cpu_seconds, mobilenet_v2_tflite, serving_stack, write_json
from bench.e2e_bench import PredictionWatcher, put_photos
from eventing.producer import make_producer, publish_object_event
from functions.predict.serving_model import ServingModel
from lensflow.function_server import FunctionServer
from lensflow.process import function_command
from lensflow.replicas import PREDICT_CONCURRENCY
from lensflow.scenes import CLASSES, scene_jpeg
from lensflow.stack import dispatcher_for
from lensflow_core.imaging import decode_image
from lensflow_core.runtime import InputSpec

BACKLOGS = int(os.environ.get("LENSFLOW_BENCH_BACKLOGS", "5"))
BACKLOG_IMAGES = int(os.environ.get("LENSFLOW_BENCH_BACKLOG_IMAGES", "400"))
BARE_SECONDS = float(os.environ.get("LENSFLOW_BENCH_BARE_SECONDS", "4"))
VARIANTS = ("isolated", "isolated_no_batch", "shared")


def tasks(pid: int) -> list[int]:
    """Thread ids of ``pid`` and of all its descendants."""
    found = []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            found += [int(t) for t in os.listdir(f"/proc/{current}/task")]
        except OSError:
            continue
        todo += children.get(current, [])
    return found


def pin(pids: list[int], cpus: set[int]) -> None:
    """Move every thread of ``pids`` (and their children) and of this process (not its
    children: the replicas) onto ``cpus``."""
    own = [int(t) for t in os.listdir("/proc/self/task")]
    for pid in pids:
        for tid in [*own, *tasks(pid)]:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # a thread that just ended
                pass


def cpu_busy() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each CPU so far, from /proc/stat."""
    rows = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            v = [int(x) for x in values]
            idle = v[3] + v[4]  # idle + iowait
            rows.append((sum(v) - idle, sum(v)))
    return rows


def process_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (gunicorn's arbiter and its worker)."""
    return cpu_seconds({"p": [pid]})["p"]


def bare_loop(model_bytes: bytes, photos: list[bytes], cpus: set[int], seconds: float) -> float:
    """images/s of decode + resize + invoke, one thread (and interpreter) per CPU in
    ``cpus``, each thread pinned to ``cpus``."""
    spec = InputSpec(224, 224, "float32", 1 / 255, 0.0)
    model = ServingModel("bench", "v0", "-", model_bytes, list(CLASSES), spec, len(cpus))
    counts = [0] * len(cpus)

    def loop(worker: int, until: float) -> None:
        os.sched_setaffinity(0, cpus)  # this thread only
        i = worker
        while time.perf_counter() < until:
            model.predict(decode_image(photos[i % len(photos)], (224, 224), max_pixels=10**8))
            counts[worker] += 1
            i += len(cpus)

    def timed(duration: float) -> float:
        counts[:] = [0] * len(cpus)
        started = time.perf_counter()
        threads = [
            threading.Thread(target=loop, args=(w, started + duration)) for w in range(len(cpus))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - started)

    timed(0.5)  # warm: interpreters made, caches filled
    return timed(seconds)


class Variant:
    """One replica, how it is pinned, and the backlogs measured on it."""

    def __init__(self, name: str, env: dict[str, str], all_cpus: list[int]):
        self.name = name
        isolated = name.startswith("isolated")
        self.replica_cpus = {all_cpus[0]} if isolated else set(all_cpus)
        self.other_cpus = set(all_cpus[1:]) if isolated else set(all_cpus)
        extra = {"THREADS": str(PREDICT_CONCURRENCY)}
        if name == "isolated_no_batch":
            extra["LENSFLOW_BATCH_DELAY_MS"] = "0"
        server = FunctionServer("predict", {**env, **extra})
        if isolated:  # pinned from its first instruction: it sizes itself by its CPUs
            cpus = ",".join(str(c) for c in sorted(self.replica_cpus))
            server.command = ["taskset", "-c", cpus, *function_command("predict", server.port)]
        self.server = server
        self.backlogs: list[dict] = []


def backlog(
    variant: Variant,
    number: int,
    stack_pids: list[int],
    sink_url: list[str],
    s3,
    bucket: str,
    config,
    producer,
    watcher: PredictionWatcher,
    model_bytes: bytes,
    photos: list[bytes],
) -> dict:
    pin(stack_pids, variant.other_cpus)
    events = put_photos(s3, bucket, f"{variant.name}-{number}", photos, BACKLOG_IMAGES)
    before = bare_loop(model_bytes, photos, variant.replica_cpus, BARE_SECONDS)
    sink_url[0] = variant.server.url
    pid = variant.server.proc.pid
    metrics_before = variant.server.metrics()
    cpu0, busy0, load0 = process_cpu_s(pid), cpu_busy(), os.getloadavg()
    for event in events:
        publish_object_event(producer, config.topic_images, event)
    producer.flush(10)
    paths = [e.path for e in events]
    if not watcher.wait_for(set(paths), 300):
        raise RuntimeError(f"{variant.name}: not every backlog image got a prediction")
    cpu1, busy1 = process_cpu_s(pid), cpu_busy()
    metrics_after = variant.server.metrics()
    after = bare_loop(model_bytes, photos, variant.replica_cpus, BARE_SECONDS)
    times = sorted(watcher.seen[p] for p in paths)
    skip = len(times) // 10  # the first tenth: connections and caches warming
    rate = (len(times) - 1 - skip) / (times[-1] - times[skip])
    bare = (before + after) / 2
    batches = metrics_after.get("batches") or {}
    batches_before = metrics_before.get("batches") or {}
    ran = batches.get("batches", 0) - batches_before.get("batches", 0)
    return {
        "images": len(paths),
        "images_per_s": round(rate, 2),
        "bare_before_images_per_s": round(before, 2),
        "bare_after_images_per_s": round(after, 2),
        "ratio": round(rate / bare, 3),
        "replica_cpu_ms_per_image": round((cpu1 - cpu0) * 1000 / len(paths), 2),
        "bare_cpu_ms_per_image": round(1000 * len(variant.replica_cpus) / bare, 2),
        "cpu_busy": [
            round((b1 - b0) / max(1, t1 - t0), 3)
            for (b0, t0), (b1, t1) in zip(busy0, busy1, strict=True)
        ],
        "loadavg_before": [round(x, 2) for x in load0],
        "mean_batch": round(len(paths) / ran, 2) if ran else None,
        "replica_cpus": metrics_after.get("cpus"),
    }


def run(out_dir: Path) -> dict:
    all_cpus = sorted(os.sched_getaffinity(0))
    if len(all_cpus) < 2:
        raise RuntimeError("the isolated benchmark needs at least 2 CPUs")
    model_bytes = mobilenet_v2_tflite(len(CLASSES))
    photos = [scene_jpeg(CLASSES[i % len(CLASSES)], i, (640, 480), 88) for i in range(16)]
    result: dict = {
        "model": "MobileNetV2 224x224x3 float32 (random weights)",
        "cpus": all_cpus,
        "backlogs": BACKLOGS,
        "backlog_images": BACKLOG_IMAGES,
        "container_concurrency": PREDICT_CONCURRENCY,
        "bare_seconds": BARE_SECONDS,
    }
    own = os.sched_getaffinity(0)
    with serving_stack(model_bytes, list(CLASSES)) as (env, config, store, servers):
        s3, bucket = store.objects.s3, config.image_buckets[0]
        stack_pids = list(servers.values())
        variants = [Variant(name, env, all_cpus) for name in VARIANTS]
        sink_url = [""]
        watcher = PredictionWatcher(config).start()
        producer = make_producer(config.kafka)
        dispatcher = dispatcher_for(
            config,
            lambda: sink_url[0],
            ordering="unordered",
            max_in_flight=PREDICT_CONCURRENCY,
        )
        try:
            for variant in variants:
                variant.server.__enter__()
            sink_url[0] = variants[0].server.url
            dispatcher.start()
            for number in range(BACKLOGS):
                for variant in variants:
                    variant.backlogs.append(
                        backlog(
                            variant,
                            number,
                            stack_pids,
                            sink_url,
                            s3,
                            bucket,
                            config,
                            producer,
                            watcher,
                            model_bytes,
                            photos,
                        )
                    )
                    print(f"  {variant.name} #{number}: {variant.backlogs[-1]}", flush=True)
            for variant in variants:
                result[variant.name] = summarise(variant)
                result[variant.name]["peak_rss_mb"] = variant.server.metrics()["max_rss_mb"]
        finally:
            pin(stack_pids, own)
            dispatcher.stop()
            watcher.stop()
            for variant in variants:
                variant.server.stop()
            producer.flush(5)
            del producer
    iso, shared = result["isolated"], result["shared"]
    nobatch = result["isolated_no_batch"]
    result["batching_gain"] = round(iso["images_per_s"] / nobatch["images_per_s"], 3)
    result["targets"] = {
        "isolated_ratio_c4>=0.85": iso["ratio"] >= 0.85,
        "shared_ratio_reported": shared["ratio"] > 0,
        "peak_rss_mb<250": max(v["peak_rss_mb"] for v in (iso, nobatch, shared)) < 250,
    }
    write_json(out_dir, "isolated", result)
    plot(out_dir, result)
    return result


def summarise(variant: Variant) -> dict:
    runs = variant.backlogs

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    return {
        "ratio": median("ratio"),
        "ratio_min": min(r["ratio"] for r in runs),
        "ratio_max": max(r["ratio"] for r in runs),
        "images_per_s": median("images_per_s"),
        "bare_images_per_s": round(
            statistics.median(
                (r["bare_before_images_per_s"] + r["bare_after_images_per_s"]) / 2 for r in runs
            ),
            2,
        ),
        "replica_cpu_ms_per_image": median("replica_cpu_ms_per_image"),
        "bare_cpu_ms_per_image": median("bare_cpu_ms_per_image"),
        "replica_cpus": sorted(variant.replica_cpus),
        "runs": runs,
    }


def plot(out_dir: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(VARIANTS):
        ratios = [r["ratio"] for r in result[name]["runs"]]
        left.scatter([i] * len(ratios), ratios, color="#888", zorder=3)
        left.bar(i, result[name]["ratio"], color="#2a7" if i < 2 else "#c85", alpha=0.7)
    left.axhline(0.85, color="#c55", linestyle="--", label="target 0.85 (isolated)")
    left.set_xticks(range(len(VARIANTS)), VARIANTS)
    left.set_ylabel("replica / bare loop (median, dots: backlogs)")
    left.set_title(f"containerConcurrency {result['container_concurrency']}")
    left.legend()
    width = 0.4
    for i, name in enumerate(VARIANTS):
        right.bar(i - width / 2, result[name]["bare_images_per_s"], width, color="#888")
        right.bar(i + width / 2, result[name]["images_per_s"], width, color="#2a7")
    right.set_xticks(range(len(VARIANTS)), VARIANTS)
    right.set_ylabel("images/s (grey: bare loop, green: replica)")
    right.set_title("MobileNetV2 224 float32, 640x480 JPEG backlogs")
    fig.tight_layout()
    fig.savefig(out_dir / "isolated.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
