"""Faults injected into a running stack (issue 11): kill -9 of `up`, SIGTERM during an
upload, a broker that restarts empty. Each counts what was sent against what came out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from confluent_kafka.admin import AdminClient

from lensflow.faults import processes_with
from lensflow.process import free_port
from lensflow.servers import KafkaBroker, S3Server
from lensflow.stack import EmbeddedStack
from lensflow_core.settings import Config
from lensflow_eventing.predictions import TopicReader
from lensflow_model_store import ModelStore
from tests.support.env import LABELS, make_env
from tests.support.stack import predicted, publish_model, stack_env, upload

pytestmark = pytest.mark.slow


def keys_on(config: Config, topic: str, timeout_s: float = 20.0) -> list[str]:
    """Every record key of ``topic``, read to its end (duplicates kept)."""
    keys: list[str] = []
    with TopicReader(config.kafka_bootstrap, topic) as reader:
        deadline = time.monotonic() + timeout_s
        while not reader.caught_up and time.monotonic() < deadline:
            keys += [m.key().decode() for m in reader.poll(0.2) if m.key()]
    return keys


def start_up(env: dict[str, str], *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lensflow", "up", "--idle", "30", "--no-dashboard", *extra],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    while not lines or lines[-1].strip():  # the summary ends with an empty line
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"up did not start: {proc.stderr.read()[-2000:]}")
        lines.append(line)
    proc.banner = "".join(lines)  # type: ignore[attr-defined]
    return proc


def running(config: Config):
    return type("Running", (), {"config": config})()


def test_kill_9_of_up_leaves_no_child_behind(tiny_models):
    env = stack_env()
    tag = env["LENSFLOW_IMAGE_BUCKETS"]
    proc = start_up(env)
    try:
        config = Config.from_env(env)
        store = ModelStore.from_config(config)
        store.flip(store.publish(tiny_models["first"], LABELS).version)
        upload(running(config), ["orphans/one.jpg"])
        assert predicted(running(config), {"orphans/one.jpg"}, timeout_s=60)
        assert len(processes_with(tag)) >= 3  # broker, S3, a predict replica (and workers)
    finally:
        proc.kill()  # SIGKILL: nothing of up's own stopping code runs
        proc.wait(10)
    deadline = time.monotonic() + 10
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(tag) == []


def test_sigterm_during_an_upload_drains_every_acknowledged_upload(
    kafka_broker, tiny_models, tmp_path
):
    """Durable (external) servers, so that what `up` left behind can be counted; the S3
    server announces each upload, as MinIO with `mc event add` does."""
    port = free_port()
    env = make_env(f"http://127.0.0.1:{port}", kafka_broker.bootstrap)
    config = Config.from_env(env)
    s3_server = S3Server(port=port, notify=env, log_dir=tmp_path).start()
    proc = start_up(env, "--kafka", kafka_broker.bootstrap, "--s3", s3_server.endpoint)
    acked: list[str] = []
    try:
        assert "in memory" not in proc.banner
        store = ModelStore.from_config(config)
        store.flip(store.publish(tiny_models["first"], LABELS).version)
        keys = [f"drain/{i}.jpg" for i in range(60)]

        def uploader() -> None:
            for start in range(0, len(keys), 5):
                upload(running(config), keys[start : start + 5])
                acked.extend(keys[start : start + 5])
                time.sleep(0.1)

        thread = threading.Thread(target=uploader)
        thread.start()
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)  # in the middle of the upload
        thread.join(60)
        proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
        s3_server.stop()
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "finishing what the broker acknowledged" in err
    bucket = config.image_buckets[0]
    done = set(keys_on(config, config.topic_predictions)) | set(keys_on(config, config.topic_dlq))
    lost = [k for k in acked if f"{bucket}/{k}" not in done]
    assert len(acked) == 60 and lost == []


def test_stop_with_acknowledged_uploads_undone_exits_non_zero_naming_them():
    env = stack_env()
    proc = start_up(env, "--drain-timeout", "2")
    try:
        assert "in memory" in proc.banner  # said at start
        config = Config.from_env(env)
        upload(running(config), ["nomodel/a.jpg", "nomodel/b.jpg", "nomodel/c.jpg"])
        time.sleep(1.0)  # no model: each is answered 503 and retried
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode != 0
    assert "stopped with 3 acknowledged upload(s)" in err and "in-memory broker" in err


def test_dispatcher_resumes_after_the_broker_restarts_empty(tiny_models, tmp_path):
    env = stack_env()
    with EmbeddedStack(env, log_dir=tmp_path, idle_s=30) as stack:
        publish_model(stack, tiny_models["last"])
        assert stack.dispatcher.wait_assigned(30)
        before = [f"restart/before-{i}.jpg" for i in range(10)]
        upload(stack, before)
        bucket = stack.config.image_buckets[0]
        assert {f"{bucket}/{k}" for k in before} <= set(predicted(stack, set(before)))

        [broker] = [s for s in stack.servers if s.name == "kafka"]
        os.killpg(broker.pid, signal.SIGKILL)  # kill -9; then back, empty, on its port
        broker.proc.wait(10)
        with KafkaBroker(port=broker.port, log_dir=tmp_path / "restarted") as again:
            admin = AdminClient({"bootstrap.servers": again.bootstrap})
            deadline = time.monotonic() + 20  # the dispatcher recreates the topics
            while time.monotonic() < deadline:
                topics = admin.list_topics(timeout=5).topics
                if set(stack.config.topics) <= set(topics):
                    break
                time.sleep(0.2)
            assert len(topics[stack.config.topic_predictions].partitions) == 3  # as specified
            after = [f"restart/after-{i}.jpg" for i in range(20)]
            started = time.monotonic()
            upload(stack, after)
            counts = predicted(stack, set(after), timeout_s=60)
            assert {f"{bucket}/{k}" for k in after} <= set(counts)
            assert time.monotonic() - started < 45
