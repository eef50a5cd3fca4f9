"""The Knative manifests: they build, every object validates, Knative's rules hold, names agree.

No cluster runs here, so the suite checks offline what the API server and Knative's webhooks
would check at ``kubectl apply``, against the releases ``knative/versions.yaml`` pins:

- both overlays build with ``kubectl kustomize`` and every rendered object validates strictly
  against the CRDs vendored in ``knative/crds/`` (``tests/support/knative_manifests.py``); broken
  objects (an unknown field, a removed apiVersion) fail that validator;
- the Serving webhook's rules we rely on: autoscaling annotation names and bounds, timeouts
  within max-revision-timeout, and each Service's effective response-start timeout covering
  the longest request; probes that fit the measured cold start;
- training is a batch Job (PingSource -> JobSink) with deadlines, resources and TensorFlow's
  threads bound to the CPU limit;
- names (topics, env variables, ports, refs, the Kafka cluster) agree with
  ``lensflow_core.settings`` and with the Kafka clusters in ``knative/kafka/``.

Security (Kafka auth, users, policies) is in test_knative_security.py; docs/deploy.md against
the manifests in test_knative_deploy_doc.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lensflow_core import settings as config
from tests.support.knative_manifests import (
    KNATIVE,
    NAMESPACES,
    OVERLAYS,
    REPO,
    Doc,
    build,
    config_map,
    cpu_cores,
    env_of,
    go_duration,
    iso_duration,
    of_kind,
    one,
    pod_spec,
    validate,
)

DEFAULTS = {s.name: s.default for s in config.SETTINGS}
SECRET_NAMES = {s.name for s in config.SETTINGS if s.secret}
EMBEDDED_NAMES = {s.name for s in config.SETTINGS if s.embedded}
S3_SECRET_ENV = {"LENSFLOW_S3_ACCESS_KEY", "LENSFLOW_S3_SECRET_KEY"}
EXPECTED_PARTITIONS = {"images": 6, "predictions": 3, "images-dlq": 1}
KAFKA_TOPIC_CLUSTER_LABEL = "strimzi.io/cluster"
KAFKA_CLUSTERS = {"dev": "kafka-dev.yaml", "prod": "kafka-prod.yaml"}
KAFKA_NAMESPACE = "kafka"  # docs/deploy.md: kubectl apply -n kafka -f knative/kafka/...

# Knative Serving 1.21 defaults (config-defaults / config-autoscaler) the checks assume.
MAX_REVISION_TIMEOUT_S = 600
DEFAULT_RESPONSE_START_TIMEOUT_S = 300
CONTAINER_CONCURRENCY_MAX = 1000
# spec.delivery fields the KafkaSource data plane (eventing-kafka-broker 1.21) acts on.
DATA_PLANE_DELIVERY_FIELDS = {"retry", "backoffPolicy", "backoffDelay", "timeout", "deadLetterSink"}
# The lower of the measured per-replica throughputs at c=4 (docs/autoscaling.md).
MEASURED_REPLICA_IMAGES_PER_S = 104
DASHBOARD = "lensflow-dashboard"


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(overlay: str) -> tuple[Doc, ...]:
    return build(overlay)


def predict(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Service", "lensflow-predict", "serving.knative.dev")


def jobsink(docs: tuple[Doc, ...], name: str = "lensflow-train") -> Doc:
    return one(docs, "JobSink", name, "sinks.knative.dev")


def kafka_cluster(overlay: str) -> dict[str, Doc]:
    text = (KNATIVE / "kafka" / KAFKA_CLUSTERS[overlay]).read_text()
    return {d["kind"]: d for d in yaml.safe_load_all(text) if d}


# ------------------------------------------------------------- objects and strict schemas


def test_overlay_builds_the_expected_objects(overlay: str) -> None:
    common = ["ConfigMap", "KafkaSource", "KafkaSink"] + ["PingSource", "JobSink"] * 2
    common += ["KafkaTopic"] * 3 + ["Service"] * 2  # predict and the dashboard
    prod_only = ["KafkaUser"] * 7 + ["EventPolicy"] * 4 + ["NetworkPolicy"] * 4
    prod_only += ["ServiceAccount", "Secret"]
    expected = common + (prod_only if overlay == "prod" else [])
    assert sorted(d["kind"] for d in build(overlay)) == sorted(expected)
    # Topics live with the Kafka cluster; everything else in the overlay's namespace.
    namespaces = {d["metadata"]["namespace"] for d in build(overlay) if d["kind"] != "KafkaTopic"}
    assert namespaces == {NAMESPACES[overlay]}
    # No HTTP train Service: a round is a Job (docs/deploy.md, docs/contract.md "Training on Knative").
    assert sorted(s["metadata"]["name"] for s in of_kind(build(overlay), "Service")) == [
        DASHBOARD,
        "lensflow-predict",
    ]


def test_every_object_validates_against_the_pinned_crds(docs: tuple[Doc, ...]) -> None:
    problems = {f"{d['kind']}/{d['metadata']['name']}": validate(d) for d in docs}
    assert not {k: v for k, v in problems.items() if v}, problems


def _parent(doc: Doc, path: str) -> tuple[Any, str | int]:
    """The node holding the last key of a dotted path (list indexes as numbers), and that key."""
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, int(last) if isinstance(node, list) else last


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node, key = _parent(doc, path)
        node[key] = value

    return mutate


def _rename(path: str, new: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node, key = _parent(doc, path)
        node[new] = node.pop(key)

    return mutate


POD = "spec.template.spec"
JOB = "spec.job.spec"


@pytest.mark.parametrize(
    "overlay_name,kind,mutate,expect",
    [
        ("dev", "Service", _set(f"{POD}.containerConcurency", 2), "containerConcurency"),
        (
            "dev",
            "Service",
            _rename(f"{POD}.containers.0.readinessProbe", "readinesProbe"),
            "readinesProbe",
        ),
        (
            "dev",
            "Service",
            lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
                {"autoscaling.knative.dev/min-scale": 0}
            ),
            "min-scale",
        ),
        ("dev", "Service", _rename("metadata.labels", "label"), "label"),
        ("dev", "PingSource", _rename("spec.schedule", "schedul"), "schedul"),
        ("dev", "KafkaSource", _rename("spec.ordering", "order"), "order"),
        ("dev", "KafkaSource", _set("spec.delivery.retry", "6"), "retry"),
        ("dev", "KafkaSink", _rename("spec.topic", "topics"), "topic"),
        ("dev", "KafkaTopic", _set("apiVersion", "kafka.strimzi.io/v1beta2"), "v1beta2"),
        ("dev", "KafkaTopic", _rename("spec.partitions", "partition"), "partition"),
        (
            "dev",
            "JobSink",
            _rename(f"{JOB}.activeDeadlineSeconds", "activeDeadlineSecond"),
            "activeDeadlineSecond",
        ),
        (
            "dev",
            "JobSink",
            _rename(f"{JOB}.template.spec.containers.0.resources", "resource"),
            "resource",
        ),
        ("dev", "JobSink", _set(f"{JOB}.template.spec.restartPolicy", "Always"), "Always"),
        ("dev", "JobSink", _set("apiVersion", "sinks.knative.dev/v1"), "sinks.knative.dev/v1"),
        (
            "prod",
            "KafkaUser",
            _rename("spec.authorization.acls.0.operations", "operation"),
            "operation",
        ),
        ("prod", "KafkaUser", _set("spec.authentication.type", "scram-sha-256"), "scram-sha-256"),
        ("prod", "KafkaUser", _set("apiVersion", "kafka.strimzi.io/v1beta2"), "v1beta2"),
        ("prod", "EventPolicy", _rename("spec.from", "form"), "form"),
        ("prod", "KafkaSource", _rename("spec.net.sasl.password", "passwd"), "passwd"),
        ("prod", "NetworkPolicy", _rename("spec.podSelector", "podSelecter"), "podSelecter"),
    ],
)
def test_validator_rejects_broken_manifests(
    overlay_name: str, kind: str, mutate: Callable[[Doc], None], expect: str
) -> None:
    doc = copy.deepcopy(next(d for d in build(overlay_name) if d["kind"] == kind))
    assert validate(doc) == []
    mutate(doc)
    errors = validate(doc)
    assert errors and expect in " ".join(errors), errors


# ------------------------------------------------------------------ names and settings


def test_config_env_is_rendered_from_settings() -> None:
    spec = importlib.util.spec_from_file_location("render_config", KNATIVE / "render_config.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (KNATIVE / "base" / "lensflow.env").read_text() == module.render(), (
        "knative/base/lensflow.env is stale: run .venv/bin/python knative/render_config.py"
    )


def test_config_map_names_and_topics_match_config(docs: tuple[Doc, ...]) -> None:
    data = config_map(docs)["data"]
    assert set(data) <= set(DEFAULTS), f"not in SETTINGS: {set(data) - set(DEFAULTS)}"
    assert not set(data) & SECRET_NAMES, "credentials must come from the Secret"
    cluster = set(DEFAULTS) - SECRET_NAMES - EMBEDDED_NAMES  # MinIO notifies on the cluster
    assert cluster - set(data) == set(), "every non-secret setting is set"
    assert not set(data) & EMBEDDED_NAMES, "the embedded stack's own settings stay out"
    for name in ("LENSFLOW_TOPIC_IMAGES", "LENSFLOW_TOPIC_PREDICTIONS", "LENSFLOW_TOPIC_DLQ"):
        assert data[name] == DEFAULTS[name]
    config.Config.from_env(data)  # the values parse


def test_every_lensflow_env_name_exists_in_settings(docs: tuple[Doc, ...]) -> None:
    text = yaml.safe_dump_all(docs) + (KNATIVE / "s3-secret.template.yaml").read_text()
    used = set(re.findall(r"\bLENSFLOW_[A-Z0-9_]+", text))
    known = set(DEFAULTS)
    assert used and used <= known, f"unknown: {used - known}"


@pytest.mark.parametrize("role", ["predict", "train", "archive"])
def test_each_workload_gets_the_config_and_its_own_s3_secret(
    docs: tuple[Doc, ...], role: str
) -> None:
    workload = predict(docs) if role == "predict" else jobsink(docs, f"lensflow-{role}")
    (c,) = pod_spec(workload)["containers"]
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [
        config_map(docs)["metadata"]["name"]
    ]
    env = env_of(c)
    # One MinIO user per role (knative/minio/policies/<role>.json): Secret lensflow-s3-<role>.
    for name in S3_SECRET_ENV:
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": f"lensflow-s3-{role}",
            "key": name,
        }
    literal = [n for n, e in env.items() if n in SECRET_NAMES and "value" in e]
    assert not literal, literal
    template = yaml.safe_load((KNATIVE / "s3-secret.template.yaml").read_text())
    assert template["metadata"]["name"] == "lensflow-s3-${S3_ROLE}"
    assert set(template["stringData"]) == S3_SECRET_ENV <= SECRET_NAMES
    assert all(v == f"${{{k}}}" for k, v in template["stringData"].items()), "template only"


def test_predict_scales_to_zero_and_listens_on_the_port(docs: tuple[Doc, ...]) -> None:
    ksvc = predict(docs)
    annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert "autoscaling.knative.dev/scale-to-zero-pod-retention-period" in annotations
    spec = pod_spec(ksvc)
    (c,) = spec["containers"]
    # In containers the function listens on $PORT, which Knative sets to containerPort.
    assert [p["containerPort"] for p in c["ports"]] == [config.PREDICT_PORT]
    assert int(env_of(c)["THREADS"]["value"]) == spec["containerConcurrency"], (
        "one server thread per request"
    )
    assert float(annotations["autoscaling.knative.dev/target"]) <= spec["containerConcurrency"]


def test_local_replica_pool_matches_the_predict_manifest() -> None:
    """ReplicaPool and EmbeddedStack default to PREDICT_CONCURRENCY: it must be the manifest's."""
    from lensflow.replicas import PREDICT_CONCURRENCY

    ksvc = yaml.safe_load((KNATIVE / "base" / "predict-service.yaml").read_text())
    template = ksvc["spec"]["template"]
    (c,) = template["spec"]["containers"]
    assert template["spec"]["containerConcurrency"] == PREDICT_CONCURRENCY
    assert float(template["metadata"]["annotations"]["autoscaling.knative.dev/target"]) == (
        PREDICT_CONCURRENCY
    )
    assert env_of(c)["THREADS"]["value"] == str(PREDICT_CONCURRENCY)


