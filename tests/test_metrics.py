"""Prometheus metrics and trace context: a real predict replica, real S3 and broker."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import requests
from cloudevents.http import from_http
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lensflow.function_server import knative_request
from lensflow.process import http_ok
from lensflow.scenes import scene_jpeg
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.dispatcher_metrics import dispatcher_registry
from lensflow_eventing.topics import ensure_topics, topic_specs
from lensflow_eventing.tracing import new_trace, parse_traceparent
from lensflow_train.metrics import RoundMetrics, write_textfile
from tests.support.env import make_env
from tests.support.functions_harness import FunctionServer, knative_post, put_and_notify
from tests.support.kafka_reading import read_topic
from tests.support.predict import start_stack


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a text exposition (parsed strictly)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def label_values(text: str) -> set[str]:
    return {v for (_name, labels) in samples(text) for _k, v in labels}


@pytest.fixture(scope="module")
def replica(s3_server, kafka_broker, tiny_models, tmp_path_factory):
    env = make_env(s3_server.endpoint, kafka_broker.bootstrap, LENSFLOW_LOG_FORMAT="json")
    config, store = start_stack(env, tiny_models)
    log = tmp_path_factory.mktemp("metrics") / "predict.log"
    with FunctionServer("predict", env, log) as server:
        yield server, config, store, s3_client(config), log


def test_predict_metrics_are_prometheus_text_with_bounded_labels(replica):
    server, config, store, s3, _log = replica
    reply = requests.get(f"{server.url}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    before = reply.text
    bucket = config.image_buckets[0]
    key = 'evil/<script>alert("x")</script> 1.jpg'
    ok = put_and_notify(server.url, config, s3, bucket, key, scene_jpeg("water", 1, (160, 120)))
    assert ok.status_code == 200, ok.text
    bad = put_and_notify(server.url, config, s3, bucket, "bad.jpg", b"%PDF not an image" * 10)
    assert bad.status_code == 415
    after = server.prometheus()
    assert value(after, "lensflow_predict_requests_total", status="200") == (
        value(before, "lensflow_predict_requests_total", status="200") + 1
    )
    assert value(after, "lensflow_predict_requests_total", status="415") >= 1
    for stage in ("fetch", "decode", "invoke", "produce"):
        assert value(after, "lensflow_predict_stage_seconds_count", stage=stage) >= 1
        assert value(after, "lensflow_predict_stage_seconds_sum", stage=stage) > 0
    assert value(after, "lensflow_predict_predictions_total", model="aerial", **{"class": "field"})
    served = {
        labels
        for (name, labels), v in samples(after).items()
        if name == "lensflow_predict_model_info" and v == 1
    }
    assert served == {
        (("model", "aerial"), ("sha256", store.current().sha256[:12]), ("version", "v1"))
    }
    # no object key, no event id becomes a label value
    values = label_values(after)
    assert not any("script" in v or "bad.jpg" in v or "partition:" in v for v in values)


def test_stats_counts_are_the_prometheus_counters(replica):
    """``/stats`` reads the same counters ``/metrics`` exposes (one worker: equal)."""
    server, config, store, s3, _log = replica
    bucket = config.image_buckets[0]
    _, removed = _record(bucket, "gone.jpg", "s3:ObjectRemoved:Delete")
    assert knative_post(server.url, config, removed).status_code == 200
    photo = scene_jpeg("field", 4, (96, 96))
    assert put_and_notify(server.url, config, s3, bucket, "counted.jpg", photo).status_code == 200
    stats, text = server.stats(), server.prometheus()
    by_name: dict[str, dict[str, float]] = {}
    for (name, labels), v in samples(text).items():
        by_name.setdefault(name, {})[",".join(v for _k, v in labels)] = v
    assert stats["requests"] == by_name["lensflow_predict_requests_total"]
    assert stats["requests"]["200"] >= 2
    assert stats["skipped"] == sum(by_name["lensflow_predict_skipped_total"].values()) >= 1
    assert value(text, "lensflow_predict_skipped_total", reason="not_created") >= 1
    assert stats["predictions"] == sum(by_name["lensflow_predict_predictions_total"].values())
    assert stats["predictions"] >= 1
    assert stats["uncertain"] == value(text, "lensflow_predict_uncertain_total")
    assert stats["label_queue"] == by_name.get("lensflow_predict_label_queue_total", {})


def test_a_flip_counts_a_swap_and_moves_the_info_metric(replica, tiny_models):
    server, config, store, s3, _log = replica
    swaps = value(server.prometheus(), "lensflow_predict_model_swaps_total")
    store.flip("v2", reason="test", expect="v1")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = server.prometheus()
        if value(text, "lensflow_predict_model_swaps_total") > swaps:
            break
        time.sleep(0.2)
    text = server.prometheus()
    assert value(text, "lensflow_predict_model_swaps_total") == swaps + 1
    info = {
        dict(labels)["version"]: v
        for (name, labels), v in samples(text).items()
        if name == "lensflow_predict_model_info"
    }
    assert info == {"v1": 0.0, "v2": 1.0}
    store.flip("v1", reason="test", expect="v2")


def test_trace_context_is_carried_or_started_and_logged_as_json(replica):
    server, config, store, s3, log = replica
    bucket = config.image_buckets[0]
    s3.put_object(Bucket=bucket, Key="traced.jpg", Body=scene_jpeg("road", 2, (160, 120)))
    _, value_with = _record(bucket, "traced.jpg")
    parent = new_trace()
    headers, body = knative_request(config, value_with, b"k", offset=41)
    reply = requests.post(
        server.url, headers={**headers, "ce-traceparent": parent.traceparent}, data=body, timeout=30
    )
    assert reply.status_code == 200, reply.text
    carried = parse_traceparent(from_http(reply.headers, reply.content)["traceparent"])
    assert carried.trace_id == parent.trace_id and carried.span_id != parent.span_id
    # the HTTP header Knative propagates works too
    headers, body = knative_request(config, value_with, b"k", offset=42)
    other = new_trace()
    reply = requests.post(
        server.url, headers={**headers, "traceparent": other.traceparent}, data=body, timeout=30
    )
    assert parse_traceparent(from_http(reply.headers, reply.content)["traceparent"]).trace_id == (
        other.trace_id
    )
    # none (or a malformed one) arrives: a new, valid, sampled trace is started
    headers, body = knative_request(config, value_with, b"k", offset=43)
    reply = requests.post(
        server.url, headers={**headers, "ce-traceparent": "00-zz-bad"}, data=body, timeout=30
    )
    started = parse_traceparent(from_http(reply.headers, reply.content)["traceparent"])
    assert started is not None and started.sampled
    assert started.trace_id not in (parent.trace_id, other.trace_id)
    # the prediction on the topic carries it as the CloudEvents extension
    records = read_topic(config, config.topic_predictions, 50, timeout_s=5)
    traced = [parse_traceparent(dict(r.headers()).get("ce_traceparent")) for r in records]
    assert parent.trace_id in {t.trace_id for t in traced if t is not None}
    # JSON log lines with trace id, event id, object key and model version
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("trace_id") == parent.trace_id]
    assert mine, lines[-5:]
    assert mine[-1]["event_id"] == "partition:0/offset:41"
    assert mine[-1]["object_key"] == f"{bucket}/traced.jpg"
    assert mine[-1]["model_version"] in ("v1", "v2")


def _record(bucket: str, key: str, event: str = "s3:ObjectCreated:Put") -> tuple[bytes, bytes]:
    from lensflow_eventing.contracts import ObjectEvent, notification_record

    return notification_record(ObjectEvent(event, bucket, key, "e", 10))


def test_metrics_answer_200_while_the_store_is_down(tmp_path):
    env = make_env("http://127.0.0.1:9", "127.0.0.1:9")  # nothing listens on port 9
    server = FunctionServer("predict", env, tmp_path / "predict.log")
    server.start(http_ok(f"{server.url}/metrics"), timeout_s=60)
    try:
        started = time.monotonic()
        reply = requests.get(f"{server.url}/metrics", timeout=10)
        assert reply.status_code == 200 and time.monotonic() - started < 5
        assert "lensflow_predict_requests" in reply.text
    finally:
        server.stop()


def test_two_gunicorn_workers_add_up_in_multiprocess_mode(
    s3_server, kafka_broker, tiny_models, tmp_path
):
    env = make_env(
        s3_server.endpoint,
        kafka_broker.bootstrap,
        WORKERS="2",
        THREADS="1",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
    )
    (tmp_path / "prom").mkdir()
    config, _store = start_stack(env, tiny_models)
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    sent = 12
    with FunctionServer("predict", env, tmp_path / "predict.log") as server:
        statuses: list[int] = []

        def post(i: int) -> None:
            # a worker is ready once its own Kafka check passed: 503 until then, retried
            for _ in range(50):
                reply = put_and_notify(
                    server.url, config, s3, bucket, f"mp/{i}.jpg", scene_jpeg("field", i, (96, 96))
                )
                if reply.status_code != 503:
                    break
                time.sleep(0.2)
            statuses.append(reply.status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(sent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * sent
        per_worker = {}
        for _ in range(40):  # each answer comes from one worker: find both
            stats = server.stats()
            per_worker[stats["pid"]] = stats["requests"].get("200", 0)
            if len(per_worker) == 2:
                break
        assert len(per_worker) == 2, per_worker
        assert sum(per_worker.values()) == sent
        for _ in range(4):  # whichever worker answers /metrics, it reports the sum
            text = server.prometheus()
            assert value(text, "lensflow_predict_requests_total", status="200") == sent
            count = value(text, "lensflow_predict_stage_seconds_count", stage="invoke")
            assert count == sent


def test_dispatcher_metrics_come_from_its_stats():
    stats = {
        "delivered": 7,
        "dead_lettered": 2,
        "retried": 5,
        "failed": 1,
        "in_flight": 3,
        "buffered": 4,
        "lag_by_partition": {0: 10, 2: 1},
    }
    text = generate_latest(dispatcher_registry(lambda: stats, "images")).decode()
    assert value(text, "lensflow_dispatcher_delivered_total", topic="images") == 7
    assert value(text, "lensflow_dispatcher_dead_lettered_total", topic="images") == 2
    assert value(text, "lensflow_dispatcher_retries_total", topic="images") == 5
    assert value(text, "lensflow_dispatcher_held_back_total", topic="images") == 1
    assert value(text, "lensflow_dispatcher_in_flight", topic="images") == 3
    assert value(text, "lensflow_dispatcher_lag_records", topic="images", partition="0") == 10
    assert value(text, "lensflow_dispatcher_lag_records", topic="images", partition="2") == 1
    empty = generate_latest(dispatcher_registry(lambda: None, "images")).decode()
    assert value(empty, "lensflow_dispatcher_delivered_total", topic="images") == 0


def test_training_round_metrics_from_the_report(tmp_path):
    registry = CollectorRegistry()
    metrics = RoundMetrics(registry)
    report = {
        "outcome": "promoted",
        "champion": {"evaluation": {"accuracy": 0.5, "macro_f1": 0.4}},
        "challenger": {"evaluation": {"accuracy": 0.8, "macro_f1": 0.75}},
    }
    metrics.record(report, 42.0)
    metrics.record({"outcome": "skipped"}, 0.5)
    metrics.record(None, 1.0, failed=True)
    text = generate_latest(registry).decode()
    assert value(text, "lensflow_train_rounds_total", outcome="promoted") == 1
    assert value(text, "lensflow_train_rounds_total", outcome="skipped") == 1
    assert value(text, "lensflow_train_rounds_total", outcome="failed") == 1
    assert value(text, "lensflow_train_round_duration_seconds_count") == 3
    assert value(text, "lensflow_train_round_duration_seconds_sum") == 43.5
    assert value(text, "lensflow_train_score", role="challenger", metric="macro_f1") == 0.75
    assert value(text, "lensflow_train_score", role="champion", metric="accuracy") == 0.5
    assert value(text, "lensflow_train_last_promoted") == 0  # the last round failed
    path = tmp_path / "round.prom"
    write_textfile(str(path), report, 12.5)
    written = path.read_text()
    assert value(written, "lensflow_train_last_promoted") == 1
    assert value(written, "lensflow_train_round_duration_seconds_sum") == 12.5


def test_opentelemetry_export_is_off_by_default_and_on_with_otel_variables(capsys):
    import subprocess
    import sys

    from lensflow_eventing.tracing import span

    probe = (
        "import sys; from lensflow_eventing.tracing import new_trace, span\n"
        "with span('x', new_trace()) as t: pass\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
        "print(t.traceparent)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert parse_traceparent(out.stdout.strip()) is not None

    parent = new_trace()
    capsys.readouterr()
    with span(
        "lensflow.predict",
        parent,
        {"cloudevents.event_id": "e-1"},
        env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "lensflow-test"},
    ) as mine:
        pass
    exported = json.loads(capsys.readouterr().out)
    assert exported["context"]["trace_id"] == f"0x{parent.trace_id}"
    assert exported["context"]["span_id"] == f"0x{mine.span_id}"
    assert exported["parent_id"] == f"0x{parent.span_id}"
    assert exported["attributes"]["cloudevents.event_id"] == "e-1"
    assert exported["resource"]["attributes"]["service.name"] == "lensflow-test"
    assert mine.trace_id == parent.trace_id and mine.sampled


def test_dispatch_command_serves_its_metrics(kafka_env, tmp_path):
    import subprocess
    import sys

    from lensflow.process import free_port

    config = Config.from_env(kafka_env)
    ensure_topics(config.kafka, topic_specs(*config.topics))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lensflow",
            "dispatch",
            "--sink",
            "http://127.0.0.1:9/",
            "--metrics-port",
            str(port),
            "--group",
            "metrics-test",
        ],
        env={**os.environ, **kafka_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                if "lensflow_dispatcher_in_flight{" in text:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        topic = config.topic_images
        assert ("lensflow_dispatcher_delivered_total", (("topic", topic),)) in samples(text)
        assert value(text, "lensflow_dispatcher_in_flight", topic=topic) == 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
