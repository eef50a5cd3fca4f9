"""The drone simulator: its schedule, and a few seconds of real flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lensflow.process import free_port
from lensflow.servers import S3Server
from lensflow.simulate import Burst, Plan, Simulator
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import parse_notification
from lensflow_eventing.topics import ensure_topics, topic_specs
from tests.support.env import make_env
from tests.support.kafka_reading import read_topic


def test_burst_parses_and_rejects_nonsense():
    assert Burst.parse("10:20:20") == Burst(10.0, 20.0, 20.0)
    for bad in ("10:20", "x:1:2", "0:1:2", "2:-1:3", "2:1:0"):
        with pytest.raises(ValueError):
            Burst.parse(bad)


def test_schedule_count_is_the_integral_of_the_rate():
    plain = Plan(rate=5, duration_s=10)
    assert len(plain.schedule()) == 50
    bursty = Plan(rate=5, duration_s=60, bursts=(Burst.parse("10:20:20"),))
    times = bursty.schedule()
    assert len(times) == 5 * 40 + 50 * 20
    assert times == sorted(times) and times[0] == 0 and times[-1] < 60
    in_burst = [t for t in times if 20 <= t < 40]
    assert len(in_burst) == 1000
    assert bursty.rate_at(25) == 50 and bursty.rate_at(45) == 5
    assert len(Plan(rate=2.5, duration_s=3).schedule()) == 8  # ceil(7.5): the first at t=0


@pytest.fixture
def notifying_config(kafka_broker, tmp_path):
    """Settings naming an S3 server that announces new objects, as MinIO does."""
    port = free_port()
    env = make_env(f"http://127.0.0.1:{port}", kafka_broker.bootstrap)
    with S3Server(port=port, notify=env, log_dir=tmp_path):
        config = Config.from_env(env)
        ensure_buckets(s3_client(config), config.buckets)
        ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
        yield config


@pytest.mark.slow
def test_a_short_flight_uploads_and_each_photo_becomes_one_event(notifying_config):
    config = notifying_config
    plan = Plan(
        drones=3,
        rate=10,
        duration_s=3,
        bursts=(Burst(3, 1, 1),),
        labelled_fraction=0.25,
        size=(320, 240),
        pool_size=6,
        seed=7,
    )
    planned = len(plan.schedule())
    assert planned == 10 * 2 + 30 * 1
    result = Simulator(config, plan).run()
    assert result.uploaded == planned and result.errors == 0
    assert sum(result.per_drone) == planned and all(result.per_drone)
    assert result.duration_s < 3 + 2 and result.max_behind_s < 1

    records = read_topic(config, config.topic_images, planned + 1, timeout_s=10)
    assert len(records) == planned  # the labelled copies go to the train bucket: no event
    bucket = config.image_buckets[0]
    events = [parse_notification(m.value())[0] for m in records]
    assert {m.key().decode() for m in records} == {e.path for e in events}
    assert all(e.bucket == bucket and e.created and e.size for e in events)
    assert all(e.user_metadata["X-Amz-Meta-Drone"] in ("0", "1", "2") for e in events)

    s3 = s3_client(config)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="drones/")["KeyCount"]
    assert listed == planned
    labelled = s3.list_objects_v2(Bucket=config.train_bucket, Prefix="labeled/")["Contents"]
    assert len(labelled) == result.labelled > 0
    assert {o["Key"].split("/")[1] for o in labelled} <= set(result.per_class)


@pytest.mark.slow
def test_simulate_cli_prints_json(kafka_env):
    env = {**os.environ, **kafka_env}
    reply = subprocess.run(
        [
            sys.executable,
            "-m",
            "lensflow",
            "simulate",
            "--drones",
            "2",
            "--rate",
            "4",
            "--duration",
            "2",
            "--size",
            "160x120",
            "--labelled-fraction",
            "0",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reply.returncode == 0, reply.stderr
    result = json.loads(reply.stdout)
    assert result["uploaded"] == result["planned"] == 8
    assert result["labelled"] == 0


def test_simulate_cli_fails_in_one_line_without_a_stack(env):
    unreachable = {**os.environ, **env, "LENSFLOW_IMAGE_BUCKETS": "no-such-bucket"}
    reply = subprocess.run(
        [sys.executable, "-m", "lensflow", "simulate", "--duration", "1"],
        env=unreachable,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reply.returncode == 1
    assert reply.stderr.count("\n") == 1 and "no-such-bucket" in reply.stderr
