"""The local KafkaSource against a real broker (Tansu) and a real HTTP sink."""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import datetime, timezone

import pytest
from cloudevents.kafka import KafkaMessage, from_binary
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from lensflow.process import free_port
from lensflow.stack import dispatcher_for
from lensflow_core.settings import Config
from lensflow_eventing.contracts import OBJECT_CREATED_PUT, ObjectEvent, notification_record
from lensflow_eventing.delivery import DeliverySpec
from lensflow_eventing.dispatcher import Dispatcher
from lensflow_eventing.topics import ensure_topics, topic_specs
from tests.support.eventing_dispatcher import Sink, wait_until
from tests.support.kafka_reading import read_topic

FAST = DeliverySpec(retry=3, backoff_policy="exponential", backoff_delay_s=0.02, timeout_s=5)


# --- a recording sink ------------------------------------------------------------------------


@pytest.fixture
def sinks():
    made: list[Sink] = []

    def make(respond=None) -> Sink:
        made.append(Sink(respond))
        return made[-1]

    yield make
    for sink in made:
        sink.close()


@pytest.fixture
def dispatchers():
    made: list[Dispatcher] = []

    def make(config: Config, sink, **kwargs) -> Dispatcher:
        kwargs.setdefault("delivery", FAST)
        made.append(dispatcher_for(config, sink, **kwargs).start())
        return made[-1]

    yield make
    for dispatcher in made:
        dispatcher.stop()


@pytest.fixture
def topics(kafka_config: Config) -> Config:
    ensure_topics(kafka_config.kafka_bootstrap, topic_specs(*kafka_config.topics))
    return kafka_config


# --- helpers ---------------------------------------------------------------------------------


def producer(config: Config) -> Producer:
    return Producer({"bootstrap.servers": config.kafka_bootstrap})


def produce(config: Config, records: list[tuple[bytes | None, bytes, list | None]]) -> None:
    p = producer(config)
    for key, value, headers in records:
        p.produce(config.topic_images, key=key, value=value, headers=headers)
    assert p.flush(10) == 0


def image_record(bucket: str, key: str) -> tuple[bytes, bytes, None]:
    event = ObjectEvent(
        OBJECT_CREATED_PUT, bucket, key, etag="abc", size=3, content_type="image/jpeg"
    )
    record_key, value = notification_record(event)
    return record_key, value, None


def committed(config: Config, group: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": group})
    topic = config.topic_images
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    consumer.close()
    return {tp.partition: tp.offset for tp in offsets if tp.offset >= 0}


def ce_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("ce-")}


# --- what the function receives --------------------------------------------------------------


def test_plain_record_becomes_the_kafkasource_cloudevent(topics, sinks, dispatchers):
    config = topics
    sink = sinks()
    key, value, _ = image_record("drone-images", "flight 7/img 01.jpg")
    produce(config, [(key, value, [("trace", b"t-1")])])
    dispatcher = dispatchers(config, sink.url, group_id="g-attrs")
    [(headers, body, _)] = sink.wait(1)

    message = read_topic(config, config.topic_images, 1)[0]
    p, o = message.partition(), message.offset()
    stamp = datetime.fromtimestamp(message.timestamp()[1] / 1000, timezone.utc)
    assert ce_headers(headers) == {
        "ce-specversion": "1.0",
        "ce-id": f"partition:{p}/offset:{o}",
        "ce-type": "dev.knative.kafka.event",
        "ce-source": f"/apis/v1/namespaces/default/kafkasources/lensflow-images#{config.topic_images}",
        "ce-subject": f"partition:{p}#{o}",
        "ce-time": stamp.isoformat().replace("+00:00", "Z"),
        "ce-key": "drone-images/flight 7/img 01.jpg",
        "ce-partitionkey": "drone-images/flight 7/img 01.jpg",
        "ce-kafkaheadertrace": "t-1",
        "ce-knativekafkapartition": str(p),
        "ce-knativekafkaoffset": str(o),
    }
    assert "content-type" not in headers  # the record had none: neither has the POST
    assert body == value
    wait_until(lambda: committed(config, "g-attrs").get(p) == o + 1, 10, "offset not committed")
    assert dispatcher.stats()["delivered"] == 1


