"""The Knative manifests: they build, every object validates, Knative's rules hold, names agree.

No cluster runs here, so the suite checks offline what the API server and Knative's webhooks
would check at ``kubectl apply``, against the releases ``knative/versions.yaml`` pins:

- both overlays build with ``kubectl kustomize`` and every rendered object validates strictly
  against the CRDs vendored in ``knative/crds/`` (``tests/knative_manifests.py``); broken
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
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from lensflow_core import settings as config
from tests.knative_manifests import (
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

# Knative Serving 1.21 defaults (config-defaults / config-autoscaler) the checks assume.
MAX_REVISION_TIMEOUT_S = 600
DEFAULT_RESPONSE_START_TIMEOUT_S = 300
CONTAINER_CONCURRENCY_MAX = 1000


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(overlay: str) -> tuple[Doc, ...]:
    return build(overlay)


def predict(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Service", "lensflow-predict", "serving.knative.dev")


def jobsink(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "JobSink", "lensflow-train", "sinks.knative.dev")


def kafka_cluster(overlay: str) -> dict[str, Doc]:
    text = (KNATIVE / "kafka" / KAFKA_CLUSTERS[overlay]).read_text()
    return {d["kind"]: d for d in yaml.safe_load_all(text) if d}


# ------------------------------------------------------------- objects and strict schemas


def test_overlay_builds_the_expected_objects(overlay: str) -> None:
    common = ["ConfigMap", "Service", "KafkaSource", "KafkaSink", "PingSource", "JobSink"]
    common += ["KafkaTopic"] * 3
    prod_only = ["KafkaUser"] * 5 + ["EventPolicy"] * 3 + ["NetworkPolicy"] * 2
    prod_only += ["ServiceAccount", "Secret"]
    expected = common + (prod_only if overlay == "prod" else [])
    assert sorted(d["kind"] for d in build(overlay)) == sorted(expected)
    # Topics live with the Kafka cluster; everything else in the overlay's namespace.
    namespaces = {d["metadata"]["namespace"] for d in build(overlay) if d["kind"] != "KafkaTopic"}
    assert namespaces == {NAMESPACES[overlay]}
    # No HTTP train Service: a round is a Job (docs/deploy.md, CONTRACT "Training on Knative").
    assert [s["metadata"]["name"] for s in of_kind(build(overlay), "Service")] == [
        "lensflow-predict"
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


@pytest.mark.parametrize("role", ["predict", "train"])
def test_each_workload_gets_the_config_and_its_own_s3_secret(
    docs: tuple[Doc, ...], role: str
) -> None:
    workload = predict(docs) if role == "predict" else jobsink(docs)
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
    assert go_duration(a.get("scale-to-zero-pod-retention-period", "0s")) >= 0
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
        # queue-proxy answers 504 when no response started within `start`: it must not cut
        # a request its caller still waits for.
        assert start >= longest_request_s(docs, ksvc), (
            f"{ksvc['metadata']['name']}: effective response-start timeout {start} s"
        )


def test_probes_wait_for_a_model_and_liveness_is_lenient(docs: tuple[Doc, ...]) -> None:
    (c,) = pod_spec(predict(docs))["containers"]
    ready, live = c["readinessProbe"], c["livenessProbe"]
    # /healthz is 200 only with the pointer's model loaded (503 while the store is unreadable).
    assert ready["httpGet"]["path"] == "/healthz" and "port" not in ready["httpGet"]
    # Cold start ~0.8 s (docs/benchmarks.md): Ready within a few seconds, out of rotation
    # within ten once the store cannot be read.
    assert ready["initialDelaySeconds"] + ready["periodSeconds"] <= 3
    assert ready["failureThreshold"] * ready["periodSeconds"] <= 10
    # Liveness must not follow the store (an outage would restart every replica) and gives a
    # busy process a minute.
    assert live["httpGet"]["path"] != ready["httpGet"]["path"]
    assert live["failureThreshold"] * live["periodSeconds"] >= 60
    assert live["timeoutSeconds"] >= 5
    # Knative Serving gates fieldRef/resourceFieldRef in env (kubernetes.podspec-fieldref).
    assert not [
        e for e in c["env"] if {"fieldRef", "resourceFieldRef"} & set(e.get("valueFrom", {}))
    ]


# ------------------------------------------------------------------- eventing and training


def test_kafkasource_delivers_images_to_predict(docs: tuple[Doc, ...]) -> None:
    data = config_map(docs)["data"]
    source = one(docs, "KafkaSource", data["LENSFLOW_SOURCE_NAME"])
    assert source["metadata"]["namespace"] == data["LENSFLOW_NAMESPACE"]
    spec = source["spec"]
    assert spec["topics"] == [data["LENSFLOW_TOPIC_IMAGES"]]
    assert spec["bootstrapServers"] == data["LENSFLOW_KAFKA_BOOTSTRAP"].split(",")
    assert spec["ordering"] in ("ordered", "unordered")
    assert "kafka.eventing.knative.dev/delivery.order" not in source["metadata"].get(
        "annotations", {}
    )
    delivery = spec["delivery"]
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


def test_pingsource_starts_a_training_job(docs: tuple[Doc, ...]) -> None:
    (ping,) = of_kind(docs, "PingSource")
    assert len(ping["spec"]["schedule"].split()) == 5
    assert ping["spec"]["contentType"] == "application/json"
    assert isinstance(json.loads(ping["spec"]["data"]), dict)
    ref = ping["spec"]["sink"]["ref"]
    sink = one(docs, ref["kind"], ref["name"], ref["apiVersion"].split("/")[0])
    assert (sink["apiVersion"], sink["kind"]) == ("sinks.knative.dev/v1alpha1", "JobSink")


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


# ------------------------------------------------------------------------ images


@pytest.mark.parametrize("function", ["predict", "train"])
def test_dockerfile(function: str) -> None:
    text = (REPO / "functions" / function / "Dockerfile").read_text()
    assert f"['optional-dependencies']['{function}']" in text
    other = "train" if function == "predict" else "predict"
    assert f"['{other}']" not in text and ".[train]" not in text and ".[predict]" not in text
    if function == "predict":
        assert re.search(rf"\bPORT={config.PREDICT_PORT}\b", text)
        assert "--source functions/predict/main.py --target predict" in text
    else:  # the JobSink's Job: the command the manifest names, made in the image
        assert text.rstrip().endswith('CMD ["lensflow-train-job"]')
        assert "> /opt/venv/bin/lensflow-train-job" in text and "lensflow-train-job --help" in text
        assert "-m functions.train.job" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("0", "root"), "the image runs as a non-root user"
    # dependencies are installed before the code is copied (cache-friendly layers)
    assert (
        text.index("COPY pyproject.toml") < text.index("pip install -r") < text.index("COPY core")
    )
    if function == "predict":
        assert "tensorflow" not in text.replace('! python -c "import tensorflow"', "")


def test_dockerignore_keeps_what_the_build_needs() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    for needed in (
        "pyproject.toml",
        "README.md",
        "lensflow/",
        "model-store/",
        "eventing/",
        "functions/",
    ):
        assert f"!{needed}" in lines
