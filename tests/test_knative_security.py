"""The prod overlay authenticates every client and grants each only what it needs (issue 14).

Offline, against the rendered overlays and the files they rely on:

- Kafka: the KafkaSource and KafkaSink authenticate (TLS + SCRAM-SHA-512) with references that
  resolve; each KafkaUser has exactly its ACLs; training has no Kafka user; predict takes its
  password from the Secret Strimzi generates for its user, through issue 14's variables;
- MinIO: the policy JSON of each role, evaluated for concrete requests (predict cannot write,
  train cannot touch image uploads, ...);
- who may call what: EventPolicies and the NetworkPolicy;
- the dev overlay stays plaintext and says so.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.support.knative_manifests import (
    KNATIVE,
    NAMESPACES,
    Doc,
    build,
    config_map,
    env_of,
    of_kind,
    one,
    pod_spec,
)
from tests.support.knative_security import allowed, as_list, obj, policy

PROD = "prod"
QUEUE_PROXY_METRICS_PORT = 9091
SCRAM = "SCRAM-SHA-512"
# Who may do what on which topic (resource type, name, pattern) -> operations.
EXPECTED_ACLS: dict[str, dict[tuple[str, str, str], set[str]]] = {
    "lensflow-source": {
        ("topic", "images", "literal"): {"Read", "Describe"},
        ("group", "lensflow-predict", "literal"): {"Read"},
    },
    "lensflow-predict": {("topic", "predictions", "literal"): {"Write", "Describe"}},
    "lensflow-sink": {("topic", "images-dlq", "literal"): {"Write", "Describe"}},
    "lensflow-minio": {("topic", "images", "literal"): {"Write", "Describe"}},
    "lensflow-archive": {
        ("topic", "predictions", "literal"): {"Read", "Describe"},
        ("group", "lensflow-archive", "literal"): {"Read"},
    },
    "lensflow-operator": {
        ("topic", "predictions", "literal"): {"Read", "Describe"},
        ("topic", "images-dlq", "literal"): {"Read", "Describe"},
        ("topic", "images", "literal"): {"Write", "Describe"},
        ("group", "lensflow-cli", "prefix"): {"Read"},
    },
    "lensflow-dashboard": {
        ("topic", "predictions", "literal"): {"Read", "Describe"},
        ("topic", "images-dlq", "literal"): {"Read", "Describe"},
        ("topic", "images", "literal"): {"Describe"},
        ("group", "lensflow-dashboard", "prefix"): {"Read"},
        ("group", "lensflow-dlq", "prefix"): {"Read"},
        ("group", "lensflow-predict", "literal"): {"Describe"},
    },
}


def prod() -> tuple[Doc, ...]:
    return build(PROD)


def secret_data(docs: tuple[Doc, ...], name: str) -> dict[str, str]:
    secret = one(docs, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def kafka_user_secrets(docs: tuple[Doc, ...]) -> set[str]:
    """Strimzi's User Operator writes one Secret per KafkaUser, named like the user."""
    return {u["metadata"]["name"] for u in of_kind(docs, "KafkaUser")}


# ------------------------------------------------------------------------------ Kafka


def test_kafkasource_authenticates_with_tls_and_scram() -> None:
    docs = prod()
    net = one(docs, "KafkaSource", "lensflow-images")["spec"]["net"]
    assert net["tls"]["enable"] is True
    assert net["tls"]["caCert"]["secretKeyRef"] == {
        "name": "my-cluster-cluster-ca-cert",
        "key": "ca.crt",
    }
    sasl = net["sasl"]
    assert sasl["enable"] is True
    # The password is the Strimzi-generated one of KafkaUser lensflow-source; user name and
    # mechanism come from the overlay's generated Secret and must name that same user.
    password = sasl["password"]["secretKeyRef"]
    assert password["key"] == "password" and password["name"] in kafka_user_secrets(docs)
    plain = secret_data(docs, sasl["user"]["secretKeyRef"]["name"])
    assert plain[sasl["user"]["secretKeyRef"]["key"]] == password["name"]
    assert (
        secret_data(docs, sasl["type"]["secretKeyRef"]["name"])[sasl["type"]["secretKeyRef"]["key"]]
        == SCRAM
    )
    assert "cert" not in net["tls"] and "key" not in net["tls"], "SCRAM, not mTLS"


