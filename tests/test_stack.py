"""The embedded stack: its own servers on free ports, upload to prediction, no leftovers."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from lensflow.faults import processes_with
from lensflow.process import port_open
from lensflow.stack import EmbeddedStack, ServerPortTaken
from lensflow_core.s3 import s3_client
from lensflow_eventing.predictions import read_predictions
from lensflow_model_store import ModelStore, layout
from tests.support.env import LABELS, make_env
from tests.support.processes import gone
from tests.support.stack import predicted, publish_model, stack_env, upload

pytestmark = pytest.mark.slow


def test_stack_starts_and_stops_without_leaving_processes(tmp_path):
    env = stack_env()
    stack = EmbeddedStack(env, log_dir=tmp_path, dispatch=False)
    with stack:
        assert set(stack.describe()["started"]) == {"kafka", "s3"}
        assert not stack.external
        pids = [pid for group in stack.pids().values() for pid in group]
        assert len(pids) == 3 and len(stack.pids()["archive"]) == 1  # kafka, s3, archiver
        host, port = stack.config.kafka_bootstrap.split(":")
        assert port_open(host, int(port))
        buckets = {b["Name"] for b in s3_client(stack.config).list_buckets()["Buckets"]}
        assert {*stack.config.image_buckets, stack.config.model_bucket} <= buckets
        assert stack.config.archive_bucket in buckets
        assert stack.exports()["LENSFLOW_KAFKA_BOOTSTRAP"] == stack.config.kafka_bootstrap
        assert "LENSFLOW_S3_SECRET_KEY" not in stack.exports()
    assert gone(pids)
    assert not port_open(host, int(port))
    assert (tmp_path / "kafka.log").exists() and (tmp_path / "stack.log").exists()


def test_stack_uses_external_servers_only_when_told(s3_server, kafka_broker, tmp_path):
    env = make_env(s3_server.endpoint, kafka_broker.bootstrap)
    # something listens where the embedded servers would: an error, never adopted
    with pytest.raises(ServerPortTaken, match="--kafka"):
        EmbeddedStack(env, log_dir=tmp_path, dispatch=False).start()
    stack = EmbeddedStack(env, log_dir=tmp_path, dispatch=False, external={"kafka", "s3"})
    with stack:
        assert stack.describe()["started"] == [] and stack.describe()["in_memory"] == {}
        assert set(stack.external) == {"kafka", "s3"}
    assert s3_server.alive and kafka_broker.alive


def test_stack_stops_everything_after_an_exception(tmp_path):
    stack = EmbeddedStack(stack_env(), log_dir=tmp_path, dispatch=False)
    with pytest.raises(RuntimeError, match="boom"), stack:
        pids = [pid for group in stack.pids().values() for pid in group]
        raise RuntimeError("boom")
    assert gone(pids)


def test_upload_to_prediction_through_the_stack_and_a_killed_replica_loses_nothing(
    tiny_models, tmp_path
):
    env = stack_env()
    with EmbeddedStack(env, log_dir=tmp_path, idle_s=30) as stack:
        publish_model(stack, tiny_models["last"])
        assert stack.dispatcher.wait_assigned(30)
        first = [f"e2e/first-{i}.jpg" for i in range(10)]
        upload(stack, first)
        counts = predicted(stack, set(first))
        bucket = stack.config.image_buckets[0]
        assert {f"{bucket}/{k}" for k in first} <= set(counts)
        [p] = [
            p
            for p in read_predictions(
                stack.config.kafka_bootstrap, stack.config.topic_predictions, last=1, timeout_s=5
            )
        ]
        assert p.label == LABELS[2] and p.model_version == "v1"
        assert stack.pool.stats()["cold_starts"] == 1

        # kill every replica mid-stream: nothing uploaded meanwhile may be lost
        second = [f"e2e/second-{i}.jpg" for i in range(40)]
        upload(stack, second[:20])
        for replica in stack.pool.replicas():
            os.killpg(replica.proc.pid, signal.SIGKILL)
        upload(stack, second[20:])
        counts = predicted(stack, set(second), timeout_s=90)
        missing = {k for k in second if f"{bucket}/{k}" not in counts}
        assert not missing
        stats = stack.stats()
        assert stats["predict"]["deaths"] >= 1
        assert stats["dispatcher"]["dead_lettered"] == 0
        pids = [pid for group in stack.pids().values() for pid in group]
    assert gone(pids)


def test_a_short_demo_predicts_every_upload(tiny_models, tmp_path):
    from lensflow.demo import DemoOptions, run_demo
    from lensflow.simulate import Burst

    options = DemoOptions(
        duration_s=4,
        drones=2,
        rate=5,
        bursts=(Burst(3, 1, 1),),
        labelled_fraction=0,
        train_mid_flight=False,
        drain_timeout_s=60,
    )
    with EmbeddedStack(stack_env(), log_dir=tmp_path, idle_s=5) as stack:
        publish_model(stack, tiny_models["first"])
        summary = run_demo(stack, options, live=False, say=lambda text: None)
    assert summary["uploaded"] == 5 * 3 + 15 == summary["predicted_images"]
    assert summary["missing"] == 0 and summary["dead_lettered"] == 0
    assert summary["model_versions"] == {"v1": 30 + summary["duplicates"]}
    # every prediction made is in the archive once (issue 19's done-when)
    archive = summary["archive"]
    assert archive["rows"] == archive["distinct_ids"] == 30 + summary["duplicates"]
    assert (
        archive["with_upload_latency"] == archive["rows"] and archive["upload_latency_p50_ms"] > 0
    )
    assert 0 < summary["latency_s"]["p50"] <= summary["latency_s"]["p95"]
    assert summary["predict"]["cold_starts"] == 1


def test_demo_command_seeds_a_model_flies_and_leaves_nothing_behind():
    import json
    import subprocess
    import sys

    env = stack_env()
    tag = env["LENSFLOW_IMAGE_BUCKETS"]
    reply = subprocess.run(
        [
            sys.executable,
            "-m",
            "lensflow",
            "demo",
            "--json",
            "--duration",
            "3",
            "--rate",
            "4",
            "--burst",
            "none",
            "--no-train",
            "--drones",
            "2",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert reply.returncode == 0, reply.stderr[-2000:]
    summary = json.loads(reply.stdout)
    assert summary["model"]["seeded"] and summary["model"]["version"] == "v1"
    assert summary["uploaded"] == 12 == summary["predicted_images"]
    time.sleep(0.5)
    assert processes_with(tag) == []
    host, port = env["LENSFLOW_KAFKA_BOOTSTRAP"].split(":")
    assert not port_open(host, int(port))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_runs_until_ctrl_c_and_leaves_nothing_behind(sig, tiny_models):
    import subprocess
    import sys

    env = stack_env()
    tag = env["LENSFLOW_IMAGE_BUCKETS"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lensflow", "up", "--idle", "2"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell without job control (`make test &`, some CI runners)
        # starts its children with SIGINT ignored, and Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        banner = [proc.stdout.readline() for _ in range(3)]
        assert "is up" in banner[0] and env["LENSFLOW_KAFKA_BOOTSTRAP"] in banner[1]
        while "dashboard" not in banner[-1]:
            banner.append(proc.stdout.readline())
        assert any("serving    NO MODEL YET" in line for line in banner)  # an empty store, said
        dashboard = banner[-1].split()[-1]
        state = requests.get(f"{dashboard}api/state", timeout=10).json()
        assert state["no_model"] is True and state["pointer"] is None
        # a second shell can use it: one upload gets a prediction (a replica starts)
        config = EmbeddedStack(env, log_dir=None).config
        stack = type("Running", (), {"config": config})()
        ModelStore.from_config(config).publish(tiny_models["first"], LABELS)
        ModelStore.from_config(config).flip("v1")
        upload(stack, ["up/one.jpg"])
        assert predicted(stack, {"up/one.jpg"}, timeout_s=60)
        assert len(processes_with(tag)) >= 3  # kafka, s3, a predict replica (and workers)
        proc.send_signal(sig)
        proc.wait(60)
        out, err = "".join(banner) + proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "export LENSFLOW_TOPIC_IMAGES=" in out and "SECRET" not in out
    assert "the model store is empty" in err
    time.sleep(0.5)
    assert processes_with(tag) == []


@pytest.mark.slow
def test_the_demo_closes_the_learning_loop(tmp_path):
    """Uncertain photos are queued, the scripted labeller labels them into labeled/ (never
    the holdout) and the round they feed promotes a new model mid-flight."""
    from lensflow.demo import DemoOptions, run_demo, summary_text
    from lensflow.scenes import CLASSES
    from lensflow.seeding import seed_training_data
    from lensflow_train import dataset
    from tests.support.tflite_models import tiny_classifier

    env = stack_env(
        LENSFLOW_UNCERTAIN_TOP1="1.01",  # an untrained model is never that sure: all queued
        LENSFLOW_TRAIN_MIN_NEW="12",
        LENSFLOW_TRAIN_EPOCHS="6",
    )
    options = DemoOptions(
        duration_s=14, drones=2, rate=5, bursts=(), train_at=0.2, label_batch=12, drain_timeout_s=60
    )
    with EmbeddedStack(env, log_dir=tmp_path, idle_s=30) as stack:
        store = ModelStore.from_config(stack.config)
        untrained = tiny_classifier(len(CLASSES), size=32, seed=1)
        store.flip(store.publish(untrained, sorted(CLASSES)).version, reason="test")
        seed_training_data(stack.config, 0, 4, seed=5)  # a holdout only
        s3 = s3_client(stack.config)
        holdout_before = dataset.list_split(s3, stack.config.train_bucket, layout.HOLDOUT).keys
        summary = run_demo(stack, options, live=False, say=lambda text: None)
        labeled = dataset.list_split(s3, stack.config.train_bucket, layout.LABELED)
        holdout = dataset.list_split(s3, stack.config.train_bucket, layout.HOLDOUT).keys
    assert summary["missing"] == 0
    rounds = summary["training_rounds"]
    assert rounds and rounds[-1]["outcome"] == "promoted", rounds
    assert summary["promoted_after_labels"] == rounds[-1]["labels_given"] == len(labeled)
    assert len(labeled) >= 12
    assert holdout == holdout_before  # scripts never label the holdout
    assert rounds[-1]["pointer"] == "v2"
    assert "learning loop closed" in summary_text(summary)
