"""The predictions archive (issue 19): how fast, how big, how fresh.

- ``throughput``: the archiver (``lensflow_archive``) draining a backlog of prediction
  events in a process pinned to one CPU (``taskset``), from its first record to its last
  commit: predictions per second of wall time and per CPU-second, against one predict
  replica's rate on one CPU (``bench/results/predict.json``, ``http_c1_images_per_s``);
- ``bytes per prediction``: the Parquet (zstd) the drain wrote, and after compaction;
- ``query latency``: each named question (``lensflow_archive.query.REPORTS``) over one
  million synthetic archived predictions (30 dates x 3 partitions), a fresh DuckDB each
  time (listing and reading S3 included), median of 3;
- ``lag``: produce to queryable under the demo's load (3/s, 30/s for 15 s), the archiver
  following with the default ``LENSFLOW_ARCHIVE_FLUSH_S``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from bench.common import ROOT, percentile, pyplot, save_plot, write_json

BACKLOG = int(os.environ.get("LENSFLOW_BENCH_ARCHIVE_BACKLOG", "20000"))
ROWS = int(os.environ.get("LENSFLOW_BENCH_ARCHIVE_ROWS", "1000000"))
DAYS, PARTITIONS = 30, 3


@contextmanager
def servers():
    from lensflow.servers import KafkaBroker, S3Server
    from lensflow_core.s3 import ensure_buckets, s3_client
    from lensflow_core.settings import Config
    from lensflow_eventing.topics import ensure_topics, topic_specs

    with S3Server() as s3_server, KafkaBroker() as broker:
        env = {
            "LENSFLOW_S3_ENDPOINT": s3_server.endpoint,
            "LENSFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
            "LENSFLOW_LOG_LEVEL": "WARNING",
        }
        config = Config.from_env(env)
        ensure_buckets(s3_client(config), [config.archive_bucket])
        ensure_topics(config.kafka, topic_specs(*config.topics))
        yield env, config


def drain_pinned(env: dict[str, str]) -> dict:
    """This module's ``--drain`` in a child pinned to CPU 0; its JSON result."""
    command = ["taskset", "-c", "0", sys.executable, "-m", "bench.archive_bench", "--drain"]
    out = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    if out.returncode != 0:
        raise RuntimeError(f"drain failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def drain_here() -> dict:
    """Drain the backlog once; time from the first record taken to the last commit."""
    from lensflow_archive.archiver import Archiver
    from lensflow_core.settings import Config

    class Timed(Archiver):
        first: float | None = None

        def _take(self, messages: list) -> None:
            if messages and self.first is None:
                self.first = time.perf_counter()
                self.cpu0 = time.process_time()
            super()._take(messages)

    archiver = Timed(Config.from_env())
    report = archiver.run(follow=False)
    seconds = time.perf_counter() - archiver.first
    cpu = time.process_time() - archiver.cpu0
    return {
        "archived": report["archived"],
        "files": report["files"],
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def archive_bytes(config) -> tuple[int, int]:
    from lensflow_archive.store import ArchiveStore
    from lensflow_core.s3 import s3_client

    files = ArchiveStore(s3_client(config), config.archive_bucket).list("predictions/")
    return sum(f.size for f in files), len(files)


def measure_throughput(env, config) -> dict:
    from lensflow_archive.compact import compact_day
    from lensflow_archive.store import ArchiveStore
    from lensflow_core.s3 import s3_client
    from lensflow_eventing.offsets import committed_offsets
    from tests.support.archive_support import make_prediction, produce

    produce(config, [make_prediction(i) for i in range(BACKLOG)])
    drained = drain_pinned(env)
    size, files = archive_bytes(config)
    store = ArchiveStore(s3_client(config), config.archive_bucket)
    committed = committed_offsets(config.kafka, config.topic_predictions, config.archive_group)
    for day in store.days():
        compact_day(store, day, config.topic_predictions, committed)
    compacted, compacted_files = archive_bytes(config)
    rate = drained["archived"] / drained["seconds"]
    predict = ROOT / "bench" / "results" / "predict.json"
    replica = (
        json.loads(predict.read_text()).get("http_c1_images_per_s") if predict.exists() else None
    )
    return {
        "backlog": BACKLOG,
        **{f"drain_{k}": v for k, v in drained.items()},
        "archiver_predictions_per_s": round(rate, 1),
        "archiver_predictions_per_cpu_s": round(drained["archived"] / drained["cpu_seconds"], 1),
        "predict_replica_images_per_s_c1": replica,
        "archiver_to_predict_ratio": round(rate / replica, 1) if replica else None,
        "bytes_per_prediction": round(size / drained["archived"], 1),
        "files_after_drain": files,
        "bytes_per_prediction_compacted": round(compacted / drained["archived"], 1),
        "files_after_compaction": compacted_files,
    }


def synthetic_rows(day: str, partition: int, n: int, first_offset: int):
    """``n`` archive rows of one date and partition, vectorised (numpy), realistic spread."""
    import numpy as np
    import pyarrow as pa

    from lensflow_archive.records import SCHEMA

    rng = np.random.default_rng(hash((day, partition)) % 2**32)
    labels = np.array(["car", "truck", "person", "boat", "building", "tree"])
    start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
    seconds = np.sort(rng.integers(0, 86400, n))
    times = pa.array(
        [start + timedelta(seconds=int(s)) for s in seconds], pa.timestamp("us", tz="UTC")
    )
    top1 = labels[rng.integers(0, len(labels), n)]
    score = np.round(rng.beta(5, 2, n), 4)
    drone = rng.integers(0, 24, n)
    offsets = np.arange(first_offset, first_offset + n)
    keys = [f"fleet/drone-{d:02d}/{day}-{o}.jpg" for d, o in zip(drone, offsets, strict=True)]
    columns = {
        "id": [f"{day}-{partition}-{o}" for o in offsets],
        "time": times,
        "bucket": ["drone-images"] * n,
        "key": keys,
        "etag": [f"{o:032x}" for o in offsets],
        "model_name": ["aerial"] * n,
        "model_version": [f"v{1 + (date.fromisoformat(day).toordinal() // 7) % 4}"] * n,
        "model_sha256": ["ab" * 32] * n,
        "label": top1,
        "score": score,
        "top": [
            [{"label": str(lbl), "score": float(s)}] for lbl, s in zip(top1, score, strict=True)
        ],
        "uncertain": score < 0.6,
        "source_event_id": [f"partition:{partition}/offset:{o}" for o in offsets],
        "trace_id": [f"{o:032x}" for o in offsets],
        "uploaded_at": pa.compute.subtract(times, pa.scalar(timedelta(milliseconds=90))),
        "latency_ms": np.full(n, 90.0),
        "topic": ["predictions"] * n,
        "partition": np.full(n, partition, dtype=np.int32),
        "offset": offsets,
    }
    return pa.table(columns, schema=SCHEMA)


def fill_million(config) -> int:
    from lensflow_archive.store import PREDICTIONS, ArchiveStore, file_key, parquet_bytes
    from lensflow_core.s3 import s3_client

    store = ArchiveStore(s3_client(config), config.archive_bucket)
    per_file = ROWS // (DAYS * PARTITIONS)
    today = date.today()
    written = 0
    for d in range(DAYS):
        day = (today - timedelta(days=DAYS - d)).isoformat()
        for p in range(PARTITIONS):
            first = d * per_file
            table = synthetic_rows(day, p, per_file, first)
            key = file_key(PREDICTIONS, day, "predictions", p, first, first + per_file - 1)
            store.put(key, parquet_bytes(table))
            written += per_file
    return written


def measure_queries(config) -> dict:
    from lensflow_archive.query import REPORTS, archive_dataset, connect, report, run_sql

    rows = fill_million(config)
    latencies = {}
    for name in [*REPORTS, "count"]:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            if name == "count":
                run_sql(connect(archive_dataset(config)), "select count(*) from predictions")
            else:
                report(config, name)
            times.append(time.perf_counter() - t0)
        latencies[name] = round(statistics.median(times) * 1000, 1)
    return {"query_rows": rows, "query_files": DAYS * PARTITIONS, "query_ms": latencies}


def measure_lag(env, config, duration_s: float = 40.0) -> dict:
    """Produce at the demo's rates while the archiver follows; when each event is first
    seen by a query of the archive."""
    from lensflow_archive.query import query
    from lensflow_eventing.producer import make_producer
    from tests.support.archive_support import make_prediction, produce

    child = subprocess.Popen(
        [sys.executable, "-m", "lensflow_archive.job", "--follow"],
        env={**os.environ, **env},  # the drain's group: the backlog is committed already
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    produced: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    producer = make_producer(config.kafka, **{"linger.ms": 0})

    def fly() -> None:
        i, started = 10**7, time.monotonic()
        while (elapsed := time.monotonic() - started) < duration_s:
            rate = 30.0 if 10 <= elapsed < 25 else 3.0
            event = make_prediction(i)
            (ident,) = produce(config, [event], producer=producer)
            produced[ident] = time.monotonic()
            i += 1
            time.sleep(1 / rate)
        stop.set()

    flight = threading.Thread(target=fly)
    flight.start()
    deadline = time.monotonic() + duration_s + 60
    while time.monotonic() < deadline and (not stop.is_set() or set(produced) - set(seen)):
        ids = [r[0] for r in query(config, "select id from predictions").rows]
        now = time.monotonic()
        for ident in ids:
            seen.setdefault(ident, now)
        time.sleep(0.5)
    flight.join()
    child.terminate()
    child.wait(30)
    lags = sorted(seen[i] - produced[i] for i in produced if i in seen)
    return {
        "lag_events": len(produced),
        "lag_unseen": len(set(produced) - set(seen)),
        "lag_p50_s": round(percentile(lags, 50), 2),
        "lag_p95_s": round(percentile(lags, 95), 2),
        "lag_max_s": round(lags[-1], 2) if lags else None,
        "lag_flush_s": config.archive_flush_s,
    }


def run(out_dir: Path) -> dict:
    with servers() as (env, config):
        result = measure_throughput(env, config)
        result |= measure_lag(env, config)
    with servers() as (env, config):
        result |= measure_queries(config)
    result["targets"] = {
        "archiver >= 10x a predict replica (one CPU each)": bool(
            result["archiver_to_predict_ratio"] and result["archiver_to_predict_ratio"] >= 10
        ),
        "no event unseen in the lag run": result["lag_unseen"] == 0,
    }
    write_json(out_dir, "archive", result)
    plot(out_dir, result)
    return result


def plot(out_dir: Path, result: dict) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rates = {
        "archiver\n(1 CPU)": result["archiver_predictions_per_s"],
        "predict replica\n(1 CPU)": result["predict_replica_images_per_s_c1"] or 0,
    }
    left.bar(list(rates), list(rates.values()), color=["#2563eb", "#d97706"])
    left.set_yscale("log")
    left.set_ylabel("per second (log)")
    left.set_title("archiver vs the predict function")
    names = list(result["query_ms"])
    right.barh(names, [result["query_ms"][n] for n in names], color="#1e8e3e")
    right.set_xlabel(f"ms, over {result['query_rows']:,} predictions")
    right.set_title("named questions (median of 3)")
    save_plot(fig, out_dir / "archive.png")


if __name__ == "__main__":
    if sys.argv[1:] == ["--drain"]:
        print(json.dumps(drain_here()))
    else:
        print(json.dumps(run(ROOT / "bench" / "results"), indent=2))
