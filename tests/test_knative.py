"""The Knative manifests: they build, every object validates, names agree with lensflow.config.

- ``kubectl kustomize`` builds each overlay (skipped when kubectl is absent).
- Knative Service and PingSource are validated with the cloudcoil pydantic models in
  strict mode; a field the model does not know (pydantic would silently drop it) fails.
- KafkaSource and KafkaSink are validated with ``jsonschema`` against the CRDs' OpenAPI
  schemas in ``../shared/crds/`` (skipped when that folder is absent), made strict the way
  ``kubectl apply`` (server-side strict field validation) is: unknown fields fail.
- KafkaTopic is validated against the small schema below (only the fields we use).
- Names (topics, env variables, ports, refs) are checked against ``lensflow.config``.
- ``test_validators_catch_*`` break a manifest on purpose: the checks above can fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lensflow_core import settings as config

REPO = Path(__file__).resolve().parents[1]
KNATIVE = REPO / "knative"
CRDS = REPO.parent / "shared" / "crds"
OVERLAYS = ("dev", "prod")
DEFAULTS = {s.name: s.default for s in config.SETTINGS}
SECRET_NAMES = {s.name for s in config.SETTINGS if s.secret}
EXPECTED_PARTITIONS = {"images": 6, "predictions": 3, "images-dlq": 1}
KAFKA_TOPIC_CLUSTER_LABEL = "strimzi.io/cluster"

Doc = dict[str, Any]


# ---------------------------------------------------------------- building the overlays


def _kubectl() -> str | None:
    return shutil.which("kubectl") or (
        "/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None
    )


@functools.cache
def build(overlay: str) -> tuple[Doc, ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found: cannot run `kubectl kustomize` on knative/overlays")
    out = subprocess.run(
        [kubectl, "kustomize", str(KNATIVE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> tuple[Doc, ...]:
    return build(request.param)


def of_kind(docs: tuple[Doc, ...], kind: str, group: str | None = None) -> list[Doc]:
    return [
        d
        for d in docs
        if d["kind"] == kind and (group is None or d["apiVersion"].split("/")[0] == group)
    ]


def one(docs: tuple[Doc, ...], kind: str, name: str, group: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind, group) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def ksvcs(docs: tuple[Doc, ...]) -> list[Doc]:
    return of_kind(docs, "Service", "serving.knative.dev")


def config_map(docs: tuple[Doc, ...]) -> Doc:
    cms = [
        d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("lensflow-config")
    ]
    assert len(cms) == 1, "expected exactly one generated lensflow-config ConfigMap"
    return cms[0]


def containers(ksvc: Doc) -> list[Doc]:
    return ksvc["spec"]["template"]["spec"]["containers"]


# ------------------------------------------------------------------------- validators


def unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths present in ``given`` but dropped by the model (pydantic ignores extra keys)."""
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        return [
            p
            for k, v in given.items()
            for p in (
                [f"{path}.{k}"] if k not in kept else unknown_fields(v, kept[k], f"{path}.{k}")
            )
        ]
    if isinstance(given, list) and isinstance(kept, list):
        return [
            p
            for i, (g, k) in enumerate(zip(given, kept, strict=False))
            for p in unknown_fields(g, k, f"{path}[{i}]")
        ]
    return []


def cloudcoil_errors(doc: Doc) -> list[str]:
    """Validate a Knative Service or PingSource with cloudcoil's models, strictly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generated models warn about shadowed fields
        from cloudcoil.models.knative_eventing.sources.v1 import PingSource
        from cloudcoil.models.knative_serving.serving.v1 import Service
    models = {
        ("serving.knative.dev/v1", "Service"): Service,
        ("sources.knative.dev/v1", "PingSource"): PingSource,
    }
    model = models.get((doc["apiVersion"], doc["kind"]))
    if model is None:
        return [f"no cloudcoil model for {doc['apiVersion']} {doc['kind']}"]
    # strict: no coercion ("0" stays a string, 0 is not one); it also sidesteps a
    # cloudcoil quirk where a numeric quantity string ("2") is coerced to int and crashes.
    try:
        obj = model.model_validate(doc, strict=True)
    except Exception as exc:  # pydantic.ValidationError
        return [str(exc)]
    kept = obj.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [f"unknown field {p}" for p in unknown_fields(doc, kept)]


def strict(schema: Any) -> Any:
    """Close every object schema that lists properties (unknown fields -> error)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


ROOT_FIELDS: Doc = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}


@functools.cache
def crd_schema(api_version: str, kind: str) -> Doc:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} absent: cannot validate {kind} against its CRD")
    group, version = api_version.split("/")
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                assert v.get("served"), f"{api_version} {kind} is not served by {path.name}"
                schema = strict(v["schema"]["openAPIV3Schema"])
                # The API server always accepts these at the root, listed in the CRD or not.
                schema["properties"] = {**ROOT_FIELDS, **schema["properties"]}
                return schema
        served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
        pytest.fail(f"{kind} {version} is not in {path.name}; served: {served}")
    pytest.fail(f"no CRD for {group} {kind} in {CRDS}")