def test_cloudevent_record_passes_through(topics, sinks, dispatchers):
    config = topics
    sink = sinks()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"evt-42"),
        ("ce_type", b"io.example.thing"),
        ("ce_source", b"/somewhere"),
        ("ce_subject", b"a/b"),
        ("ce_myext", b"x"),
        ("content-type", b"application/json"),
    ]
    produce(config, [(b"a/b", b'{"hello": "world"}', headers)])
    dispatchers(config, sink.url, group_id="g-ce")
    [(received, body, _)] = sink.wait(1)
    message = read_topic(config, config.topic_images, 1)[0]
    assert ce_headers(received) == {
        "ce-specversion": "1.0",
        "ce-id": "evt-42",
        "ce-type": "io.example.thing",
        "ce-source": "/somewhere",
        "ce-subject": "a/b",
        "ce-myext": "x",
        "ce-knativekafkapartition": str(message.partition()),
        "ce-knativekafkaoffset": str(message.offset()),
    }
    assert received["content-type"] == "application/json"
    assert body == b'{"hello": "world"}'


# --- retries and dead letters ----------------------------------------------------------------


def test_503_is_retried_with_backoff_then_delivered(topics, sinks, dispatchers):
    config = topics
    sink = sinks(lambda h, b, n: (503, b"busy") if n <= 2 else (200, b"ok"))
    produce(config, [image_record("b", "k.jpg")])
    spec = DeliverySpec(retry=5, backoff_policy="exponential", backoff_delay_s=0.1, timeout_s=5)
    dispatcher = dispatchers(config, sink.url, delivery=spec, group_id="g-retry")
    requests = sink.wait(3)
    gaps = [requests[i + 1][2] - requests[i][2] for i in range(2)]
    assert gaps[0] >= 0.2 * 0.9 and gaps[1] >= 0.4 * 0.9, gaps  # 0.1 * 2^1, 0.1 * 2^2
    assert requests[0][0]["ce-id"] == requests[2][0]["ce-id"]
    wait_until(lambda: dispatcher.stats()["delivered"] == 1, 5)
    stats = dispatcher.stats()
    assert (stats["retried"], stats["dead_lettered"]) == (2, 0)


def test_422_goes_to_the_dead_letter_topic_at_once(topics, sinks, dispatchers):
    config = topics
    reason = json.dumps({"error": "not an image"}).encode() + b" " * 2000  # long body
    sink = sinks(lambda h, b, n: (422, reason))
    key, value, _ = image_record("b", "bad.jpg")
    produce(config, [(key, value, None)])
    dispatcher = dispatchers(config, sink.url, group_id="g-422")
    [(sent, _, _)] = sink.wait(1)
    [dead] = read_topic(config, config.topic_dlq, 1)
    assert dead.key() == key
    headers = dict(dead.headers())
    assert "content-type" not in headers
    event = from_binary(
        KafkaMessage(headers, dead.key(), dead.value()), data_unmarshaller=lambda d: d
    )
    assert event["knativeerrordest"] == sink.url
    assert event["knativeerrorcode"] == "422"
    assert base64.b64decode(event["knativeerrordata"]) == reason[:1024]
    assert event["id"] == sent["ce-id"] and event["type"] == "dev.knative.kafka.event"
    assert event["subject"] == sent["ce-subject"]
    assert event.get_data() == value
    wait_until(lambda: committed(config, "g-422") == {dead_partition(config): 1}, 10)
    time.sleep(0.3)
    assert len(sink.requests) == 1  # never retried
    assert dispatcher.stats()["dead_lettered"] == 1


def dead_partition(config: Config) -> int:
    return read_topic(config, config.topic_images, 1)[0].partition()


