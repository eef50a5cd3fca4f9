"""The embedded S3 announces new objects as MinIO's bucket notification does.

MinIO's record and rules: cmd/event-notification.go (``ToEvent``), internal/event/rules.go
(``NewPattern``), internal/event/config.go (``ValidateFilterRuleValue``),
internal/event/target/kafka.go (record key and value), minio/pkg wildcard/match.go.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from urllib.parse import quote_plus

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from lensflow.process import free_port
from lensflow.servers import KafkaBroker, S3Server
from lensflow.upload import upload_file
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import (
    ObjectEvent,
    notification_record,
    notify_matches,
    notify_pattern,
    parse_notification,
)
from lensflow_eventing.notify_queue import EventQueue, QueueFull
from lensflow_eventing.topics import ensure_topics, topic_specs
from tests.support.env import make_env
from tests.support.kafka_reading import read_topic

MIB = 1024 * 1024


# --- pure: MinIO's filter rules and record --------------------------------------------------


@pytest.mark.parametrize(
    "prefix, suffix, pattern",
    [("", "", "*"), ("drones/", "", "drones/*"), ("", ".jpg", "*.jpg"), ("a*", "*b", "a*b")],
)
def test_the_pattern_is_minios(prefix, suffix, pattern):
    assert notify_pattern(prefix, suffix) == pattern


@pytest.mark.parametrize(
    "key, prefix, suffix, announced",
    [
        ("drones/d1/a.jpg", "drones/", ".jpg", True),
        ("drones/d1/a.png", "drones/", ".jpg", False),
        ("to-label/v1/x.json", "", ".jpg", False),
        ("labeled/forest/a.jpg", "drones/", "", False),
        ("a", "a", "a", False),  # "a*a": prefix and suffix may not overlap
        ("aXa", "a", "a", True),
        ("ab", "a?", "", True),  # '?' is one byte ...
        ("a", "a?", "", True),  # ... and optional at the end of the name (MatchSimple)
        ("any/key with space", "", "", True),
    ],
)
def test_filters_match_as_minio_matches(key, prefix, suffix, announced):
    assert notify_matches(key, prefix, suffix) is announced


@pytest.mark.parametrize(
    "name, value",
    [
        ("LENSFLOW_S3_NOTIFY_PREFIX", "drones/../x"),
        ("LENSFLOW_S3_NOTIFY_PREFIX", "./drones"),
        ("LENSFLOW_S3_NOTIFY_SUFFIX", "\\x.jpg"),
        ("LENSFLOW_S3_NOTIFY_SUFFIX", "x" * 1025),
        ("LENSFLOW_S3_NOTIFY_BUCKETS", "Drone_Images"),
    ],
)
def test_a_malformed_filter_is_refused_naming_the_setting(name, value):
    with pytest.raises(ValueError, match=name):
        Config.from_env({name: value})


def test_a_malformed_filter_stops_up_at_start():
    env = make_env(f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    env["LENSFLOW_S3_NOTIFY_PREFIX"] = "drones/../secret/"
    out = subprocess.run(
        [sys.executable, "-m", "lensflow", "up", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "LENSFLOW_S3_NOTIFY_PREFIX" in json.loads(out.stdout)["error"]


def test_the_record_is_minios():
    event = ObjectEvent(
        "s3:ObjectCreated:Put",
        "drone-images",
        "flight 7/<a&b>.jpg",
        etag="abc",
        size=5,
        content_type="image/jpeg",
        user_metadata={"X-Amz-Meta-Drone": "3"},
    )
    key, value = notification_record(event, principal="lensflow", source_ip="10.0.0.9")
    assert key == b"drone-images/flight 7/<a&b>.jpg"
    assert b"<" not in value and b"\\u003c" in value  # Go's encoding/json escapes
    log = json.loads(value)
    assert list(log) == ["EventName", "Key", "Records"]
    [record] = log["Records"]
    obj = record["s3"]["object"]
    assert obj["key"] == quote_plus("flight 7/<a&b>.jpg") == "flight+7%2F%3Ca%26b%3E.jpg"
    assert obj["userMetadata"] == {"X-Amz-Meta-Drone": "3", "content-type": "image/jpeg"}
    assert record["requestParameters"]["sourceIPAddress"] == "10.0.0.9"
    assert record["source"] == {"host": "10.0.0.9", "port": "", "userAgent": "lensflow"}
    assert parse_notification(value)[0].key == event.key


def test_the_queue_keeps_events_in_order_and_is_bounded(tmp_path):
    queue = EventQueue(tmp_path / "q", limit=2)
    names = [queue.put(json.dumps({"Key": f"b/{i}"}).encode()) for i in range(2)]
    with pytest.raises(QueueFull):
        queue.put(b'{"Key": "b/2"}')
    assert queue.names() == names and len(queue) == 2
    assert queue.read(names[0]) == (b"b/0", b'{"Key": "b/0"}')
    queue.delete(names[0])
    assert EventQueue(tmp_path / "q").names() == names[1:]  # what a new server finds


@pytest.mark.parametrize(
    "train, bucket, key, own",
    [
        ("lensflow-train", "lensflow-train", "to-label/v1/ab.json", "to-label/"),
        ("lensflow-train", "drone-images", "labeled/forest/a.jpg", None),  # a drone's key
        ("drone-images", "drone-images", "labeled/forest/a.jpg", "labeled/"),  # shared
        ("drone-images", "drone-images", "holdout/water/b.jpg", "holdout/"),
        ("drone-images", "drone-images", "drones/d1/c.jpg", None),
        ("lensflow-train", "lensflow-models", "aerial/versions/v1/model.tflite", "aerial/"),
        (
            "lensflow-train",
            "lensflow-archive",
            "predictions/date=2026-12-06/p+0+1-9.parquet",
            "predictions/",
        ),
        ("lensflow-train", "lensflow-archive", "rejects/date=2026-12-06/p+0+1-9.jsonl", "rejects/"),
    ],
)
def test_what_lensflow_writes_itself_is_known_per_bucket(train, bucket, key, own):
    from lensflow_model_store.own import own_prefix

    config = Config.from_env({"LENSFLOW_TRAIN_BUCKET": train})
    assert own_prefix(config, bucket, key) == own


def test_the_archive_prefixes_are_the_archivers():
    from lensflow_archive.store import PREDICTIONS, REJECTS
    from lensflow_model_store.own import ARCHIVE_PREFIXES

    assert ARCHIVE_PREFIXES == (f"{PREDICTIONS}/", f"{REJECTS}/")


# --- a notifying S3 server and a broker -------------------------------------------------------


@pytest.fixture(scope="module")
def notifying(kafka_broker, tmp_path_factory):
    """A notifying S3 server watching one bucket of a fresh environment; (config, server)."""
    port = free_port()
    env = make_env(f"http://127.0.0.1:{port}", kafka_broker.bootstrap)
    with S3Server(port=port, notify=env, log_dir=tmp_path_factory.mktemp("s3")) as server:
        config = Config.from_env(env)
        ensure_buckets(s3_client(config), [*config.buckets, "unwatched"])
        ensure_topics(config.kafka, topic_specs(*config.topics))
        yield config, server


def records_by_key(config: Config, count: int, timeout_s: float = 20.0) -> dict[str, dict]:
    messages = read_topic(config, config.topic_images, count, timeout_s=timeout_s)
    assert all(m.headers() is None for m in messages)  # MinIO's target sets none
    return {m.key().decode(): json.loads(m.value()) for m in messages}


@pytest.mark.slow
def test_every_client_upload_is_announced_once_with_minios_record(notifying):
    from minio import Minio

    config, _ = notifying
    s3, bucket = s3_client(config), config.image_buckets[0]
    upload_file(s3, bucket, "boto/put one.jpg", b"jpeg" * 10, "image/jpeg", {"drone": "7"})
    big = io.BytesIO(b"\xff" * (6 * MIB))  # two parts of 5 MiB and 1 MiB
    chunks = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    s3.upload_fileobj(big, bucket, "boto/multi.bin", Config=chunks)
    s3.copy_object(Bucket=bucket, Key="boto/copy.jpg", CopySource=f"{bucket}/boto/put one.jpg")
    endpoint = config.s3_endpoint.removeprefix("http://")
    minio = Minio(endpoint, config.s3_access_key, config.s3_secret_key, secure=False)
    minio.put_object(bucket, "minio/put.jpg", io.BytesIO(b"m" * 9), 9, "image/jpeg")
    from minio.commonconfig import CopySource

    minio.copy_object(bucket, "minio/copy.jpg", CopySource(bucket, "minio/put.jpg"))
    records = records_by_key(config, 6, timeout_s=10)  # one more would be a duplicate
    names = {key.split("/", 1)[1]: r["EventName"] for key, r in records.items()}
    assert names == {
        "boto/put one.jpg": "s3:ObjectCreated:Put",
        "boto/multi.bin": "s3:ObjectCreated:CompleteMultipartUpload",
        "boto/copy.jpg": "s3:ObjectCreated:Copy",
        "minio/put.jpg": "s3:ObjectCreated:Put",
        "minio/copy.jpg": "s3:ObjectCreated:Copy",
    }
    for key, log in records.items():
        [record] = log["Records"]
        obj, name = record["s3"]["object"], key.split("/", 1)[1]
        head = s3.head_object(Bucket=bucket, Key=name)
        assert log["Key"] == key and record["s3"]["bucket"]["name"] == bucket
        assert obj["key"] == quote_plus(name, safe="")
        assert (obj["size"], obj["eTag"]) == (head["ContentLength"], head["ETag"].strip('"'))
        assert obj["contentType"] == head["ContentType"]
        assert record["requestParameters"]["principalId"] == config.s3_access_key
    put = records[f"{bucket}/boto/put one.jpg"]["Records"][0]["s3"]["object"]
    assert put["userMetadata"] == {"X-Amz-Meta-Drone": "7", "content-type": "image/jpeg"}
    assert records[f"{bucket}/boto/multi.bin"]["Records"][0]["s3"]["object"]["eTag"].endswith("-2")


@pytest.mark.slow
def test_an_unwatched_bucket_gives_no_event_and_no_error(notifying):
    config, _ = notifying
    s3 = s3_client(config)
    s3.put_object(Bucket="unwatched", Key="quiet.jpg", Body=b"x")  # answered as usual
    s3.put_object(Bucket=config.train_bucket, Key="labeled/forest/q.jpg", Body=b"x")
    s3.put_object(Bucket=config.image_buckets[0], Key="after.jpg", Body=b"x")
    keys = set(records_by_key(config, 100, timeout_s=4))  # ones before would come first
    assert f"{config.image_buckets[0]}/after.jpg" in keys
    assert not {"unwatched/quiet.jpg", f"{config.train_bucket}/labeled/forest/q.jpg"} & keys


@pytest.mark.slow
def test_prefix_and_suffix_filters(kafka_broker, tmp_path):
    port = free_port()
    env = make_env(
        f"http://127.0.0.1:{port}",
        kafka_broker.bootstrap,
        LENSFLOW_S3_NOTIFY_PREFIX="drones/",
        LENSFLOW_S3_NOTIFY_SUFFIX=".jpg",
    )
    config = Config.from_env(env)
    with S3Server(port=port, notify=env, log_dir=tmp_path):
        ensure_buckets(s3_client(config), config.buckets)
        ensure_topics(config.kafka, topic_specs(*config.topics))
        s3, bucket = s3_client(config), config.image_buckets[0]
        for key in ("drones/a.jpg", "drones/a.png", "other/a.jpg", "drones/d2/b.jpg", "x.jpg"):
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        keys = set(records_by_key(config, 100, timeout_s=5))
    assert keys == {f"{bucket}/drones/a.jpg", f"{bucket}/drones/d2/b.jpg"}


@pytest.mark.slow
def test_with_the_broker_down_the_event_waits_and_arrives_later(tmp_path):
    kafka_port, s3_port = free_port(), free_port()
    env = make_env(f"http://127.0.0.1:{s3_port}", f"127.0.0.1:{kafka_port}")
    config = Config.from_env(env)
    with S3Server(port=s3_port, notify=env, log_dir=tmp_path) as server:
        ensure_buckets(s3_client(config), config.buckets)
        s3 = s3_client(config)
        started = time.monotonic()
        s3.put_object(Bucket=config.image_buckets[0], Key="while-down.jpg", Body=b"x")
        assert time.monotonic() - started < 5  # the upload never waits for the broker
        assert server.events_waiting() == 1
        time.sleep(1.5)  # a few attempts fail meanwhile
        assert server.events_waiting() == 1
        with KafkaBroker(port=kafka_port, log_dir=tmp_path):
            ensure_topics(config.kafka, topic_specs(*config.topics))
            [key] = records_by_key(config, 1, timeout_s=30)
            assert key == f"{config.image_buckets[0]}/while-down.jpg"
            deadline = time.monotonic() + 10
            while server.events_waiting() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.events_waiting() == 0  # deleted once acknowledged


@pytest.mark.slow
def test_an_event_that_cannot_be_kept_fails_the_upload(kafka_broker, tmp_path):
    """Never a stored object silently without its event: 503 SlowDown, upload again."""
    port = free_port()
    env = make_env(f"http://127.0.0.1:{port}", kafka_broker.bootstrap)
    config = Config.from_env(env)
    with S3Server(port=port, notify=env, log_dir=tmp_path) as server:
        s3 = s3_client(config, retries=0)
        ensure_buckets(s3, config.buckets)
        shutil.rmtree(server.queue_dir)
        server.queue_dir.write_text("not a folder")  # the next event cannot be written
        with pytest.raises(ClientError, match="SlowDown"):
            s3.put_object(Bucket=config.image_buckets[0], Key="lost?.jpg", Body=b"x")
        server.queue_dir.unlink()
        server.queue_dir.mkdir()
        s3.put_object(Bucket=config.image_buckets[0], Key="lost?.jpg", Body=b"x")  # again
        ensure_topics(config.kafka, topic_specs(*config.topics))
        assert list(records_by_key(config, 1)) == [f"{config.image_buckets[0]}/lost?.jpg"]


# --- the done-when: on the embedded stack -------------------------------------------------


def _settled(stack, keys: set[str], delivered: int) -> dict[str, int]:
    """Predictions per key once the dispatcher answered ``delivered`` events and a moment
    passed with nothing new (so a second prediction would have shown)."""
    from tests.support.stack import predicted

    deadline = time.monotonic() + 60
    while stack.dispatcher.stats()["delivered"] < delivered and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    return predicted(stack, keys)


@pytest.mark.slow
def test_on_the_stack_put_multipart_and_copy_each_give_one_prediction(tiny_models, tmp_path):
    from lensflow.scenes import scene_jpeg
    from lensflow.stack import EmbeddedStack
    from tests.support.stack import publish_model, stack_env

    with EmbeddedStack(stack_env(), log_dir=tmp_path, idle_s=30) as stack:
        publish_model(stack, tiny_models["first"])
        assert stack.dispatcher.wait_assigned(30)
        s3, bucket = s3_client(stack.config), stack.config.image_buckets[0]
        photo = scene_jpeg("field", 1, (320, 240))
        s3.put_object(Bucket=bucket, Key="put.jpg", Body=photo, ContentType="image/jpeg")
        padded = io.BytesIO(photo + b"\0" * (6 * MIB))  # decoders stop at end-of-image
        chunks = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
        s3.upload_fileobj(padded, bucket, "multi.jpg", Config=chunks)
        s3.copy_object(Bucket=bucket, Key="copy.jpg", CopySource=f"{bucket}/put.jpg")
        keys = {"put.jpg", "multi.jpg", "copy.jpg"}
        counts = _settled(stack, keys, 3)
        stats = stack.stats()["dispatcher"]
    assert counts == {f"{bucket}/{key}": 1 for key in keys}
    assert (stats["delivered"], stats["dead_lettered"]) == (3, 0)


@pytest.mark.slow
def test_a_shared_bucket_notified_whole_never_feeds_back(tiny_models, tmp_path, monkeypatch):
    """Train bucket = image bucket, every key announced: the labelling queue's records and
    the labelled and holdout copies arrive as events, and predict skips each with a 2xx."""
    from lensflow.cli import main
    from lensflow.scenes import scene_jpeg
    from lensflow.stack import EmbeddedStack
    from lensflow_model_store.label_queue import LabelQueue
    from tests.support.stack import publish_model, stack_env

    env = stack_env(LENSFLOW_UNCERTAIN_TOP1="1.01")  # every prediction is uncertain: queued
    env["LENSFLOW_TRAIN_BUCKET"] = env["LENSFLOW_IMAGE_BUCKETS"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with EmbeddedStack(env, log_dir=tmp_path, idle_s=30) as stack:
        config = stack.config
        assert config.notify_buckets == (config.train_bucket,) and not config.notify_prefix
        publish_model(stack, tiny_models["random"])
        assert stack.dispatcher.wait_assigned(30)
        s3, bucket = s3_client(config), config.image_buckets[0]
        for i, key in enumerate(("a.jpg", "b.jpg")):
            upload_file(s3, bucket, key, scene_jpeg("water", i, (160, 120)), "image/jpeg")
        queue = LabelQueue(s3, bucket, 10)
        deadline = time.monotonic() + 60
        while len(queue.pending()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert main(["label", "forest", f"{bucket}/a.jpg"]) == 0
        assert main(["label", "holdout", "water", f"{bucket}/b.jpg"]) == 0
        # 2 photos, 2 queue records, 1 labelled and 1 holdout copy, and the 2 decisions
        # (who labelled what, under decisions/): 8 events, 2 images
        counts = _settled(stack, {"a.jpg", "b.jpg"}, 8)
        stats = stack.stats()["dispatcher"]
        dead = read_topic(config, config.topic_dlq, 1, timeout_s=3)
        written = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"labeled/forest/a.jpg", "holdout/water/b.jpg"} <= written
    assert sum(key.startswith("decisions/") for key in written) == 2
    assert counts == {f"{bucket}/a.jpg": 1, f"{bucket}/b.jpg": 1}  # nothing predicted twice
    assert dead == [] and stats["dead_lettered"] == 0
    assert stats["delivered"] == 8