def crd_errors(doc: Doc) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["apiVersion"], doc["kind"]))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


# The KafkaTopic fields lensflow uses (Strimzi's full CRD is not vendored).
KAFKA_TOPIC_SCHEMA: Doc = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kafka.strimzi.io/v1beta2"},
        "kind": {"const": "KafkaTopic"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace", "labels"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {
                    "type": "object",
                    "required": [KAFKA_TOPIC_CLUSTER_LABEL],
                    "additionalProperties": {"type": "string"},
                },
            },
        },
        "spec": {
            "type": "object",
            "required": ["partitions", "replicas"],
            "additionalProperties": False,
            "properties": {
                "topicName": {"type": "string"},
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {
                    "type": "object",
                    "propertyNames": {
                        "enum": [
                            "retention.ms",
                            "min.insync.replicas",
                            "cleanup.policy",
                            "segment.bytes",
                        ]
                    },
                    "additionalProperties": {"type": ["string", "integer"]},
                },
            },
        },
    },
}


def topic_errors(doc: Doc) -> list[str]:
    validator = jsonschema.Draft7Validator(KAFKA_TOPIC_SCHEMA)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


VALIDATORS: dict[str, Callable[[Doc], list[str]]] = {
    "Service": cloudcoil_errors,
    "PingSource": cloudcoil_errors,
    "KafkaSource": crd_errors,
    "KafkaSink": crd_errors,
    "KafkaTopic": topic_errors,
}


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_the_expected_objects(overlay: str) -> None:
    kinds = sorted(d["kind"] for d in build(overlay))
    assert kinds == sorted(
        [
            "ConfigMap",
            "Service",
            "Service",
            "KafkaSource",
            "KafkaSink",
            "PingSource",
            "KafkaTopic",
            "KafkaTopic",
            "KafkaTopic",
        ]
    )
    assert not of_kind(build(overlay), "Secret"), "Secrets never come from the kustomization"


def test_every_object_validates(docs: tuple[Doc, ...]) -> None:
    problems = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            continue
        errors = VALIDATORS[doc["kind"]](doc)
        if errors:
            problems[f"{doc['kind']}/{doc['metadata']['name']}"] = errors
    assert not problems, problems


def test_kafkasource_uses_a_served_version() -> None:
    source = one(build("prod"), "KafkaSource", DEFAULTS["LENSFLOW_SOURCE_NAME"])
    assert source["apiVersion"] == "sources.knative.dev/v1beta1"
    crd_schema(source["apiVersion"], "KafkaSource")  # fails unless served


@pytest.mark.parametrize(
    "kind,mutate,expect",
    [
        (
            "Service",
            lambda d: d["spec"]["template"]["spec"].update(containerConcurency=2),
            "containerConcurency",
        ),
        (
            "Service",
            lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
                {"autoscaling.knative.dev/min-scale": 0}
            ),
            "min-scale",
        ),
        ("PingSource", lambda d: d["spec"].update(schedul=d["spec"].pop("schedule")), "schedul"),
        ("KafkaSource", lambda d: d["spec"].update(order=d["spec"].pop("ordering")), "order"),
        ("KafkaSource", lambda d: d["spec"]["delivery"].update(retry="6"), "retry"),
        ("KafkaSink", lambda d: d["spec"].update(topics=[d["spec"].pop("topic")]), "topic"),
        (
            "KafkaTopic",
            lambda d: d["spec"].update(partition=d["spec"].pop("partitions")),
            "partition",
        ),
    ],
)
def test_validators_catch_broken_manifests(
    kind: str, mutate: Callable[[Doc], None], expect: str
) -> None:
    doc = copy.deepcopy(next(d for d in build("dev") if d["kind"] == kind))
    assert not VALIDATORS[kind](doc)
    mutate(doc)
    errors = VALIDATORS[kind](doc)
    assert errors and expect in " ".join(errors), errors


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
    assert set(DEFAULTS) - SECRET_NAMES - set(data) == set(), "every non-secret setting is set"
    for name in ("LENSFLOW_TOPIC_IMAGES", "LENSFLOW_TOPIC_PREDICTIONS", "LENSFLOW_TOPIC_DLQ"):
        assert data[name] == DEFAULTS[name]
    config.Config.from_env(data)  # the values parse


def test_every_lensflow_env_name_exists_in_settings(docs: tuple[Doc, ...]) -> None:
    text = yaml.safe_dump_all(docs) + (KNATIVE / "s3-secret.template.yaml").read_text()
    used = set(re.findall(r"\bLENSFLOW_[A-Z0-9_]+", text))
    assert used and used <= set(DEFAULTS), f"unknown: {used - set(DEFAULTS)}"


def test_services_get_config_and_secrets(docs: tuple[Doc, ...]) -> None:
    template = yaml.safe_load((KNATIVE / "s3-secret.template.yaml").read_text())
    secret_keys = set(template["stringData"])
    assert secret_keys == SECRET_NAMES
    assert all(v == f"${{{k}}}" for k, v in template["stringData"].items()), "template only"
    cm_name = config_map(docs)["metadata"]["name"]
    for ksvc in ksvcs(docs):
        (c,) = containers(ksvc)
        assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [cm_name]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        assert set(refs) == SECRET_NAMES
        for env_name, ref in refs.items():
            assert ref == {"name": template["metadata"]["name"], "key": env_name}
        literal = [e["name"] for e in c["env"] if e["name"] in SECRET_NAMES and "value" in e]
        assert not literal, f"credentials given as literal values: {literal}"