def test_retries_exhausted_then_dead_lettered(topics, sinks, dispatchers):
    config = topics
    sink = sinks(lambda h, b, n: (500, b"boom"))
    produce(config, [image_record("b", "k.jpg")])
    dispatcher = dispatchers(
        config, sink.url, group_id="g-exhaust", delivery=DeliverySpec(retry=2, backoff_delay_s=0.01)
    )
    [dead] = read_topic(config, config.topic_dlq, 1)
    assert len(sink.requests) == 3  # the first attempt and two retries
    headers = dict(dead.headers())
    assert headers["ce_knativeerrorcode"] == b"500"
    assert base64.b64decode(headers["ce_knativeerrordata"]) == b"boom"
    wait_until(lambda: dispatcher.stats()["dead_lettered"] == 1, 5)
    assert dispatcher.stats()["retried"] == 2


def test_network_error_dead_letters_without_a_code(topics, dispatchers):
    config = topics
    produce(config, [image_record("b", "k.jpg")])
    url = f"http://127.0.0.1:{free_port()}/"  # nobody listens
    dispatchers(config, url, group_id="g-net", delivery=DeliverySpec(retry=1, backoff_delay_s=0.01))
    [dead] = read_topic(config, config.topic_dlq, 1)
    headers = dict(dead.headers())
    assert headers["ce_knativeerrordest"] == url.encode()
    assert "ce_knativeerrorcode" not in headers and "ce_knativeerrordata" not in headers


class RefusingProducer:
    """A dead-letter topic that is down: every produce fails."""

    def __init__(self):
        self.attempts = 0

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None):
        self.attempts += 1
        on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=0):
        return 0


def test_failed_dead_letter_holds_the_offset(topics, sinks, dispatchers):
    config = topics
    sink = sinks(lambda h, b, n: (422, b"bad") if b"poison" in b else (200, b""))
    same_key = b"b/one-key"  # one partition: the good event sits behind the poisoned one
    produce(config, [(same_key, b'{"poison": 1}', None), (same_key, b'{"fine": 1}', None)])
    refusing = RefusingProducer()
    first = dispatchers(config, sink.url, group_id="g-dlqfail", dead_letter_producer=refusing)
    sink.wait(2)
    wait_until(
        lambda: first.stats()["delivered"] == 1 and first.stats()["failed"] == 1,
        10,
        lambda: str(first.stats()),
    )
    first.stop()
    assert refusing.attempts == 1
    assert committed(config, "g-dlqfail") == {}  # offset 0 was never committed

    second = dispatchers(config, sink.url, group_id="g-dlqfail")  # the topic is back
    [dead] = read_topic(config, config.topic_dlq, 1)
    assert dead.value() == b'{"poison": 1}'
    wait_until(lambda: second.stats()["delivered"] == 1, 15)  # the good one, again
    partition = dead_partition(config)
    second.stop()
    assert committed(config, "g-dlqfail") == {partition: 2}


# --- offsets, restarts, ordering -------------------------------------------------------------


def test_restart_resumes_from_committed_offsets(topics, sinks, dispatchers):
    config = topics
    sink = sinks()
    produce(config, [image_record("b", f"first-{i}.jpg") for i in range(12)])
    first = dispatchers(config, sink.url, group_id="g-restart")
    sink.wait(12)
    wait_until(lambda: first.stats()["delivered"] == 12, 5)
    first.stop()
    produce(config, [image_record("b", f"second-{i}.jpg") for i in range(8)])
    second = dispatchers(config, sink.url, group_id="g-restart")
    wait_until(lambda: second.stats()["delivered"] >= 8, 20, lambda: str(second.stats()))
    keys = [h["ce-key"] for h, _, _ in sink.requests]
    assert {f"b/first-{i}.jpg" for i in range(12)} | {f"b/second-{i}.jpg" for i in range(8)} == set(
        keys
    )
    assert len(keys) == 20  # a clean stop committed everything: no duplicates


