"""Predict function benchmark (issue 2): a MobileNetV2-sized model on real servers.

- bare loop (decode + preprocess + invoke, no I/O) vs the function over HTTP, at
  concurrency 1 and 2: the ratio is what HTTP, S3 fetch and Kafka produce cost;
- cold start to first prediction, vs the same function importing TensorFlow;
- JPEG draft-mode vs full decode of a 12 MP photo;
- peak RSS of a replica;
- time from a flip to every response on the new version, and failed requests meanwhile.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from bench.common import (
    QUEUE_ON,
    median_of,
    mobilenet_v2_tflite,
    pyplot,
    run_for,
    save_plot,
    serving_stack,
    write_json,
)
from lensflow.function_server import FunctionServer, knative_post
from lensflow.process import free_port
from lensflow.scenes import CLASSES, scene_jpeg
from lensflow_core.imaging import decode_image
from lensflow_core.runtime import InputSpec
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, notification_record
from lensflow_model_store import ModelStore
from lensflow_predict.serving_model import ServingModel

SECONDS = float(os.environ.get("LENSFLOW_BENCH_SECONDS", "8"))
QUEUE_ON_PHOTOS = 4000  # distinct keys for the queue-on loops (~150 images/s at most)
PHOTO_SIZE = (640, 480)


def _photos(count: int) -> list[bytes]:
    return [scene_jpeg(CLASSES[i % len(CLASSES)], i, PHOTO_SIZE, 88) for i in range(count)]


def bare_loop(model_bytes: bytes, photos: list[bytes], workers: int, max_pixels: int) -> dict:
    spec = InputSpec(224, 224, "float32", 1 / 255, 0.0)
    model = ServingModel(
        "bench", "v0", "-", model_bytes, list(CLASSES), spec, max_interpreters=workers
    )
    counters = [0] * workers

    def work(worker: int) -> None:
        data = photos[counters[worker] % len(photos)]
        counters[worker] += 1
        model.predict(decode_image(data, (224, 224), max_pixels=max_pixels))

    run_for(1.0, workers, work)  # warm up
    return run_for(SECONDS, workers, work)


def http_loop(url: str, config: Config, values: list[bytes], workers: int) -> dict:
    sessions = [requests.Session() for _ in range(workers)]
    counters = [0] * workers
    failures = [0]
    stages: list[dict[str, float]] = []  # the function's own timings of each request

    def work(worker: int) -> None:
        value = values[(counters[worker] * workers + worker) % len(values)]  # each its own
        counters[worker] += 1
        reply = knative_post(url, config, value, session=sessions[worker])
        if reply.status_code != 200:
            failures[0] += 1
        else:
            stages.append(reply.json()["timings_ms"])

    run_for(1.0, workers, work)
    stages.clear()
    result = run_for(SECONDS, workers, work)
    result["failed"] = failures[0]
    # where a request's time goes: the rest is HTTP, CloudEvent parsing and the Kafka ack
    result["stage_p50_ms"] = {
        name: round(statistics.median(s[name] for s in stages), 2) for name in stages[0]
    }
    return result


def uploaded_records(s3, bucket: str, prefix: str, photos: list[bytes], count: int) -> list:
    """``count`` photos put at ``prefix/<i>.jpg`` (round the list of ``photos``), and the
    notification record MinIO would write for each."""
    values = []
    for i in range(count):
        key, photo = f"{prefix}/{i}.jpg", photos[i % len(photos)]
        etag = s3.put_object(Bucket=bucket, Key=key, Body=photo)["ETag"]
        event = ObjectEvent("s3:ObjectCreated:Put", bucket, key, etag, len(photo), "image/jpeg")
        values.append(notification_record(event)[1])
    return values


def queue_on(env: dict[str, str], config: Config, photos: list[bytes], off: dict) -> dict:
    """The HTTP loops again with the labelling queue on and every photo uncertain, each
    request a photo the queue has not seen (the worst case: a new version's first
    minute), against the queue-off figures of the same run (``off``)."""
    s3, bucket = s3_client(config), config.image_buckets[0]
    # more than the loops send: none offered twice
    values = uploaded_records(s3, bucket, "bench-queue", photos, QUEUE_ON_PHOTOS)
    result: dict = {}
    with FunctionServer("predict", {**env, **QUEUE_ON}) as server:
        for c in (1, 2):
            http = http_loop(server.url, config, values[(c - 1) * len(values) // 2 :], c)
            result[f"http_c{c}_images_per_s"] = http["images_per_s"]
            result[f"http_c{c}_failed"] = http["failed"]
            result[f"ratio_to_queue_off_c{c}"] = round(
                http["images_per_s"] / off[f"http_c{c}_images_per_s"], 3
            )
        result["label_queue"] = server.stats()["label_queue"]
        result["peak_rss_mb"] = server.stats()["max_rss_mb"]
    return result


def cold_start(env: dict[str, str], config: Config, value: bytes, import_tf: bool) -> float:
    """Seconds from process start to the first 200 from the function."""
    port = free_port()
    server = FunctionServer("predict", env, port=port)
    if import_tf:  # the same function, in a process that also imports TensorFlow
        server.command = [  # pycurl first: it refuses TensorFlow's older libcurl
            sys.executable,
            "-c",
            "import sys, pycurl, tensorflow; from functions_framework._cli import _cli; "
            "sys.argv = ['functions-framework'] + sys.argv[1:]; _cli()",
            *server.command[1:],
        ]
    started = time.perf_counter()
    proc = subprocess.Popen(
        server.command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if knative_post(server.url, config, value).status_code == 200:
                    return time.perf_counter() - started
            except requests.ConnectionError:
                time.sleep(0.01)
            if proc.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError("function did not start")
    finally:
        proc.terminate()
        proc.wait(10)


def decode_speedup(max_pixels: int) -> dict:
    photo = scene_jpeg("buildings", 1, (4000, 3000), 90)
    full = median_of(
        5,
        lambda: _timed(lambda: decode_image(photo, (224, 224), max_pixels=max_pixels, draft=False)),
    )
    draft = median_of(
        5, lambda: _timed(lambda: decode_image(photo, (224, 224), max_pixels=max_pixels))
    )
    return {
        "jpeg_12mp_bytes": len(photo),
        "full_decode_ms": round(full * 1000, 2),
        "draft_decode_ms": round(draft * 1000, 2),
        "draft_speedup": round(full / draft, 2),
    }


def flip_under_load(url: str, config: Config, store: ModelStore, value: bytes) -> dict:
    stop = threading.Event()
    seen: list[tuple[float, int, str | None]] = []

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            reply = knative_post(url, config, value, session=session)
            version = reply.json().get("model", {}).get("version") if reply.ok else None
            seen.append((time.perf_counter(), reply.status_code, version))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    old = store.current().version
    new = store.publish(mobilenet_v2_tflite(len(CLASSES)), list(CLASSES), created_by="bench")
    flipped_at = time.perf_counter()
    store.flip(new.version, expect=old, reason="bench: flip under load", by="bench")
    time.sleep(config.pointer_ttl_s + 2.0)
    stop.set()
    for t in threads:
        t.join()
    last_old = max((at for at, _, v in seen if v == old and at > flipped_at), default=flipped_at)
    return {
        "requests": len(seen),
        "failed": sum(1 for _, status, _ in seen if status != 200),
        "flip_to_all_new_s": round(last_old - flipped_at, 3),
        "ttl_s": config.pointer_ttl_s,
        "versions_seen": sorted({v for _, _, v in seen if v}),
    }


def _timed(func) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def run(out_dir: Path) -> dict:
    model_bytes = mobilenet_v2_tflite(len(CLASSES))
    photos = _photos(16)
    with serving_stack(model_bytes, list(CLASSES)) as (env, config, store, _servers):
        s3 = store.objects.s3
        bucket = config.image_buckets[0]
        values = uploaded_records(s3, bucket, "bench", photos, len(photos))

        result: dict = {
            "model": "MobileNetV2 224x224x3 (random weights)",
            "model_bytes": len(model_bytes),
            "photo_size": list(PHOTO_SIZE),
            "seconds_per_measurement": SECONDS,
            "cpus": os.cpu_count(),
        }
        for c in (1, 2):
            bare = bare_loop(model_bytes, photos, c, config.max_image_pixels)
            result[f"bare_c{c}_images_per_s"] = bare["images_per_s"]
            result[f"bare_latency_p50_ms_c{c}"] = bare["latency_p50_ms"]
        with FunctionServer("predict", env) as server:
            for c in (1, 2, 4):  # 4: past the cores, where a replica saturates
                http = http_loop(server.url, config, values, c)
                result[f"http_c{c}_images_per_s"] = http["images_per_s"]
                result[f"latency_p50_ms_c{c}"] = http["latency_p50_ms"]
                result[f"latency_p95_ms_c{c}"] = http["latency_p95_ms"]
                result[f"http_c{c}_failed"] = http["failed"]
                result[f"http_c{c}_stage_p50_ms"] = http["stage_p50_ms"]
                if f"bare_c{c}_images_per_s" in result:
                    result[f"ratio_http_to_bare_c{c}"] = round(
                        http["images_per_s"] / result[f"bare_c{c}_images_per_s"], 3
                    )
            result["flip"] = flip_under_load(server.url, config, store, values[0])
            result["peak_rss_mb"] = server.stats()["max_rss_mb"]
        result["queue_on"] = queue_on(env, config, photos, result)
        result["cold_start_s"] = round(
            median_of(3, lambda: cold_start(env, config, values[0], False)), 3
        )
        result["cold_start_with_tensorflow_s"] = round(
            median_of(3, lambda: cold_start(env, config, values[0], True)), 3
        )
    result["decode"] = decode_speedup(config.max_image_pixels)
    result["targets"] = {
        "ratio_http_to_bare_c1>=0.85": result["ratio_http_to_bare_c1"] >= 0.85,
        "ratio_http_to_bare_c2>=0.85": result["ratio_http_to_bare_c2"] >= 0.85,
        "cold_start_s<1": result["cold_start_s"] < 1.0,
        "peak_rss_mb<250": result["peak_rss_mb"] < 250,
        "flip_to_all_new_s<=ttl+1": result["flip"]["flip_to_all_new_s"] <= config.pointer_ttl_s + 1,
        "flip_failed==0": result["flip"]["failed"] == 0,
    }
    write_json(out_dir, "predict", result)
    plot(out_dir, result)
    return result


def plot(out_dir: Path, result: dict) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["bare c1", "http c1", "bare c2", "http c2"]
    values = [
        result["bare_c1_images_per_s"],
        result["http_c1_images_per_s"],
        result["bare_c2_images_per_s"],
        result["http_c2_images_per_s"],
    ]
    left.bar(names, values, color=["#888", "#2a7", "#888", "#2a7"])
    left.set_ylabel("images/s")
    left.set_title("MobileNetV2 224: bare loop vs function over HTTP")
    right.bar(
        ["cold start", "cold start\n+TensorFlow"],
        [result["cold_start_s"], result["cold_start_with_tensorflow_s"]],
        color=["#2a7", "#c55"],
    )
    right.set_ylabel("seconds to first prediction")
    right.set_title("cold start")
    save_plot(fig, out_dir / "predict.png")


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
