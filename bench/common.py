"""What the benchmarks share: a MobileNetV2-sized model, timing loops, JSON and plots."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lensflow.figures import percentile, rounded

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "var" / "bench"


def mobilenet_v2_tflite(num_classes: int, size: int = 224) -> bytes:
    """MobileNetV2 (random weights), converted to TFLite; cached under var/bench/."""
    path = CACHE / f"mobilenet_v2_{size}_{num_classes}.tflite"
    if path.exists():
        return path.read_bytes()
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.applications.MobileNetV2(
        input_shape=(size, size, 3), weights=None, classes=num_classes
    )
    data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def run_for(seconds: float, workers: int, work: Callable[[int], None]) -> dict:
    """Call ``work(worker)`` in ``workers`` threads for ``seconds``; rate and latency."""
    latencies: list[list[float]] = [[] for _ in range(workers)]
    deadline = time.perf_counter() + seconds

    def loop(worker: int) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            work(worker)
            latencies[worker].append(time.perf_counter() - t0)

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = sorted(x for per in latencies for x in per)
    return {
        "count": len(flat),
        "images_per_s": round(len(flat) / elapsed, 2),
        "latency_p50_ms": rounded(percentile(flat, 50), 2, scale=1000),
        "latency_p95_ms": rounded(percentile(flat, 95), 2, scale=1000),
    }


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def write_json(out_dir: Path, name: str, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot, drawing off-screen (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, path: Path, dpi: int = 100) -> Path:
    """Lay ``fig`` out, write it to ``path`` and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _bench_env(broker) -> dict[str, str]:
    return {"LENSFLOW_KAFKA_BOOTSTRAP": broker.bootstrap, "LENSFLOW_LOG_LEVEL": "WARNING"}


@contextmanager
def serving_stack(
    model: bytes, labels: list[str]
) -> Iterator[tuple[dict[str, str], object, object]]:
    """S3 and Kafka on free ports, buckets and topics made, ``model`` published and current;
    the S3 server announces every photo put in the image bucket, as MinIO does.

    Yields (env, config, model store, {server name: pid}).
    """
    from lensflow.servers import KafkaBroker, S3Server
    from lensflow_core.s3 import ensure_buckets, s3_client
    from lensflow_core.settings import Config
    from lensflow_eventing.topics import ensure_topics, topic_specs
    from lensflow_model_store import ModelStore

    with KafkaBroker() as broker, S3Server(notify=_bench_env(broker)) as s3_server:
        env = {
            **_bench_env(broker),
            "LENSFLOW_S3_ENDPOINT": s3_server.endpoint,
            # The benches' random-weights models find every picture uncertain, so each
            # would also be queued for labelling: off here; the isolated bench measures
            # the queue on (every picture queued) beside it off (``QUEUE_ON``).
            "LENSFLOW_LABEL_QUEUE_MAX": "0",
        }
        config = Config.from_env(env)
        s3 = s3_client(config)
        ensure_buckets(s3, config.buckets)
        ensure_topics(config.kafka, topic_specs(*config.topics))
        store = ModelStore.from_config(config, s3=s3)
        store.flip(store.publish(model, labels, created_by="bench").version)
        yield (
            env,
            config,
            store,
            {"s3 (moto)": s3_server.proc.pid, "kafka (tansu)": broker.proc.pid},
        )


# The labelling queue on, with every picture uncertain and never full: each image of every
# backlog is queued (the worst case: a new model version's first hours).
QUEUE_ON = {"LENSFLOW_UNCERTAIN_TOP1": "1.01", "LENSFLOW_LABEL_QUEUE_MAX": "1000000"}


def cpu_seconds(roots: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named group of process trees.

    A root's live descendants count with it (a gunicorn arbiter and its worker).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    usage: dict[int, float] = {}
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        usage[pid] = (int(fields[11]) + int(fields[12])) / ticks

    def tree(pid: int) -> float:
        return usage.get(pid, 0.0) + sum(tree(c) for c, p in parent.items() if p == pid)

    return {name: round(sum(tree(pid) for pid in pids), 3) for name, pids in roots.items()}