def test_ordered_keeps_per_key_order_and_one_in_flight_per_partition(topics, sinks, dispatchers):
    config = topics
    active: dict[str, int] = {}
    overlap = []
    lock = threading.Lock()

    def respond(headers, body, n):
        partition = headers["ce-knativekafkapartition"]
        with lock:
            active[partition] = active.get(partition, 0) + 1
            overlap.append(active[partition])
        time.sleep(0.003 * (n % 4))
        with lock:
            active[partition] -= 1
        return 200, b""

    sink = sinks(respond)
    keys = [f"b/drone-{d}.jpg" for d in range(8)]
    records = [(k.encode(), json.dumps({"seq": i}).encode(), None) for i in range(15) for k in keys]
    produce(config, records)
    dispatchers(config, sink.url, group_id="g-order", ordering="ordered", max_in_flight=8)
    sink.wait(len(records))
    seen: dict[str, list[int]] = {}
    for headers, body, _ in sink.requests:
        seen.setdefault(headers["ce-key"], []).append(json.loads(body)["seq"])
    assert all(seqs == list(range(15)) for seqs in seen.values()), seen
    assert max(overlap) == 1


def test_unordered_commits_only_the_finished_prefix(topics, sinks, dispatchers):
    config = topics
    release = threading.Event()

    def respond(headers, body, n):
        if b'"seq": 0' in body:
            release.wait(10)  # the first event of the partition is slow
        return 200, b""

    sink = sinks(respond)
    key = b"b/same.jpg"
    produce(config, [(key, json.dumps({"seq": i}).encode(), None) for i in range(6)])
    dispatcher = dispatchers(
        config,
        sink.url,
        group_id="g-prefix",
        ordering="unordered",
        max_in_flight=4,
        commit_interval_s=0.05,
    )
    wait_until(lambda: dispatcher.stats()["delivered"] == 5, 15, lambda: str(dispatcher.stats()))
    time.sleep(0.3)  # several commit intervals pass
    assert committed(config, "g-prefix") == {}  # offset 0 is still in flight
    release.set()
    wait_until(lambda: dispatcher.stats()["delivered"] == 6, 5)
    partition = dead_partition(config)
    wait_until(lambda: committed(config, "g-prefix") == {partition: 6}, 5)


def test_two_dispatchers_share_partitions_and_take_over(topics, sinks, dispatchers):
    config = topics
    sink = sinks()
    produce(config, [image_record("b", f"a-{i}.jpg") for i in range(30)])
    one = dispatchers(config, sink.url, group_id="g-two")
    assert one.wait_assigned(15)
    two = dispatchers(config, sink.url, group_id="g-two")
    assert two.wait_assigned(20)
    wait_until(
        lambda: len(one.stats()["partitions"]) + len(two.stats()["partitions"]) == 6,
        20,
        lambda: f"{one.stats()['partitions']} {two.stats()['partitions']}",
    )
    sink.wait(30)
    two.stop()
    produce(config, [image_record("b", f"b-{i}.jpg") for i in range(30)])
    wait_until(
        lambda: len({h["ce-key"] for h, _, _ in sink.requests}) == 60,
        30,
        lambda: f"{len(sink.requests)} requests; {one.stats()}",
    )
    wait_until(lambda: sum(committed(config, "g-two").values()) == 60, 10)


# --- the command ------------------------------------------------------------------------------


def test_dispatch_command_runs_until_sigterm(topics, kafka_env, sinks):
    import os
    import signal
    import subprocess
    import sys

    config = topics
    sink = sinks()
    produce(config, [image_record("b", f"cli-{i}.jpg") for i in range(5)])
    command = [
        sys.executable, "-c", "import sys; from lensflow.cli import main; sys.exit(main())",
        "dispatch", "--sink", sink.url, "--retry", "2", "--backoff-delay", "0.01", "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env={**os.environ, **kafka_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        sink.wait(5, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    stats = json.loads(out)
    assert (stats["delivered"], stats["dead_lettered"], stats["lag"]) == (5, 0, 0)
    assert committed(config, "lensflow-images") == {}  # the source's name is not its group
    assert sum(committed(config, "lensflow-predict").values()) == 5
