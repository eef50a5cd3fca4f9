"""End-to-end benchmark (issue 3): broker → dispatcher → predict replicas → predictions.

1. Throughput: N photos are put in the image bucket (its notification puts their records
   on the images topic); the dispatcher then drains them through the replica pool. Images/s from first to last prediction, versus
   the bare decode + invoke loop on the same photos and model, on the same cores.
2. Latency at half that rate: upload-to-prediction p50/p95 (PUT answered → prediction
   event time: S3's notification, broker, dispatcher, replica).
3. Burst: a base rate, 10x for 20 s, base again; lag, throughput and replicas sampled every
   0.5 s; the time from the burst's end until the lag is back to zero.
4. Throughput again from fresh replica pools: the labelling queue off, on with every photo
   uncertain, the same with the queue full, and off again (issue 22); on and full against
   the mean of the two off passes.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from pathlib import Path

from bench.common import (
    QUEUE_ON,
    cpu_seconds,
    mobilenet_v2_tflite,
    pyplot,
    save_plot,
    serving_stack,
    write_json,
)
from bench.predict_bench import bare_loop
from lensflow.figures import percentile, rounded
from lensflow.replicas import ReplicaPool
from lensflow.scenes import CLASSES, scene_jpeg
from lensflow.stack import dispatcher_for
from lensflow.upload import upload_file
from lensflow_core.settings import Config
from lensflow_eventing.predictions import Prediction, PredictionFeed

THROUGHPUT_IMAGES = int(os.environ.get("LENSFLOW_BENCH_E2E_IMAGES", "400"))
# The queue's passes run longer: a replica writes 10 records a second, in batches every 2 s,
# so a 400-image backlog (~2.5 s) would catch one batch or none.
QUEUE_PASS_IMAGES = 5 * THROUGHPUT_IMAGES
LATENCY_SECONDS = 15.0
BURST = {"base_s": 10.0, "burst_s": 20.0, "after_s": 60.0, "factor": 10}


class ArrivalLog:
    """When each subject's first prediction was made (its event time) and arrived: a
    ``PredictionFeed`` from the start of the predictions topic."""

    def __init__(self, config: Config):
        self.config = config
        self.seen: dict[str, float] = {}  # subject -> event time (epoch s)
        self.arrivals: list[float] = []
        self._feed = PredictionFeed(
            config.kafka, config.topic_predictions, self._arrived, group="bench-watcher"
        )

    def start(self) -> ArrivalLog:
        self._feed.start()
        return self

    def stop(self) -> None:
        self._feed.stop()

    def wait_for(self, subjects: set[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not subjects <= self.seen.keys():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _arrived(self, prediction: Prediction, produced_ms: int) -> None:
        if prediction.subject not in self.seen:
            at = datetime.fromisoformat(prediction.time.replace("Z", "+00:00"))
            self.seen[prediction.subject] = at.timestamp()
            self.arrivals.append(time.time())


def cpu_use(servers: dict[str, int], pool: ReplicaPool) -> dict[str, float]:
    """CPU seconds so far of each part of the chain on this machine."""
    used = cpu_seconds(
        {name: [pid] for name, pid in servers.items()}
        | {"predict replicas": [r.proc.pid for r in pool.replicas()]}
    )
    own = os.times()
    used["dispatcher + load driver"] = round(own.user + own.system, 3)
    return used


def upload_at_rate(
    s3, bucket: str, prefix: str, photos: list[bytes], count: int, rate_at, duration_s: float
) -> dict[str, float]:
    """PUT up to ``count`` photos following ``rate_at(t)`` images/s, as drones do (the
    bucket's notification makes each an event); subject -> when its PUT completed."""
    sent: dict[str, float] = {}
    started = last = time.monotonic()
    credit = 0.0
    while len(sent) < count:
        now = time.monotonic()
        if now - started >= duration_s:
            break
        credit += rate_at(now - started) * (now - last)
        last = now
        while credit >= 1 and len(sent) < count:
            key = f"{prefix}/{len(sent):05d}.jpg"
            upload_file(s3, bucket, key, photos[len(sent) % len(photos)], "image/jpeg")
            sent[f"{bucket}/{key}"] = time.time()
            credit -= 1
        time.sleep(0.005)
    return sent


def run(out_dir: Path) -> dict:
    model_bytes = mobilenet_v2_tflite(len(CLASSES))
    photos = [scene_jpeg(CLASSES[i % len(CLASSES)], i, (640, 480), 88) for i in range(16)]
    result: dict = {"model": "MobileNetV2 224x224x3 (random weights)", "cpus": os.cpu_count()}
    with serving_stack(model_bytes, list(CLASSES)) as (env, config, store, servers):
        s3 = store.objects.s3
        bucket = config.image_buckets[0]
        bare = bare_loop(model_bytes, photos, 2, config.max_image_pixels)
        result["bare_c2_images_per_s"] = bare["images_per_s"]

        watcher = ArrivalLog(config).start()
        pool = replica_pool(env)
        dispatcher = dispatcher_for(config, pool, ordering="unordered", max_in_flight=4)
        try:
            # 1. throughput: a backlog drained as fast as the chain allows
            result.update(throughput(s3, bucket, photos, watcher, dispatcher, pool, servers))
            e2e_rate = result["e2e_images_per_s"]
            result["ratio_e2e_to_bare"] = round(e2e_rate / bare["images_per_s"], 3)

            # 2. latency at half the measured rate
            half = e2e_rate / 2
            count = int(half * LATENCY_SECONDS) + 1
            sent = upload_at_rate(
                s3, bucket, "latency", photos, count, lambda t: half, LATENCY_SECONDS
            )
            watcher.wait_for(set(sent), 120)
            latencies = sorted(watcher.seen[k] - t for k, t in sent.items() if k in watcher.seen)
            result["latency_rate_images_per_s"] = round(half, 2)
            result["latency_p50_ms"] = rounded(percentile(latencies, 50), 1, scale=1000)
            result["latency_p95_ms"] = rounded(percentile(latencies, 95), 1, scale=1000)
            result["latency_lost"] = len(sent) - len(latencies)

            # 3. a 10x burst over a base of a fifth of capacity, from a scaled-down pool
            time.sleep(8)
            result["burst"] = burst(s3, bucket, photos, watcher, dispatcher, pool, e2e_rate / 5)
        finally:
            dispatcher.stop()
            pool.stop()
        # 4. throughput again from fresh pools, alike but for the labelling queue: off; on
        # with every photo uncertain; the same with the queue full; off again
        try:
            full = {**QUEUE_ON, "LENSFLOW_LABEL_QUEUE_MAX": "1"}  # offers settled in memory
            passes = [("queue_off", {}), ("queue_on", QUEUE_ON), ("queue_full", full)]
            for name, extra in [*passes, ("queue_off_after", {})]:  # off on both sides: drift
                result[name] = fresh_pool_throughput(
                    {**env, **extra}, config, s3, bucket, photos, watcher, servers, name
                )
        finally:
            watcher.stop()
        off = (
            result["queue_off"]["e2e_images_per_s"] + result["queue_off_after"]["e2e_images_per_s"]
        ) / 2
        for name in ("queue_on", "queue_full"):
            result[name]["ratio_to_queue_off"] = round(result[name]["e2e_images_per_s"] / off, 3)
    result["targets"] = {"ratio_e2e_to_bare>=0.8": result["ratio_e2e_to_bare"] >= 0.8}
    write_json(out_dir, "e2e", result)
    plot(out_dir, result)
    return result


def replica_pool(env: dict[str, str]) -> ReplicaPool:
    """Up to 2 predict replicas of 4 threads, scaling to zero after 5 s idle; started."""
    return ReplicaPool(env, max_replicas=2, target_concurrency=2, idle_s=5, threads=4).start()


def fresh_pool_throughput(env, config, s3, bucket, photos, watcher, servers, name) -> dict:
    """``throughput`` through a new replica pool started with ``env``."""
    pool = replica_pool(env)
    dispatcher = dispatcher_for(config, pool, ordering="unordered", max_in_flight=4)
    try:
        return throughput(
            s3, bucket, photos, watcher, dispatcher, pool, servers, name, QUEUE_PASS_IMAGES
        )
    finally:
        dispatcher.stop()
        pool.stop()


def throughput(
    s3,
    bucket,
    photos,
    watcher,
    dispatcher,
    pool,
    servers,
    prefix: str = "throughput",
    count: int = THROUGHPUT_IMAGES,
) -> dict:
    """A backlog of ``count`` photos put first, then drained through ``dispatcher``:
    images/s from first to last prediction (after a tenth to warm up), CPU per image."""
    uploaded = upload_at_rate(s3, bucket, prefix, photos, count, lambda t: 1e6, 3600)
    dispatcher.start()
    order = list(uploaded)
    paths = set(order)
    watcher.wait_for(set(order[: len(order) // 10]), 120)  # replicas started and warm
    before = cpu_use(servers, pool)
    seen_before, started = len(paths & watcher.seen.keys()), time.monotonic()
    if not watcher.wait_for(paths, 600):
        raise RuntimeError(f"not every {prefix} image got a prediction")
    after, elapsed = cpu_use(servers, pool), time.monotonic() - started
    times = sorted(watcher.seen[path] for path in paths)
    images = len(paths) - seen_before
    return {
        "e2e_images_per_s": round((len(times) - 1) / (times[-1] - times[0]), 2),
        "replicas_during_throughput": pool.stats()["replicas"],
        "cpu_ms_per_image": {
            name: round((after[name] - before[name]) * 1000 / images, 2) for name in after
        },
        "cpu_share_of_machine": {
            name: round((after[name] - before[name]) / (elapsed * (os.cpu_count() or 1)), 3)
            for name in after
        },
    }


def burst(s3, bucket, photos, watcher, dispatcher, pool, base_rate) -> dict:
    b = BURST
    total_s = b["base_s"] + b["burst_s"] + b["after_s"]

    def rate_at(t: float) -> float:
        in_burst = b["base_s"] <= t < b["base_s"] + b["burst_s"]
        return base_rate * (b["factor"] if in_burst else 1)

    expected = int(base_rate * (b["base_s"] + b["after_s"] + b["factor"] * b["burst_s"])) + 10
    samples: list[dict] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            stats, replicas = dispatcher.stats(), pool.stats()
            samples.append(
                {
                    "t": round(time.monotonic() - started, 2),
                    "lag": stats.get("lag"),
                    "delivered": stats["delivered"],
                    "in_flight": stats.get("in_flight"),
                    "replicas": replicas["replicas"] + replicas["starting"],
                }
            )
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sent = upload_at_rate(s3, bucket, "burst", photos, expected, rate_at, total_s)
    watcher.wait_for(set(sent), 300)
    time.sleep(1.0)
    stop.set()
    sampler.join()
    burst_end = b["base_s"] + b["burst_s"]
    recovered = next((s["t"] for s in samples if s["t"] > burst_end and s["lag"] == 0), None)
    for previous, current in zip(samples, samples[1:], strict=False):
        dt = current["t"] - previous["t"]
        current["images_per_s"] = round((current["delivered"] - previous["delivered"]) / dt, 2)
    return {
        "base_rate_images_per_s": round(base_rate, 2),
        "factor": b["factor"],
        "burst_s": b["burst_s"],
        "sent": len(sent),
        "predicted": sum(1 for k in sent if k in watcher.seen),
        "peak_lag": max((s["lag"] or 0) for s in samples),
        "max_replicas": max(s["replicas"] for s in samples),
        "lag_zero_after_burst_s": None if recovered is None else round(recovered - burst_end, 2),
        "samples": samples,
    }


def plot(out_dir: Path, result: dict) -> None:
    plt = pyplot()

    samples = result["burst"]["samples"][1:]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    axes[0].plot(t, [s.get("images_per_s", 0) for s in samples], color="#2a7")
    axes[0].set_ylabel("images/s")
    axes[0].set_title(
        f"10x burst through broker, dispatcher and predict replicas "
        f"(base {result['burst']['base_rate_images_per_s']}/s)"
    )
    axes[1].plot(t, [s["lag"] or 0 for s in samples], color="#c55")
    axes[1].set_ylabel("consumer lag")
    replicas = [s["replicas"] for s in samples]
    axes[2].step(t, replicas, where="post", color="#357")
    axes[2].set_ylim(0, max(replicas, default=1) + 1)
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.axvspan(BURST["base_s"], BURST["base_s"] + BURST["burst_s"], color="#fd8", alpha=0.3)
    save_plot(fig, out_dir / "e2e.png")


if __name__ == "__main__":
    import json

    result = run(Path(__file__).parent / "results")
    result["burst"].pop("samples")
    print(json.dumps(result, indent=2))