def test_kafkasink_authenticates_and_both_use_the_tls_listener() -> None:
    docs = prod()
    sink = one(docs, "KafkaSink", "lensflow-images-dlq")
    assert sink["spec"]["auth"]["secret"]["ref"]["name"] == "lensflow-kafka-sink-auth"
    source = one(docs, "KafkaSource", "lensflow-images")
    bootstrap = config_map(docs)["data"]["LENSFLOW_KAFKA_BOOTSTRAP"].split(",")
    assert sink["spec"]["bootstrapServers"] == source["spec"]["bootstrapServers"] == bootstrap
    assert all(s.endswith(":9093") for s in bootstrap), "the TLS + SCRAM listener"


def test_generated_secrets_hold_no_credentials() -> None:
    for secret in of_kind(prod(), "Secret"):
        keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
        risky = {k for k in keys if any(w in k for w in ("pass", "secret", "key", "token", "crt"))}
        assert not risky, f"{secret['metadata']['name']} carries credentials: {risky}"


def test_each_kafka_user_has_exactly_its_acls() -> None:
    users = {u["metadata"]["name"]: u for u in of_kind(prod(), "KafkaUser")}
    assert set(users) == set(EXPECTED_ACLS)
    for name, user in users.items():
        assert user["apiVersion"] == "kafka.strimzi.io/v1"
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        authz = user["spec"]["authorization"]
        assert authz["type"] == "simple"
        got: dict[tuple[str, str, str], set[str]] = {}
        for acl in authz["acls"]:
            assert acl.get("type", "allow") == "allow" and acl.get("host", "*") == "*"
            r = acl["resource"]
            got.setdefault((r["type"], r["name"], r.get("patternType", "literal")), set()).update(
                acl["operations"]
            )
        assert got == EXPECTED_ACLS[name], name
        assert all("All" not in ops and "*" not in res[1] for res, ops in got.items())


def test_training_touches_no_topic() -> None:
    docs = prod()
    assert not [u for u in of_kind(docs, "KafkaUser") if "train" in u["metadata"]["name"]]
    (c,) = pod_spec(one(docs, "JobSink", "lensflow-train"))["containers"]
    assert not [n for n in env_of(c) if n.startswith("LENSFLOW_KAFKA_S")], "no Kafka credentials"