# ------------------------------------------------------------- Knative's webhook rules

# Serving 1.21 autoscaling annotations (pkg/apis/autoscaling): a misspelt key is silently
# ignored by Knative, so an unknown one fails here.
AUTOSCALING_KEYS = {
    "class",
    "metric",
    "target",
    "target-utilization-percentage",
    "min-scale",
    "max-scale",
    "initial-scale",
    "activation-scale",
    "scale-down-delay",
    "window",
    "panic-window-percentage",
    "panic-threshold-percentage",
    "scale-to-zero-pod-retention-period",
    "max-scale-up-rate",
    "max-scale-down-rate",
}
METRICS = {
    "kpa.autoscaling.knative.dev": {"concurrency", "rps"},
    "hpa.autoscaling.knative.dev": {"cpu", "memory"},
}


def autoscaling(ksvc: Doc) -> dict[str, str]:
    annotations = ksvc["spec"]["template"]["metadata"].get("annotations", {})
    prefix = "autoscaling.knative.dev/"
    return {k[len(prefix) :]: v for k, v in annotations.items() if k.startswith(prefix)}


def check_autoscaling(ksvc: Doc) -> None:
    """Serving's validation of the autoscaling annotations and containerConcurrency."""
    a = autoscaling(ksvc)
    assert set(a) <= AUTOSCALING_KEYS, f"unknown autoscaling keys: {set(a) - AUTOSCALING_KEYS}"
    assert all(isinstance(v, str) for v in a.values()), "annotation values are strings"
    cls = a.get("class", "kpa.autoscaling.knative.dev")
    assert cls in METRICS and a.get("metric", "concurrency") in METRICS[cls]
    low, high = int(a.get("min-scale", "0")), int(a.get("max-scale", "0"))
    assert low >= 0 and high >= 0 and (high == 0 or low <= high)
    assert float(a["target"]) >= 0.01
    assert 1 <= float(a.get("target-utilization-percentage", "70")) <= 100
    assert 6 <= go_duration(a.get("window", "60s")) <= 3600
    assert 1 <= float(a.get("panic-window-percentage", "10")) <= 100
    assert 110 <= float(a.get("panic-threshold-percentage", "200")) <= 1000
    # serving pkg/apis/autoscaling/annotation_validation.go validateLastPodRetention:
    # 0 <= d <= WindowMax (1h); the regex alone could never make it negative
    assert go_duration(a.get("scale-to-zero-pod-retention-period", "0s")) <= 3600
    cc = pod_spec(ksvc)["containerConcurrency"]
    assert 0 <= cc <= CONTAINER_CONCURRENCY_MAX


