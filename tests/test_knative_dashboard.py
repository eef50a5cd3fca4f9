"""The dashboard on the cluster: both overlays deploy it, cluster-local, scaling to zero,
with its own MinIO user, its own read-only KafkaUser in prod and its token from a Secret.

Offline, against the rendered overlays (``tests.support.knative_manifests``; every object is also
validated against the pinned CRDs by tests/test_knative.py) and the policy files.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from lensflow.dashboard_learning import next_cron
from tests.support.knative_manifests import (
    OVERLAYS,
    build,
    config_map,
    env_of,
    of_kind,
    one,
    pod_spec,
)
from tests.support.knative_security import allowed, obj, policy

NAME = "lensflow-dashboard"


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


def dashboard(overlay: str) -> dict:
    return one(build(overlay), "Service", NAME, "serving.knative.dev")


def test_both_overlays_deploy_it_cluster_local_scaling_to_zero(overlay: str) -> None:
    ksvc = dashboard(overlay)
    assert ksvc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert annotations["autoscaling.knative.dev/max-scale"] == "1"
    spec = pod_spec(ksvc)
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    image = container["image"]
    assert image.endswith(":dev") if overlay == "dev" else image.endswith(":0.1.0")
    assert "lensflow-dashboard" in image
    assert container["securityContext"]["runAsNonRoot"] is True


def test_credentials_come_from_secrets_and_the_token_is_optional(overlay: str) -> None:
    (container,) = pod_spec(dashboard(overlay))["containers"]
    env = env_of(container)
    for key in ("LENSFLOW_S3_ACCESS_KEY", "LENSFLOW_S3_SECRET_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "lensflow-s3-dashboard", "key": key}
    token = env["LENSFLOW_DASHBOARD_TOKEN"]["valueFrom"]["secretKeyRef"]
    # optional: without the Secret the page is read-only (403 on every write), never down
    assert token == {"name": "lensflow-dashboard-token", "key": "token", "optional": True}
    assert all("value" not in v for k, v in env.items() if "SECRET" in k or "TOKEN" in k)


def test_the_next_round_it_shows_is_the_pingsources(overlay: str) -> None:
    docs = build(overlay)
    schedule = one(docs, "PingSource", "lensflow-train")["spec"]["schedule"]
    assert config_map(docs)["data"]["LENSFLOW_TRAIN_SCHEDULE"] == schedule
    assert next_cron(schedule, datetime(2026, 1, 1, tzinfo=timezone.utc))  # one it can read


def test_prod_reads_kafka_as_its_own_user_over_tls() -> None:
    docs = build("prod")
    (container,) = pod_spec(one(docs, "Service", NAME, "serving.knative.dev"))["containers"]
    env = env_of(container)
    assert env["LENSFLOW_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
    assert env["LENSFLOW_KAFKA_SASL_USERNAME"]["value"] == NAME
    password = env["LENSFLOW_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": NAME, "key": "password"}  # Strimzi's Secret for the user
    user = one(docs, "KafkaUser", NAME)
    operations = {op for acl in user["spec"]["authorization"]["acls"] for op in acl["operations"]}
    assert operations <= {"Read", "Describe"}, "the dashboard never writes to Kafka"


def test_prod_admits_only_knatives_data_plane() -> None:
    docs = build("prod")
    [netpol] = [
        p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{NAME}-ingress"
    ]
    labels = dashboard("prod")["spec"]["template"]["metadata"]["labels"]
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    sources = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in netpol["spec"]["ingress"]
        for peer in rule["from"]
    }
    assert sources == {"knative-serving", "kourier-system"}


@pytest.fixture(scope="module")
def buckets() -> dict[str, str]:
    data = config_map(build("prod"))["data"]
    images = data["LENSFLOW_IMAGE_BUCKETS"].split(",")
    return {
        "images": images[0],
        "train": data["LENSFLOW_TRAIN_BUCKET"] or images[0],
        "models": data["LENSFLOW_MODEL_BUCKET"],
        "name": data["LENSFLOW_MODEL_NAME"],
    }


def test_its_minio_user_reads_the_store_labels_and_flips_nothing_more(buckets) -> None:
    p = policy("dashboard")
    models, name, train = buckets["models"], buckets["name"], buckets["train"]
    for key in ("current.json", "versions/v3/metadata.json", "history/00000003-flip.json"):
        assert allowed(p, "s3:GetObject", obj(models, f"{name}/{key}")), key
    assert allowed(p, "s3:GetObject", obj(models, f"{name}/rounds/20261206T070000-abc.json"))
    assert allowed(p, "s3:GetObject", obj(models, f"{name}/lock.json"))
    # flips: the pointer and its history, never a version, a backbone or the lease
    assert allowed(p, "s3:PutObject", obj(models, f"{name}/current.json"))
    assert allowed(p, "s3:PutObject", obj(models, f"{name}/history/00000004-flip.json"))
    for key in ("versions/v4/model.tflite", "backbones/x/weights.npz", "lock.json", "rounds/x"):
        assert not allowed(p, "s3:PutObject", obj(models, f"{name}/{key}")), key
        assert not allowed(p, "s3:DeleteObject", obj(models, f"{name}/{key}")), key
    assert not allowed(p, "s3:PutObject", obj(models, "other-model/current.json"))
    # labelling, as the CLI does it: copies, decisions, the queue; never the uploads
    assert allowed(p, "s3:GetObject", obj(buckets["images"], "sortie-1/img.jpg"))
    for key in ("labeled/forest/a.jpg", "holdout/forest/a.jpg", "decisions/ab/000001.json"):
        assert allowed(p, "s3:PutObject", obj(train, key)), key
    assert allowed(p, "s3:PutObject", obj(train, "to-label/v3/ab.json"))  # undo re-queues
    assert allowed(p, "s3:DeleteObject", obj(train, "to-label/v3/ab.json"))
    assert not allowed(p, "s3:DeleteObject", obj(train, "decisions/ab/000001.json"))
    assert not allowed(p, "s3:PutObject", obj(buckets["images"], "sortie-1/img.jpg"))
    assert not allowed(p, "s3:DeleteObject", obj(buckets["images"], "sortie-1/img.jpg"))
