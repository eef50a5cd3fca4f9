"""Dead letters as a workflow: list by reason, show, replay the original records once."""

from __future__ import annotations

import json

import pytest
from cloudevents.http import CloudEvent
from confluent_kafka import Producer

from lensflow.cli import main as lensflow
from lensflow.scenes import scene_jpeg
from lensflow.stack import dispatcher_for
from lensflow_core.kafka import client_settings
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, notification_record
from lensflow_eventing.dead_letter import kafka_binary
from lensflow_eventing.delivery import DeliverySpec
from lensflow_eventing.dlq_replay import parse_since
from lensflow_eventing.topics import ensure_topics, topic_specs
from lensflow_model_store import ModelStore
from tests.support.env import LABELS
from tests.support.functions_harness import FunctionServer
from tests.support.kafka_reading import read_topic
from tests.support.waiting import wait_for

NO_RETRY = DeliverySpec(retry=0, backoff_delay_s=0.01, timeout_s=10)


def run(capsys, *argv: str):
    """``lensflow ARGV --json``: (exit code, parsed output)."""
    capsys.readouterr()
    code = lensflow([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


@pytest.fixture
def pipeline(kafka_env, monkeypatch, tmp_path):
    """A predict replica with no model yet, and a dispatcher that never retries."""
    for name, value in kafka_env.items():
        monkeypatch.setenv(name, value)
    config = Config.from_env(kafka_env)
    ensure_topics(config.kafka, topic_specs(*config.topics))
    with FunctionServer("predict", kafka_env, tmp_path / "predict.log") as server:
        # max_waiting_s=0: as if the wait for a model had run out at once
        dispatcher = dispatcher_for(config, server.url, delivery=NO_RETRY, max_waiting_s=0).start()
        try:
            yield config, dispatcher
        finally:
            dispatcher.stop()


def test_dead_letters_are_listed_by_reason_and_replayed_once(pipeline, capsys, tiny_models):
    config, dispatcher = pipeline
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    producer = Producer(client_settings(config.kafka))
    originals = {}
    for i in range(2):  # good images uploaded before any model exists: 503, dead-lettered
        key = f"early/<script>{i}.jpg"
        s3.put_object(Bucket=bucket, Key=key, Body=scene_jpeg("water", i, (96, 96)))
        record_key, value = notification_record(
            ObjectEvent("s3:ObjectCreated:Put", bucket, key, "e", 10)
        )
        headers = {"traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        producer.produce(
            config.topic_images, key=record_key, value=value, headers=list(headers.items())
        )
        originals[record_key] = (value, headers)
    producer.produce(config.topic_images, key=b"junk", value=b"{not json")  # 400
    producer.flush(10)
    # a dead letter that is not an images-topic record
    foreign = CloudEvent(
        {
            "type": "com.example.other",
            "source": "/elsewhere",
            "knativeerrorcode": "500",
            "knativeerrordest": "x",
        },
        b"{}",
    )
    producer.produce(config.topic_dlq, **_message(kafka_binary(foreign, b"foreign")))
    producer.flush(10)

    def listed():
        code, rows = run(capsys, "dlq", "list")
        return rows if code == 0 and sum(r["count"] for r in rows) == 4 else None

    rows = wait_for(listed, 40, "four dead letters")
    by_code = {(r["code"], r["reason"]): r for r in rows}
    no_model = by_code[(503, "no model is being served yet")]
    assert no_model["count"] == 2 and no_model["replayable"] == 2 and no_model["replayed"] == 0
    assert no_model["oldest"] <= no_model["newest"]
    assert any(code == 400 and r["count"] == 1 for (code, _), r in by_code.items())
    assert by_code[(500, "HTTP 500")]["replayable"] == 0

    code, shown = run(capsys, "dlq", "show", "--reason", "503")
    assert code == 0 and len(shown) == 2
    assert json.loads(shown[0]["error_data"])["error"] == "no model is being served yet"
    assert shown[0]["key"].startswith(f"{bucket}/early/<script>")
    part, off = shown[0]["partition"], shown[0]["offset"]
    code, one = run(capsys, "dlq", "show", "--partition", str(part), "--offset", str(off))
    assert code == 0 and [d["offset"] for d in one] == [off]

    # dry run: says what, changes nothing
    code, dry = run(capsys, "dlq", "replay", "--reason", "no model", "--dry-run")
    assert code == 0 and dry["dry_run"] and len(dry["replayed"]) == 2
    # a model appears; the replay sends the original records again, exactly
    store = ModelStore.from_config(config)
    store.publish(tiny_models["first"], LABELS)
    store.flip("v1", reason="test")
    delivered_before = dispatcher.stats()["delivered"]
    code, done = run(capsys, "dlq", "replay", "--reason", "no model")
    assert code == 0 and len(done["replayed"]) == 2 and not done["dry_run"]
    replayed = [m for m in read_topic(config, config.topic_images, 5) if m.key() in originals]
    assert len(replayed) == 4  # the two first sendings and the two replays
    for message in replayed:
        value, headers = originals[message.key()]
        assert message.value() == value and dict(message.headers() or []) == headers
    wait_for(
        lambda: dispatcher.stats()["delivered"] >= delivered_before + 2, 30, "replays delivered"
    )
    predicted = read_topic(config, config.topic_predictions, 2, timeout_s=20)
    assert sorted(m.key() for m in predicted) == sorted(originals)
    # the records' traceparent header went through the dispatcher (kafkaheadertraceparent)
    # and the function onto the predictions
    for message in predicted:
        carried = dict(message.headers())["ce_traceparent"].decode()
        assert carried.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    # a re-run replays nothing; the list says they were replayed
    code, again = run(capsys, "dlq", "replay", "--reason", "no model")
    assert code == 0 and again["replayed"] == []
    assert {s["why"] for s in again["skipped"]} == {"replayed already"}
    code, rows = run(capsys, "dlq", "list", "--reason", "no model")
    assert rows[0]["replayed"] == 2
    # everything else: the foreign record is refused, the junk one is replayed
    code, rest = run(capsys, "dlq", "replay")
    assert [s["why"] for s in rest["skipped"] if s["why"].startswith("refused")]
    assert [r["key"] for r in rest["replayed"]] == ["junk"]


def _message(message) -> dict:
    return {"key": message.key, "value": message.value, "headers": list(message.headers.items())}


def test_bad_options_fail_with_one_line(kafka_env, monkeypatch, capsys):
    for name, value in kafka_env.items():
        monkeypatch.setenv(name, value)
    assert lensflow(["dlq", "list", "--since", "yesterday"]) == 1
    assert "--since" in capsys.readouterr().err
    assert lensflow(["dlq", "show", "--offset", "3"]) == 1


def test_since_parses_times_and_ages():
    now = 1_000_000.0
    assert parse_since("30m", now) == now - 1800
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1970-01-12T13:46:40Z") == 1_000_000.0
    with pytest.raises(ValueError):
        parse_since("last tuesday")


def test_uploads_before_the_first_model_wait_for_it_instead_of_dying(
    kafka_env, tmp_path, tiny_models
):
    config = Config.from_env(kafka_env)
    ensure_topics(config.kafka, topic_specs(*config.topics))
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    with FunctionServer("predict", kafka_env, tmp_path / "predict.log") as server:
        dispatcher = dispatcher_for(config, server.url, delivery=NO_RETRY).start()
        try:
            producer = Producer(client_settings(config.kafka))
            s3.put_object(Bucket=bucket, Key="first.jpg", Body=scene_jpeg("water", 1, (96, 96)))
            key, value = notification_record(
                ObjectEvent("s3:ObjectCreated:Put", bucket, "first.jpg", "e", 10)
            )
            producer.produce(config.topic_images, key=key, value=value)
            producer.flush(10)
            # the function says "no model yet": no retry budget (0 here) is spent, it waits
            wait_for(lambda: server.stats()["requests"].get("503", 0) >= 2, 30, "503s")
            stats = dispatcher.stats()
            assert stats["dead_lettered"] == 0 and stats["in_flight"] == 1
            store = ModelStore.from_config(config)
            store.publish(tiny_models["first"], LABELS)
            store.flip("v1", reason="test")
            wait_for(lambda: dispatcher.stats()["delivered"] == 1, 30, "delivered once served")
            assert dispatcher.stats()["dead_lettered"] == 0
            predicted = read_topic(config, config.topic_predictions, 1, timeout_s=10)
            assert [m.key() for m in predicted] == [key]
        finally:
            dispatcher.stop()