def test_predict_takes_kafka_credentials_from_its_strimzi_secret() -> None:
    docs = prod()
    spec = pod_spec(one(docs, "Service", "lensflow-predict", "serving.knative.dev"))
    (c,) = spec["containers"]
    env = env_of(c)
    assert env["LENSFLOW_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
    assert env["LENSFLOW_KAFKA_SASL_MECHANISM"]["value"] == SCRAM
    user = env["LENSFLOW_KAFKA_SASL_USERNAME"]["value"]
    assert user in kafka_user_secrets(docs) and set(EXPECTED_ACLS[user]) == {
        ("topic", config_map(docs)["data"]["LENSFLOW_TOPIC_PREDICTIONS"], "literal")
    }
    assert env["LENSFLOW_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": user,
        "key": "password",
    }
    # Files, from Secrets mounted into the pod.
    volumes = {v["name"]: v["secret"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}

    def source_of(path: str) -> tuple[str, str]:
        directory, filename = path.rsplit("/", 1)
        secret = volumes[mounts[directory]]
        (item,) = [i for i in secret["items"] if i["path"] == filename]
        return secret["secretName"], item["key"]

    assert source_of(env["LENSFLOW_KAFKA_CA_FILE"]["value"]) == (
        "my-cluster-cluster-ca-cert",
        "ca.crt",
    )
    assert source_of(env["LENSFLOW_S3_CA_BUNDLE"]["value"]) == ("lensflow-s3-ca", "ca.crt")
    assert config_map(docs)["data"]["LENSFLOW_S3_ENDPOINT"].startswith("https://")


def test_dev_stays_plaintext_and_says_so() -> None:
    docs = build("dev")
    assert "net" not in one(docs, "KafkaSource", "lensflow-images")["spec"]
    assert "auth" not in one(docs, "KafkaSink", "lensflow-images-dlq")["spec"]
    for kind in ("KafkaUser", "EventPolicy", "NetworkPolicy", "Secret"):
        assert not of_kind(docs, kind), kind
    (c,) = pod_spec(one(docs, "Service", "lensflow-predict"))["containers"]
    assert not [n for n in env_of(c) if n.startswith("LENSFLOW_KAFKA_")]
    assert config_map(docs)["data"]["LENSFLOW_S3_ENDPOINT"].startswith("http://")
    assert "PLAINTEXT" in (KNATIVE / "overlays" / "dev" / "kustomization.yaml").read_text()


# ----------------------------------------------------------------- who may call what


def ref_key(ref: Doc) -> tuple[str, str, str]:
    return ref["apiVersion"].split("/")[0], ref["kind"], ref["name"]


def doc_key(doc: Doc) -> tuple[str, str, str]:
    return doc["apiVersion"].split("/")[0], doc["kind"], doc["metadata"]["name"]


def test_event_policies_admit_only_the_intended_senders() -> None:
    docs = prod()
    ns = NAMESPACES[PROD]
    objects = {doc_key(d): d for d in docs}
    senders: dict[tuple[str, str, str], list[Any]] = {}
    for event_policy in of_kind(docs, "EventPolicy"):
        for to in event_policy["spec"]["to"]:
            assert ref_key(to["ref"]) in objects, f"no such receiver {to['ref']}"
            assert ref_key(to["ref"]) not in senders, "one policy per receiver"
            froms = []
            for f in event_policy["spec"]["from"]:
                if "ref" in f:
                    assert f["ref"].get("namespace", ns) == ns
                    assert ref_key(f["ref"]) in objects, f"no such sender {f['ref']}"
                    froms.append(ref_key(f["ref"]))
                else:
                    assert "*" not in f["sub"], "no wildcard identities"
                    froms.append(f["sub"])
            senders[ref_key(to["ref"])] = froms
    source = ("sources.knative.dev", "KafkaSource", "lensflow-images")
    assert senders == {
        ("serving.knative.dev", "Service", "lensflow-predict"): [source],
        ("eventing.knative.dev", "KafkaSink", "lensflow-images-dlq"): [source],
        ("sinks.knative.dev", "JobSink", "lensflow-train"): [
            ("sources.knative.dev", "PingSource", "lensflow-train"),
            f"system:serviceaccount:{ns}:lensflow-train-trigger",
        ],
        ("sinks.knative.dev", "JobSink", "lensflow-archive"): [
            ("sources.knative.dev", "PingSource", "lensflow-archive")
        ],
    }
    trigger = one(docs, "ServiceAccount", "lensflow-train-trigger")
    assert trigger["automountServiceAccountToken"] is False


def test_network_policy_admits_only_knatives_data_plane() -> None:
    docs = prod()
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "NetworkPolicy")}
    ksvc = one(docs, "Service", "lensflow-predict", "serving.knative.dev")
    admitted = {"knative-serving", "knative-eventing", "kourier-system", "monitoring"}
    scrape_port = int(ksvc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])

    predict = policies["lensflow-predict-ingress"]
    assert predict["podSelector"]["matchLabels"].items() <= (
        ksvc["spec"]["template"]["metadata"]["labels"].items()
    )
    assert predict["policyTypes"] == ["Ingress"]
    seen = set()
    for rule in predict["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, peer
            (name,) = peer["namespaceSelector"]["matchLabels"].values()
            seen.add(name)
        names = {
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for peer in rule["from"]
        }
        ports = {port["port"] for port in rule.get("ports", [])}
        if names == {"monitoring"}:
            # The function's /metrics and queue-proxy's request metrics (serving 1.21
            # pkg/networking/constants.go: UserQueueMetricsPort 9091), nothing else.
            assert ports == {scrape_port, QUEUE_PROXY_METRICS_PORT}, ports
        else:
            assert ports <= {8012, 8013}, "queue-proxy's serving ports only"
    assert seen == admitted

    for name in ("lensflow-train", "lensflow-archive"):
        job = one(docs, "JobSink", name)["spec"]["job"]["spec"]["template"]
        jobs = policies[f"{name}-ingress"]
        assert jobs["podSelector"]["matchLabels"].items() <= job["metadata"]["labels"].items()
        assert jobs["policyTypes"] == ["Ingress"] and not jobs.get("ingress"), "no ingress"


# ------------------------------------------------------------------------------ MinIO


WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:DeleteBucket", "s3:PutBucketPolicy")


@pytest.fixture(scope="module")
def store() -> dict[str, Any]:
    data = config_map(prod())["data"]
    images = data["LENSFLOW_IMAGE_BUCKETS"].split(",")
    return {
        "images": images,
        "train": data["LENSFLOW_TRAIN_BUCKET"] or images[0],
        "models": data["LENSFLOW_MODEL_BUCKET"],
        "name": data["LENSFLOW_MODEL_NAME"],
    }


def test_policy_files_are_well_formed() -> None:
    roles = sorted(p.stem for p in (KNATIVE / "minio" / "policies").glob("*.json"))
    assert roles == ["archive", "dashboard", "operator", "predict", "train"]
    for role in roles:
        doc = policy(role)
        assert doc["Version"] == "2012-10-17"
        for s in doc["Statement"]:
            assert set(s) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
            assert all(a.startswith("s3:") for a in as_list(s["Action"]))
            assert all(r.startswith("arn:aws:s3:::") for r in as_list(s["Resource"]))


def test_predict_reads_images_and_the_model_and_writes_only_the_label_queue(
    store: dict[str, Any],
) -> None:
    p = policy("predict")
    name, models, train = store["name"], store["models"], store["train"]
    for bucket in store["images"]:
        assert allowed(p, "s3:GetObject", obj(bucket, "sortie-1/img.jpg"))
    assert allowed(p, "s3:GetObject", obj(models, f"{name}/current.json"))
    assert allowed(p, "s3:GetObject", obj(models, f"{name}/versions/v3/model.tflite"))
    # uncertain images are queued for labelling: a new object under to-label/, nothing else
    assert allowed(p, "s3:PutObject", obj(train, "to-label/v3/0123abcd.json"))
    for s in p["Statement"]:
        for action in as_list(s["Action"]):
            assert not action.startswith("s3:Delete") and "*" not in action, action
            if action.startswith("s3:Put"):
                assert as_list(s["Resource"]) == [obj(train, "to-label/*")], s
    writable = [obj(b, "x.jpg") for b in store["images"]] + [obj(models, f"{name}/current.json")]
    writable += [obj(train, "labeled/forest/x.jpg"), obj(train, "holdout/forest/x.jpg")]
    for arn in writable:
        assert not any(allowed(p, w, arn) for w in WRITES), arn
    assert not allowed(p, "s3:GetObject", obj("another-bucket", "x.jpg"))


def test_train_reads_training_data_and_writes_only_the_model_store(store: dict[str, Any]) -> None:
    t = policy("train")
    name, models, train = store["name"], store["models"], store["train"]
    assert allowed(t, "s3:GetObject", obj(train, "labeled/forest/a.jpg"))
    assert allowed(t, "s3:GetObject", obj(train, "holdout/forest/b.jpg"))
    assert allowed(t, "s3:GetObject", obj(models, f"{name}/backbones/mobilenet.weights.h5"))
    for key in ("versions/v4/model.tflite", "history/00000004-flip.json", "current.json"):
        assert allowed(t, "s3:PutObject", obj(models, f"{name}/{key}")), key
    assert allowed(t, "s3:PutObject", obj(models, f"{name}/lock.json"))
    assert allowed(t, "s3:DeleteObject", obj(models, f"{name}/lock.json"))
    # Never the uploads, never the backbones, never another model, never delete a version.
    for bucket in store["images"]:
        for w in WRITES:
            assert not allowed(t, w, obj(bucket, "labeled/forest/a.jpg")), (bucket, w)
        assert not allowed(t, "s3:GetObject", obj(bucket, "sortie-1/img.jpg"))
    assert not allowed(t, "s3:PutObject", obj(models, f"{name}/backbones/x.h5"))
    assert not allowed(t, "s3:PutObject", obj(models, "other-model/current.json"))
    assert not allowed(t, "s3:DeleteObject", obj(models, f"{name}/versions/v1/model.tflite"))


def test_the_training_bucket_is_its_own_and_no_role_writes_an_image_bucket(
    store: dict[str, Any],
) -> None:
    """CONTRACT: LENSFLOW_TRAIN_BUCKET is a bucket of its own, so what lensflow writes (queue
    records, labelled and holdout copies) never arrives as an image event."""
    for overlay in ("dev", "prod"):
        data = config_map(build(overlay))["data"]
        train = data["LENSFLOW_TRAIN_BUCKET"]
        assert train and train not in data["LENSFLOW_IMAGE_BUCKETS"].split(","), overlay
        assert train != data["LENSFLOW_MODEL_BUCKET"]
    for role in ("predict", "train", "operator"):
        doc = policy(role)
        for bucket in store["images"]:
            for key in ("to-label/v1/x.json", "labeled/forest/x.jpg", "holdout/forest/x.jpg"):
                for w in WRITES:
                    assert not allowed(doc, w, obj(bucket, key)), (role, w, bucket, key)
        text = json.dumps(doc)
        for bucket in store["images"]:
            assert f"{bucket}/labeled" not in text and f"{bucket}/to-label" not in text, role


def test_predict_may_count_the_label_queue_only(store: dict[str, Any]) -> None:
    """The queue counts its records with one LIST of to-label/<version>/ (LabelQueue.size)."""
    listing = [
        s
        for s in policy("predict")["Statement"]
        if obj(store["train"], "").rstrip("/") in as_list(s["Resource"])
        and "s3:ListBucket" in as_list(s["Action"])
    ]
    assert listing, "predict must list to-label/ of the training bucket"
    for s in listing:
        assert s["Condition"] == {"StringLike": {"s3:prefix": ["to-label/*"]}}, s


def test_operator_labels_into_the_training_bucket(store: dict[str, Any]) -> None:
    o, train = policy("operator"), store["train"]
    for bucket in store["images"]:
        assert allowed(o, "s3:GetObject", obj(bucket, "sortie-1/img.jpg"))
    for key in ("labeled/forest/x.jpg", "holdout/forest/x.jpg"):
        assert allowed(o, "s3:PutObject", obj(train, key))
    assert allowed(o, "s3:DeleteObject", obj(train, "to-label/v1/x.json"))
    assert allowed(o, "s3:GetObject", obj(train, "to-label/v1/x.json"))


def test_operator_owns_the_model_store_only(store: dict[str, Any]) -> None:
    o = policy("operator")
    models, name = store["models"], store["name"]
    for action in ("s3:PutObject", "s3:DeleteObject", "s3:GetObject", "s3:ListBucket"):
        assert allowed(o, action, obj(models, f"{name}/versions/v1/model.tflite"))
    for bucket in store["images"]:
        assert not allowed(o, "s3:DeleteObject", obj(bucket, "sortie-1/img.jpg"))
        assert not allowed(o, "s3:PutObject", obj(bucket, "sortie-1/img.jpg"))


def test_archive_writes_only_its_archive_files_and_reads_no_images(store: dict[str, Any]) -> None:
    a = policy("archive")
    bucket = config_map(prod())["data"]["LENSFLOW_ARCHIVE_BUCKET"]
    for key in ("predictions/date=2026-12-01/predictions+0+1-9.parquet", "rejects/date=x/y.jsonl"):
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):  # replace, compact
            assert allowed(a, action, obj(bucket, key)), (action, key)
    assert allowed(a, "s3:ListBucket", f"arn:aws:s3:::{bucket}")
    for bucket_name in [*store["images"], store["models"]]:
        for action in ("s3:GetObject", *WRITES):
            assert not allowed(a, action, obj(bucket_name, "x")), (bucket_name, action)
    assert not allowed(a, "s3:DeleteBucket", f"arn:aws:s3:::{bucket}")
    # the operator queries the archive (lensflow predictions query) and cannot change it
    o = policy("operator")
    assert allowed(o, "s3:GetObject", obj(bucket, "predictions/date=x/y.parquet"))
    assert not any(allowed(o, w, obj(bucket, "predictions/date=x/y.parquet")) for w in WRITES)
    archive_user = one(prod(), "KafkaUser", "lensflow-archive")
    (c,) = pod_spec(one(prod(), "JobSink", "lensflow-archive"))["containers"]
    env = env_of(c)
    assert env["LENSFLOW_KAFKA_SASL_USERNAME"]["value"] == archive_user["metadata"]["name"]
    assert (
        env["LENSFLOW_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
        == (archive_user["metadata"]["name"])
    )
