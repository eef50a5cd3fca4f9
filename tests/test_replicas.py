"""The local scale-to-zero stand-in, with real predict replicas."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from lensflow.function_server import knative_request
from lensflow.replicas import ReplicaPool
from lensflow.scenes import scene_jpeg
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, notification_record
from lensflow_eventing.topics import ensure_topics, topic_specs
from lensflow_model_store import ModelStore
from tests.support.env import LABELS
from tests.support.processes import alive, gone

pytestmark = pytest.mark.slow


@pytest.fixture
def ready_env(kafka_env, tiny_models):
    """Buckets, topics and a model: what a replica needs to answer 200."""
    config = Config.from_env(kafka_env)
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    store = ModelStore.from_config(config)
    store.publish(tiny_models["first"], LABELS)
    store.flip("v1", reason="test")
    return kafka_env


def upload_event(config: Config, key: str, size=(640, 480), offset: int = 0):
    """Put a scene in the image bucket; the (headers, body) a KafkaSource would POST."""
    data = scene_jpeg("field", seed=offset, size=size)
    bucket = config.image_buckets[0]
    etag = s3_client(config).put_object(
        Bucket=bucket, Key=key, Body=data, ContentType="image/jpeg"
    )["ETag"]
    record_key, value = notification_record(
        ObjectEvent("s3:ObjectCreated:Put", bucket, key, etag, len(data), "image/jpeg")
    )
    return knative_request(config, value, record_key, offset)


def test_cold_start_on_first_event_then_scale_to_zero(ready_env, tmp_path):
    config = Config.from_env(ready_env)
    headers, body = upload_event(config, "cold/one.jpg")
    with ReplicaPool(ready_env, idle_s=1.5, log_dir=tmp_path) as pool:
        assert pool.stats()["replicas"] == 0  # nothing runs before the first event
        started = time.monotonic()
        status, reply, _ = pool.post(headers, body, 30)
        took = time.monotonic() - started
        assert status == 200, reply
        stats = pool.stats()
        assert stats["cold_starts"] == 1 and stats["replicas"] == 1
        assert stats["last_cold_start_s"] <= took < 30
        pids = stats["pids"]

        status, _, _ = pool.post(headers, body, 30)  # warm: no new start
        assert status == 200 and pool.stats()["cold_starts"] == 1

        assert pool.wait_for(0, timeout_s=10), pool.stats()  # idle: scaled to zero
        assert pool.stats()["scale_downs"] == 1
        assert gone(pids)

        status, _, _ = pool.post(headers, body, 30)  # and back from zero
        assert status == 200 and pool.stats()["cold_starts"] == 2
    assert not any(alive(pid) for pid in pool.stats()["pids"] + pids)


def test_concurrent_load_scales_up_to_max(ready_env, tmp_path):
    config = Config.from_env(ready_env)
    events = [upload_event(config, f"load/{i}.jpg", size=(2400, 1800), offset=i) for i in range(4)]
    with ReplicaPool(
        ready_env, target_concurrency=1, max_replicas=3, idle_s=30, log_dir=tmp_path
    ) as pool:
        assert pool.post(*events[0], 30)[0] == 200  # one warm replica
        assert pool.stats()["replicas"] == 1
        stop = threading.Event()
        statuses: list[int] = []

        def hammer(i: int) -> None:
            while not stop.is_set():
                statuses.append(pool.post(*events[i % len(events)], 30)[0])

        with ThreadPoolExecutor(6) as workers:
            for i in range(6):
                workers.submit(hammer, i)
            loaded = time.monotonic()
            assert pool.wait_for(3, timeout_s=30), pool.stats()
            reaction = time.monotonic() - loaded
            time.sleep(1.0)  # the last one to start gets some of the load too
            stop.set()
        stats = pool.stats()
        assert stats["scale_ups"] == 2 and stats["cold_starts"] == 1
        assert set(statuses) == {200}
        served = [r.served for r in pool.replicas()]
        assert all(n > 0 for n in served), served  # the new replicas take traffic
        print(f"scale-up to 3 replicas in {reaction:.2f} s; {len(statuses)} requests")


def test_killed_replica_is_replaced_and_requests_fail_as_network_errors(ready_env, tmp_path):
    config = Config.from_env(ready_env)
    headers, body = upload_event(config, "kill/one.jpg")
    with ReplicaPool(ready_env, idle_s=30, log_dir=tmp_path) as pool:
        assert pool.post(headers, body, 30)[0] == 200
        [victim] = pool.replicas()
        os.killpg(victim.proc.pid, signal.SIGKILL)
        time.sleep(0.05)
        try:
            status, _, _ = pool.post(headers, body, 30)
        except requests.ConnectionError:  # the dead one's connection (or the pool noticed first)
            status = None
        if status is None:
            assert pool.post(headers, body, 30)[0] == 200
        stats = pool.stats()
        assert stats["deaths"] == 1 and stats["replicas"] == 1
        assert victim.proc.pid not in stats["pids"]


def test_pool_stop_leaves_no_process(ready_env, tmp_path):
    config = Config.from_env(ready_env)
    headers, body = upload_event(config, "stop/one.jpg")
    pool = ReplicaPool(ready_env, max_replicas=2, target_concurrency=1, log_dir=tmp_path).start()
    with ThreadPoolExecutor(2) as workers:
        list(workers.map(lambda _: pool.post(headers, body, 30), range(2)))
    pids = pool.stats()["pids"]
    assert pids
    pool.stop()
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(ConnectionError):
        pool.post(headers, body, 5)