def test_autoscaling_annotations_pass_the_webhook_rules(docs: tuple[Doc, ...]) -> None:
    for ksvc in of_kind(docs, "Service", "serving.knative.dev"):
        check_autoscaling(ksvc)


def test_broken_autoscaling_annotations_fail_those_rules() -> None:
    ksvc = copy.deepcopy(predict(build("dev")))
    annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
    annotations["autoscaling.knative.dev/maxScale"] = annotations.pop(
        "autoscaling.knative.dev/max-scale"
    )
    with pytest.raises(AssertionError, match="maxScale"):
        check_autoscaling(ksvc)


def test_a_pod_retention_over_the_window_max_fails_those_rules() -> None:
    ksvc = copy.deepcopy(predict(build("dev")))
    annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
    annotations["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] = "1h0m1s"
    with pytest.raises(AssertionError):
        check_autoscaling(ksvc)
    annotations["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] = "1h"
    check_autoscaling(ksvc)


def longest_request_s(docs: tuple[Doc, ...], ksvc: Doc) -> float:
    """The longest any caller waits for this Service: its KafkaSource's per-attempt timeout."""
    timeouts = [
        iso_duration(s["spec"]["delivery"]["timeout"])
        for s in of_kind(docs, "KafkaSource")
        if s["spec"]["sink"]["ref"]["name"] == ksvc["metadata"]["name"]
    ]
    assert timeouts, f"no KafkaSource delivers to {ksvc['metadata']['name']}"
    return max(timeouts)


def test_timeouts_pass_the_webhook_and_cover_the_longest_request(docs: tuple[Doc, ...]) -> None:
    for ksvc in of_kind(docs, "Service", "serving.knative.dev"):
        spec = pod_spec(ksvc)
        timeout = spec.get("timeoutSeconds", DEFAULT_RESPONSE_START_TIMEOUT_S)
        start = spec.get("responseStartTimeoutSeconds", DEFAULT_RESPONSE_START_TIMEOUT_S)
        idle = spec.get("idleTimeoutSeconds", timeout)
        assert 0 < timeout <= MAX_REVISION_TIMEOUT_S
        assert 0 < start <= timeout and 0 < idle <= timeout
        if ksvc["metadata"]["name"] == DASHBOARD:
            continue  # people's pages, not events: no KafkaSource waits on it
        # queue-proxy answers 504 when no response started within `start`: it must not cut
        # a request its caller still waits for.
        assert start >= longest_request_s(docs, ksvc), (
            f"{ksvc['metadata']['name']}: effective response-start timeout {start} s"
        )


def readiness_probe_errors(probe: Doc) -> list[str]:
    """Serving 1.21's webhook rules for a readiness probe (pkg/apis/serving/k8s_validation.go,
    validateReadinessProbe): periodSeconds 0 selects queue-proxy's aggressive probing and then
    forbids timeoutSeconds and failureThreshold; otherwise both must be at least 1."""
    errors = []
    period = probe.get("periodSeconds", 0)
    if period < 0 or probe.get("initialDelaySeconds", 0) < 0:
        errors.append("periodSeconds and initialDelaySeconds must be >= 0")
    if probe.get("successThreshold", 1) < 1:
        errors.append("successThreshold must be >= 1")
    for field in ("timeoutSeconds", "failureThreshold"):
        if period == 0 and probe.get(field, 0) != 0:
            errors.append(f"{field} is disallowed when periodSeconds is zero")
        if period > 0 and probe.get(field, 1) < 1:
            errors.append(f"{field} must be >= 1")
    return errors


def test_probes_wait_for_a_model_and_liveness_is_lenient(docs: tuple[Doc, ...]) -> None:
    (c,) = pod_spec(predict(docs))["containers"]
    ready, live = c["readinessProbe"], c["livenessProbe"]
    # /healthz is 200 only with the pointer's model loaded (503 while the store is unreadable).
    assert ready["httpGet"]["path"] == "/healthz" and "port" not in ready["httpGet"]
    # periodSeconds 0: queue-proxy polls every 50 ms until Ready (serving 1.21
    # pkg/queue/readiness/probe.go, shouldProbeAggressively); any period >= 1 turns that off
    # and adds up to a period to every cold start (docs/autoscaling.md, "Readiness").
    assert ready.get("periodSeconds", 0) == 0, "aggressive readiness probing needs periodSeconds 0"
    assert ready.get("initialDelaySeconds", 0) == 0, "no fixed wait before the first probe"
    assert readiness_probe_errors(ready) == []
    # Liveness must not follow the store (an outage would restart every replica) and gives a
    # busy process a minute.
    assert live["httpGet"]["path"] != ready["httpGet"]["path"]
    assert live["failureThreshold"] * live["periodSeconds"] >= 60
    assert live["timeoutSeconds"] >= 5
    # Knative Serving gates fieldRef/resourceFieldRef in env (kubernetes.podspec-fieldref).
    assert not [
        e for e in c["env"] if {"fieldRef", "resourceFieldRef"} & set(e.get("valueFrom", {}))
    ]


@pytest.mark.parametrize(
    "probe,expect",
    [
        ({"periodSeconds": 0, "failureThreshold": 3}, "failureThreshold is disallowed"),
        ({"periodSeconds": 0, "timeoutSeconds": 1}, "timeoutSeconds is disallowed"),
        ({"periodSeconds": 1, "timeoutSeconds": 0}, "timeoutSeconds must be >= 1"),
        ({"periodSeconds": -1}, "periodSeconds"),
    ],
)
def test_the_webhooks_probe_rules_refuse_what_serving_refuses(probe: Doc, expect: str) -> None:
    assert expect in " ".join(readiness_probe_errors(probe))


# ------------------------------------------------------------------- eventing and training


def test_kafkasource_delivers_images_to_predict(docs: tuple[Doc, ...]) -> None:
    data = config_map(docs)["data"]
    source = one(docs, "KafkaSource", data["LENSFLOW_SOURCE_NAME"])
    assert source["metadata"]["namespace"] == data["LENSFLOW_NAMESPACE"]
    spec = source["spec"]
    # the group the local dispatcher joins and whose lag the dashboard asks, in both settings
    assert spec["consumerGroup"] == data["LENSFLOW_SOURCE_GROUP"]
    assert spec["topics"] == [data["LENSFLOW_TOPIC_IMAGES"]]
    assert spec["bootstrapServers"] == data["LENSFLOW_KAFKA_BOOTSTRAP"].split(",")
    assert spec["ordering"] in ("ordered", "unordered")
    assert "kafka.eventing.knative.dev/delivery.order" not in source["metadata"].get(
        "annotations", {}
    )
    delivery = spec["delivery"]
    # What eventing-kafka-broker 1.21's KafkaSource data plane acts on: its egress contract
    # (proto/contract.proto, EgressConfig; control-plane/pkg/core/config/utils.go,
    # EgressConfigFromDelivery) carries retry, backoff, timeout and the dead-letter sink only.
    # retryAfterMax would pass the CRD and be ignored.
    assert set(delivery) <= DATA_PLANE_DELIVERY_FIELDS, set(delivery) - DATA_PLANE_DELIVERY_FIELDS
    assert delivery["retry"] >= 1, "a delivery block without retry means zero retries"
    assert delivery["backoffPolicy"] == "exponential"
    assert iso_duration(delivery["backoffDelay"]) > 0
    sink_ref, dls_ref = spec["sink"]["ref"], delivery["deadLetterSink"]["ref"]
    assert one(docs, sink_ref["kind"], sink_ref["name"], sink_ref["apiVersion"].split("/")[0])
    assert sink_ref["name"] == "lensflow-predict"
    dls = one(docs, dls_ref["kind"], dls_ref["name"], dls_ref["apiVersion"].split("/")[0])
    assert dls["apiVersion"] == dls_ref["apiVersion"]
    assert dls["spec"]["topic"] == data["LENSFLOW_TOPIC_DLQ"]
    assert dls["spec"]["bootstrapServers"] == spec["bootstrapServers"]


def test_kafkasource_has_one_consumer_per_partition(docs: tuple[Doc, ...]) -> None:
    """spec.consumers defaults to 1 (the CRD says so): one consumer fetching all partitions.
    More than the partitions would idle."""
    source = one(docs, "KafkaSource", "lensflow-images")
    (topic,) = source["spec"]["topics"]
    partitions = {
        t.get("spec", {}).get("topicName", t["metadata"]["name"]): t["spec"]["partitions"]
        for t in of_kind(docs, "KafkaTopic")
    }
    assert source["spec"].get("consumers", 1) == partitions[topic]


def test_in_flight_events_drain_within_the_delivery_timeout(docs: tuple[Doc, ...]) -> None:
    """docs/autoscaling.md, "In flight": every unordered consumer keeps up to
    max.poll.records (50) in flight plus one more poll (eventing-kafka-broker 1.21,
    UnorderedConsumerVerticle), 99 each; what predict cannot serve at once waits in the
    activator and must still be answered within the per-attempt timeout."""
    source = one(docs, "KafkaSource", "lensflow-images")
    in_flight = 99 * source["spec"].get("consumers", 1)
    ksvc = predict(docs)
    max_scale = int(autoscaling(ksvc)["max-scale"])
    per_replica = MEASURED_REPLICA_IMAGES_PER_S
    drain_s = in_flight / (per_replica * max_scale)
    assert drain_s < iso_duration(source["spec"]["delivery"]["timeout"]) / 10, drain_s
    text = (REPO / "docs" / "autoscaling.md").read_text()
    slots = pod_spec(ksvc)["containerConcurrency"] * max_scale
    assert f"**{in_flight} for the six**" in text and f"**{slots}**" in text


def test_pingsource_starts_a_training_job(docs: tuple[Doc, ...]) -> None:
    ping = one(docs, "PingSource", "lensflow-train")
    assert len(ping["spec"]["schedule"].split()) == 5
    assert ping["spec"]["contentType"] == "application/json"
    assert isinstance(json.loads(ping["spec"]["data"]), dict)
    ref = ping["spec"]["sink"]["ref"]
    sink = one(docs, ref["kind"], ref["name"], ref["apiVersion"].split("/")[0])
    assert (sink["apiVersion"], sink["kind"]) == ("sinks.knative.dev/v1alpha1", "JobSink")


def test_pingsource_starts_an_archive_job_that_drains_and_exits(docs: tuple[Doc, ...]) -> None:
    ping = one(docs, "PingSource", "lensflow-archive")
    assert len(ping["spec"]["schedule"].split()) == 5
    ref = ping["spec"]["sink"]["ref"]
    assert (ref["kind"], ref["name"]) == ("JobSink", "lensflow-archive")
    job = jobsink(docs, "lensflow-archive")["spec"]["job"]["spec"]
    assert 0 < job["activeDeadlineSeconds"] <= 3600 and job["ttlSecondsAfterFinished"] > 0
    (c,) = job["template"]["spec"]["containers"]
    assert c["command"] == ["lensflow-archive-job"]  # pyproject's console script, the image's
    assert "lensflow-archive-job" in (REPO / "pyproject.toml").read_text()
    assert cpu_cores(c["resources"]["limits"]["cpu"]) == 1  # the benchmark's one core


def test_training_job_is_bounded_and_sized(docs: tuple[Doc, ...]) -> None:
    job = jobsink(docs)["spec"]["job"]["spec"]
    assert job["backoffLimit"] <= 2
    assert 0 < job["activeDeadlineSeconds"] <= 4 * 3600
    assert job["ttlSecondsAfterFinished"] > 0
    spec = job["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (c,) = spec["containers"]
    # The entry point reads the event JobSink mounts at /etc/jobsink-event/event.
    assert c["command"] == ["lensflow-train-job"]
    resources = c["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    assert cpu_cores(resources["requests"]["cpu"]) <= cpu_cores(resources["limits"]["cpu"])
    # TensorFlow/OpenMP threads follow the CPU limit, whatever the node's core count.
    env = env_of(c)
    for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        assert env[name]["valueFrom"]["resourceFieldRef"] == {
            "resource": "limits.cpu",
            "divisor": "1",
        }, name
    # JobSink mounts the event there itself: nothing else may claim the path.
    mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
    assert not [m for m in mounts if m.startswith("/etc/jobsink-event")]


# ---------------------------------------------------------------------- Kafka topics


def test_topics_exist_on_the_cluster_the_functions_use(docs: tuple[Doc, ...]) -> None:
    data = config_map(docs)["data"]
    topics = {
        t.get("spec", {}).get("topicName", t["metadata"]["name"]): t
        for t in of_kind(docs, "KafkaTopic")
    }
    wanted = {
        data["LENSFLOW_TOPIC_IMAGES"],
        data["LENSFLOW_TOPIC_PREDICTIONS"],
        data["LENSFLOW_TOPIC_DLQ"],
    }
    assert set(topics) == wanted
    for name, topic in topics.items():
        assert topic["apiVersion"] == "kafka.strimzi.io/v1"
        assert topic["spec"]["partitions"] == EXPECTED_PARTITIONS[name]
        # bootstrap <cluster>-kafka-bootstrap.<namespace>.svc:<port> (Strimzi's naming)
        for server in data["LENSFLOW_KAFKA_BOOTSTRAP"].split(","):
            m = re.fullmatch(
                r"([a-z0-9-]+)-kafka-bootstrap\.([a-z0-9-]+)(\.svc(\.cluster\.local)?)?:\d+", server
            )
            assert m, f"not a Strimzi bootstrap service: {server}"
            assert topic["metadata"]["labels"][KAFKA_TOPIC_CLUSTER_LABEL] == m.group(1)
            assert topic["metadata"]["namespace"] == m.group(2)


def test_each_overlay_fits_its_kafka_cluster(overlay: str) -> None:
    """Topic replicas, min.insync.replicas and the listener match knative/kafka/<overlay>."""
    docs = build(overlay)
    cluster = kafka_cluster(overlay)
    kafka, pool = cluster["Kafka"], cluster["KafkaNodePool"]
    assert pool["metadata"]["labels"][KAFKA_TOPIC_CLUSTER_LABEL] == kafka["metadata"]["name"]
    brokers = pool["spec"]["replicas"] if "broker" in pool["spec"]["roles"] else 0
    cluster_isr = int(kafka["spec"]["kafka"]["config"]["min.insync.replicas"])
    for topic in of_kind(docs, "KafkaTopic"):
        assert topic["metadata"]["labels"][KAFKA_TOPIC_CLUSTER_LABEL] == kafka["metadata"]["name"]
        replicas = topic["spec"]["replicas"]
        isr = int(topic["spec"].get("config", {}).get("min.insync.replicas", cluster_isr))
        assert replicas <= brokers, f"{replicas} replicas on {brokers} brokers"
        assert isr <= replicas and (replicas == 1 or isr < replicas), "one broker may be down"
    port = int(config_map(docs)["data"]["LENSFLOW_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
    (listener,) = [x for x in kafka["spec"]["kafka"]["listeners"] if x["port"] == port]
    if overlay == "prod":
        assert brokers >= 3 and all(t["spec"]["replicas"] == 3 for t in of_kind(docs, "KafkaTopic"))
        assert listener["tls"] and listener["authentication"]["type"] == "scram-sha-512"
        assert len(kafka["spec"]["kafka"]["listeners"]) == 1, "no unauthenticated listener"
        assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
        # KafkaUsers live in the lensflow namespace: the User Operator must watch it.
        user_ns = {u["metadata"]["namespace"] for u in of_kind(docs, "KafkaUser")}
        assert user_ns == {kafka["spec"]["entityOperator"]["userOperator"]["watchedNamespace"]}
    else:
        assert not listener["tls"] and "authentication" not in listener
    assert kafka["apiVersion"] == pool["apiVersion"] == "kafka.strimzi.io/v1"


WATCH_FLAG = (
    "kubectl -n kafka set env deployment/strimzi-cluster-operator "
    "STRIMZI_ENTITY_OPERATOR_WATCHED_NAMESPACE_ENABLED=true"
)


def cross_namespace_problem(kafka: Doc, deploy: str) -> str | None:
    """Strimzi >= 1.0.1 deletes the Entity Operator of a cluster whose Topic or User Operator
    watches another namespace unless the Cluster Operator has
    STRIMZI_ENTITY_OPERATOR_WATCHED_NAMESPACE_ENABLED=true (1.2.0,
    EntityOperatorReconciler.java): the deploy guide must set it before the cluster is made."""
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", deploy, re.S))
    operators = kafka["spec"]["entityOperator"]
    watched = {(o or {}).get("watchedNamespace", KAFKA_NAMESPACE) for o in operators.values()}
    if watched == {KAFKA_NAMESPACE}:
        return None
    if WATCH_FLAG not in commands:
        return f"watches {sorted(watched)} but the Cluster Operator never gets the flag"
    if commands.index(WATCH_FLAG) > commands.index("kubectl apply -n kafka -f knative/kafka/"):
        return "the flag is set after the Kafka cluster is applied"
    return None


def test_the_prod_kafka_can_watch_the_lensflow_namespace() -> None:
    deploy = (REPO / "docs" / "deploy.md").read_text()
    kafka = kafka_cluster("prod")["Kafka"]
    assert kafka["spec"]["entityOperator"]["userOperator"]["watchedNamespace"] == "lensflow"
    assert cross_namespace_problem(kafka, deploy) is None
    # The check bites: without the flag step the same cluster is refused.
    assert "never gets the flag" in cross_namespace_problem(kafka, deploy.replace(WATCH_FLAG, ""))
    same_ns = copy.deepcopy(kafka)
    same_ns["spec"]["entityOperator"]["userOperator"] = {}
    assert cross_namespace_problem(same_ns, "") is None


# ------------------------------------------------------------------------ images


FUNCTIONS = ("predict", "train", "archive")
# Each image's hashed lock, made by `make lock` from pyproject's extra of the same name.
LOCKS = {f: f"functions/{f}/requirements.lock" for f in FUNCTIONS}
LOCKS["dashboard"] = "dashboard/requirements.lock"


def dockerfile(function: str) -> str:
    return (REPO / "functions" / function / "Dockerfile").read_text()


def from_images(text: str) -> list[str]:
    """Every FROM's image, ARG defaults substituted (``FROM ${PYTHON_IMAGE} AS build``)."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    images = re.findall(r"^FROM\s+(\S+)", text, re.M)
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), i) for i in images]


def locked(function: str) -> dict[str, tuple[str, list[str]]]:
    """The image's lock (``LOCKS``): normalised name -> (version, hashes)."""
    text = (REPO / LOCKS[function]).read_text()
    entries = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[-1].strip()):
        m = re.match(r"([A-Za-z0-9][\w.-]*)==([^\s;\\]+)", block)
        assert m, f"not a pinned requirement: {block[:80]!r}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        entries[canonicalize_name(m.group(1))] = (m.group(2), hashes)
    return entries


@pytest.mark.parametrize("function", FUNCTIONS)
def test_dockerfile(function: str) -> None:
    text = dockerfile(function)
    # dependencies only from the function's hashed lock, before the code (cache-friendly)
    lock = f"functions/{function}/requirements.lock"
    assert f"COPY {lock} ./" in text
    assert "pip install --require-hashes -r requirements.lock" in text
    assert text.count("pip install") == 1, "nothing installed outside the lock"
    assert text.index(f"COPY {lock}") < text.index("--require-hashes") < text.index("COPY core")
    if function == "predict":
        assert re.search(rf"\bPORT={config.PREDICT_PORT}\b", text)
        assert "--source functions/predict/lensflow_predict/main.py --target predict" in text
    else:  # the JobSink's Job: the command the manifest names, made in the image
        command = f"lensflow-{function}-job"
        assert text.rstrip().endswith(f'CMD ["{command}"]')
        assert f"> /opt/venv/bin/{command}" in text and f"{command} --help" in text
        assert f"-m lensflow_{function}.job" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("0", "root"), "the image runs as a non-root user"
    if function == "predict":
        assert "tensorflow" not in text.replace('! python -c "import tensorflow"', "")


DOCKERFILES = sorted(
    str(p.relative_to(REPO)) for p in REPO.glob("*/**/Dockerfile") if ".venv" not in p.parts
)


def test_every_image_is_checked() -> None:
    assert {"functions/predict/Dockerfile", "dashboard/Dockerfile"} <= set(DOCKERFILES)


@pytest.mark.parametrize("path", DOCKERFILES)
def test_every_base_image_is_pinned_by_digest(path: str) -> None:
    text = (REPO / path).read_text()
    assert "pip install --require-hashes -r requirements.lock" in text
    assert text.count("pip install") == 1, "nothing installed outside a hashed lock"
    images = from_images(text)
    assert len(images) == 2, images  # build and final stage
    for image in images:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
    # the locks are made for the images' Python (Makefile LOCK_PYTHON)
    lock_python = re.search(r"^LOCK_PYTHON := ([\d.]+)$", (REPO / "Makefile").read_text(), re.M)
    assert lock_python and all(f"python:{lock_python.group(1)}-" in i for i in images)


def test_the_digest_check_refuses_a_tag() -> None:
    text = dockerfile("predict").replace("@sha256:", "-untrusted:", 1)
    assert not all(re.fullmatch(r".+@sha256:[0-9a-f]{64}", i) for i in from_images(text))


def wanted_by(extras: dict[str, list[str]], extra: str) -> list[Requirement]:
    """An extra's requirements, with ``lensflow[a,b]`` (the project's own extras) expanded."""
    wanted = []
    for requirement in map(Requirement, extras[extra]):
        if canonicalize_name(requirement.name) == "lensflow":
            wanted += [r for e in sorted(requirement.extras) for r in wanted_by(extras, e)]
        else:
            wanted.append(requirement)
    return wanted


@pytest.mark.parametrize("function", sorted(LOCKS))
def test_lock_is_hashed_and_in_sync_with_pyproject(function: str) -> None:
    """Every requirement of pyproject's dependencies and the function's extra is in the lock,
    at a version its specifier allows; every locked package has hashes; the lock holds nothing
    of the other function's extra that its own does not need (TensorFlow stays out of
    predict)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += wanted_by(project["optional-dependencies"], function)
    entries = locked(function)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{requirement} is not in {LOCKS[function]}"
        version, _ = entries[name]
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)
    assert all(hashes for _, hashes in entries.values()), "a package without --hash"
    if function != "train":
        assert not {n for n in entries if n.startswith("tensorflow")}


def test_lock_check_notices_a_missing_requirement(monkeypatch) -> None:
    entries = locked("predict")
    del entries["pycurl"]
    monkeypatch.setattr(sys.modules[__name__], "locked", lambda function: entries)
    with pytest.raises(AssertionError, match="pycurl"):
        test_lock_is_hashed_and_in_sync_with_pyproject("predict")


def test_dockerignore_keeps_what_the_build_needs() -> None:
    """Every file an image COPYs from the context is let through ``.dockerignore``."""
    kept = [line[1:] for line in (REPO / ".dockerignore").read_text().split() if line[0] == "!"]
    for path in DOCKERFILES:
        lines = re.findall(r"^COPY\s+(.+)$", (REPO / path).read_text(), re.M)
        words = [[w for w in line.split() if not w.startswith("--")] for line in lines]
        sources = [
            w
            for line, ws in zip(lines, words, strict=True)
            if "--from" not in line
            for w in ws[:-1]
        ]
        assert sources, path
        for source in sources:
            assert any(source.rstrip("/") == k.rstrip("/") or source.startswith(k) for k in kept), (
                path,
                source,
            )