def test_services_scale_to_zero_and_listen_on_the_port(docs: tuple[Doc, ...]) -> None:
    for ksvc in ksvcs(docs):
        annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["autoscaling.knative.dev/min-scale"] == "0"
        assert int(annotations["autoscaling.knative.dev/max-scale"]) >= 1
        assert "autoscaling.knative.dev/scale-to-zero-pod-retention-period" in annotations
        spec = ksvc["spec"]["template"]["spec"]
        assert spec["containerConcurrency"] >= 1
        (c,) = containers(ksvc)
        # In containers both functions listen on $PORT, which Knative sets to containerPort.
        assert [p["containerPort"] for p in c["ports"]] == [config.PREDICT_PORT]
        assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
        threads = {e["name"]: e.get("value") for e in c["env"]}["THREADS"]
        assert int(threads) == spec["containerConcurrency"], "one server thread per request"
    predict = one(docs, "Service", "lensflow-predict", "serving.knative.dev")
    annotations = predict["spec"]["template"]["metadata"]["annotations"]
    assert (
        float(annotations["autoscaling.knative.dev/target"])
        <= predict["spec"]["template"]["spec"]["containerConcurrency"]
    )


def test_local_replica_pool_matches_the_predict_manifest() -> None:
    """ReplicaPool and EmbeddedStack default to PREDICT_CONCURRENCY: it must be the manifest's."""
    from lensflow.replicas import PREDICT_CONCURRENCY

    predict = yaml.safe_load((KNATIVE / "base" / "predict-service.yaml").read_text())
    template = predict["spec"]["template"]
    (c,) = template["spec"]["containers"]
    assert template["spec"]["containerConcurrency"] == PREDICT_CONCURRENCY
    assert float(template["metadata"]["annotations"]["autoscaling.knative.dev/target"]) == (
        PREDICT_CONCURRENCY
    )
    assert {e["name"]: e.get("value") for e in c["env"]}["THREADS"] == str(PREDICT_CONCURRENCY)


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
    assert re.fullmatch(r"PT\d+(\.\d+)?S", delivery["backoffDelay"])
    sink_ref, dls_ref = spec["sink"]["ref"], delivery["deadLetterSink"]["ref"]
    assert one(docs, sink_ref["kind"], sink_ref["name"], sink_ref["apiVersion"].split("/")[0])
    assert sink_ref["name"] == "lensflow-predict"
    dls = one(docs, dls_ref["kind"], dls_ref["name"], dls_ref["apiVersion"].split("/")[0])
    assert dls["apiVersion"] == dls_ref["apiVersion"]
    assert dls["spec"]["topic"] == data["LENSFLOW_TOPIC_DLQ"]
    assert dls["spec"]["bootstrapServers"] == spec["bootstrapServers"]


def test_pingsource_wakes_train(docs: tuple[Doc, ...]) -> None:
    (ping,) = of_kind(docs, "PingSource")
    assert len(ping["spec"]["schedule"].split()) == 5
    ref = ping["spec"]["sink"]["ref"]
    assert ref["kind"] == "Service" and ref["name"] == "lensflow-train"
    assert one(docs, "Service", ref["name"], "serving.knative.dev")


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
        assert topic["spec"]["partitions"] == EXPECTED_PARTITIONS[name]
        # bootstrap <cluster>-kafka-bootstrap.<namespace>.svc:<port> (Strimzi's naming)
        for server in data["LENSFLOW_KAFKA_BOOTSTRAP"].split(","):
            m = re.fullmatch(
                r"([a-z0-9-]+)-kafka-bootstrap\.([a-z0-9-]+)(\.svc(\.cluster\.local)?)?:\d+", server
            )
            assert m, f"not a Strimzi bootstrap service: {server}"
            assert topic["metadata"]["labels"][KAFKA_TOPIC_CLUSTER_LABEL] == m.group(1)
            assert topic["metadata"]["namespace"] == m.group(2)


def test_prod_topics_are_replicated() -> None:
    for topic in of_kind(build("prod"), "KafkaTopic"):
        assert topic["spec"]["replicas"] >= 3
        assert int(topic["spec"]["config"]["min.insync.replicas"]) >= 2


@pytest.mark.parametrize("function", ["predict", "train"])
def test_dockerfile(function: str) -> None:
    text = (REPO / "functions" / function / "Dockerfile").read_text()
    assert f"['optional-dependencies']['{function}']" in text
    other = "train" if function == "predict" else "predict"
    assert f"['{other}']" not in text and ".[train]" not in text and ".[predict]" not in text
    assert re.search(rf"\bPORT={config.PREDICT_PORT}\b", text)
    assert f"--source functions/{function}/main.py --target {function}" in text
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
