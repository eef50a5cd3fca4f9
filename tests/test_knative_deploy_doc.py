"""docs/deploy.md against the manifests: versions, figures, Secrets, order of the steps.

An operator follows deploy.md command by command; these checks keep it true to what the
overlays render, to ``knative/versions.yaml`` and to ``knative/crds/``.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.support.knative_manifests import (
    CORE_SCHEMAS,
    CRDS,
    KNATIVE,
    NAMESPACES,
    OVERLAYS,
    REPO,
    VERSIONS,
    Doc,
    build,
    config_map,
    crd_schemas,
    of_kind,
    one,
    pod_spec,
)

DEPLOY = REPO / "docs" / "deploy.md"
TEXT = DEPLOY.read_text()
# Releases whose manifests deploy.md installs, and how their URLs name the version.
RELEASE_URL = {
    "knative-serving": r"github\.com/knative/serving/releases/download/knative-v([\d.]+)/",
    "net-kourier": r"github\.com/knative-extensions/net-kourier/releases/download/knative-v([\d.]+)/",
    "knative-eventing": r"github\.com/knative/eventing/releases/download/knative-v([\d.]+)/",
    "eventing-kafka-broker": (
        r"github\.com/knative-extensions/eventing-kafka-broker/releases/download/knative-v([\d.]+)/"
    ),
    "strimzi": r"github\.com/strimzi/strimzi-kafka-operator/releases/download/([\d.]+)/",
    "minio-chart": r"helm install minio minio/minio --version ([\d.]+)",
}


def code_blocks() -> str:
    """Every shell command of the document, in order."""
    return "\n".join(re.findall(r"```sh\n(.*?)```", TEXT, re.S))


def overlay_table() -> dict[str, dict[str, str]]:
    """The "two overlays" table: row label -> {"dev": cell, "prod": cell}."""
    section = TEXT.split("## The two overlays", 1)[1].split("\n\n", 2)[1]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in section.strip().splitlines()
    ]
    header, _, *body = rows
    assert header[1:] == ["dev", "prod"]
    return {r[0]: {"dev": r[1], "prod": r[2]} for r in body}


def figure(row: str, overlay: str) -> str:
    return overlay_table()[row][overlay].strip("`")


# ------------------------------------------------------------------ versions and CRDs


def test_every_install_url_names_the_pinned_version() -> None:
    for release, pattern in RELEASE_URL.items():
        found = re.findall(pattern, TEXT)
        assert found, f"deploy.md installs no {release}"
        assert set(found) == {VERSIONS[release]}, f"{release}: {found} vs {VERSIONS[release]}"
    assert set(RELEASE_URL) == set(VERSIONS), "every pinned release is installed, and only those"
    assert "latest" not in code_blocks(), "nothing unpinned"


def test_crd_folders_are_the_pinned_releases() -> None:
    folders = {p.name for p in CRDS.iterdir() if p.is_dir()}
    assert folders <= {f"{name}-{version}" for name, version in VERSIONS.items()}
    # Every custom kind the overlays render is served by a vendored CRD of a pinned release,
    # and every vendored release is one the overlays use.
    kinds = {(d["apiVersion"], d["kind"]) for o in OVERLAYS for d in build(o)}
    custom = kinds - set(CORE_SCHEMAS)
    assert {k for _, k in custom} == {
        "Service",
        "PingSource",
        "JobSink",
        "EventPolicy",
        "KafkaSource",
        "KafkaSink",
        "KafkaTopic",
        "KafkaUser",
    }
    assert {crd_schemas()[k][1].split("/")[1] for k in custom} == folders


def test_crd_readme_names_every_vendored_file() -> None:
    readme = (CRDS / "README.md").read_text()
    vendored = {str(p.relative_to(CRDS)) for p in CRDS.glob("*/*.yaml")}
    named = set(re.findall(r"`([\w.-]+-[\d.]+/[\w.-]+\.yaml)`", readme))
    assert named == vendored
    for path in vendored:
        row = next(line for line in readme.splitlines() if f"`{path}`" in line)
        assert "config/" in row or "packaging/" in row, f"no upstream path for {path}"


# ----------------------------------------------------------------- figures per overlay


def test_namespaces_and_replica_counts_match_the_overlays(overlay: str) -> None:
    docs = build(overlay)
    assert figure("namespace", overlay) == NAMESPACES[overlay]
    assert f"export OVERLAY={overlay} NS={NAMESPACES[overlay]}" in code_blocks()
    ksvc = one(docs, "Service", "lensflow-predict", "serving.knative.dev")
    max_scale = ksvc["spec"]["template"]["metadata"]["annotations"][
        "autoscaling.knative.dev/max-scale"
    ]
    assert figure("predict replicas at most (`max-scale`)", overlay) == max_scale
    cluster = {
        d["kind"]: d
        for d in yaml.safe_load_all((KNATIVE / "kafka" / f"kafka-{overlay}.yaml").read_text())
    }
    brokers = str(cluster["KafkaNodePool"]["spec"]["replicas"])
    assert figure("Kafka brokers (`KafkaNodePool` replicas)", overlay) == brokers
    (topic_replicas,) = {t["spec"]["replicas"] for t in of_kind(docs, "KafkaTopic")}
    (isr,) = {
        int(
            t["spec"]
            .get("config", {})
            .get(
                "min.insync.replicas",
                cluster["Kafka"]["spec"]["kafka"]["config"]["min.insync.replicas"],
            )
        )
        for t in of_kind(docs, "KafkaTopic")
    }
    assert figure("topic replicas / `min.insync.replicas`", overlay) == f"{topic_replicas} / {isr}"
    (listener,) = cluster["Kafka"]["spec"]["kafka"]["listeners"]
    assert figure("Kafka listener", overlay).startswith(str(listener["port"]))
    ping = one(docs, "PingSource", "lensflow-train")
    assert figure("training schedule", overlay) == ping["spec"]["schedule"]
    (c,) = pod_spec(one(docs, "JobSink", "lensflow-train"))["containers"]
    limits = c["resources"]["limits"]
    assert (
        figure("training Job CPU / memory limit", overlay)
        == f"{limits['cpu']} / {limits['memory']}"
    )


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


def test_dev_is_called_plaintext() -> None:
    assert "**dev is plaintext on purpose**" in TEXT
    assert figure("Kafka listener", "dev").endswith("plaintext, no authentication")


# ---------------------------------------------------------------------------- Secrets


def referenced_secrets(docs: tuple[Doc, ...]) -> set[str]:
    """Every Secret name an object of the overlay reads."""
    names: set[str] = set()

    def walk(node: object, parent: str = "") -> None:
        if isinstance(node, dict):
            if parent == "secretKeyRef" or (parent == "ref" and "apiVersion" not in node):
                names.add(node["name"])
            if "secretName" in node:
                names.add(node["secretName"])
            for key, value in node.items():
                walk(value, key)
        elif isinstance(node, list):
            for item in node:
                walk(item, parent)

    for doc in docs:
        walk(doc.get("spec", {}))
    return names


def created_in_doc() -> set[str]:
    commands = code_blocks()
    made = set(re.findall(r"create secret (?:generic|tls) ([a-z0-9-]+)", commands))
    # The S3 template, applied once per exported role.
    template = yaml.safe_load((KNATIVE / "s3-secret.template.yaml").read_text())
    assert template["metadata"]["name"] == "lensflow-s3-${S3_ROLE}"
    for role, rest in re.findall(
        r"export S3_ROLE=(\w+)(.*?)(?=export S3_ROLE=|\Z)", commands, re.S
    ):
        if "knative/s3-secret.template.yaml | kubectl apply" in rest:
            made.add(f"lensflow-s3-{role}")
    return made


def test_every_secret_the_overlays_read_is_made(overlay: str) -> None:
    docs = build(overlay)
    generated = {s["metadata"]["name"] for s in of_kind(docs, "Secret")}
    strimzi = {u["metadata"]["name"] for u in of_kind(docs, "KafkaUser")}
    if strimzi:
        assert "kubectl wait kafkauser --all --for=condition=Ready" in code_blocks()
    missing = referenced_secrets(docs) - generated - strimzi - created_in_doc()
    assert not missing, f"deploy.md never creates {missing}"
    assert {f"lensflow-s3-{r}" for r in ("predict", "train")} <= referenced_secrets(docs)


def test_namespace_and_secrets_come_before_the_overlay() -> None:
    commands = code_blocks()
    apply = commands.index("kubectl apply -k knative/overlays/$OVERLAY")
    assert commands.index('kubectl create namespace "$NS"') < commands.index('-n "$NS"')
    for secret in ("lensflow-s3-predict", "lensflow-s3-train"):
        role = secret.removeprefix("lensflow-s3-")
        assert commands.index(f"export S3_ROLE={role}") < apply
    for name in ("my-cluster-cluster-ca-cert", "lensflow-s3-ca"):
        assert commands.index(f"create secret generic {name}") < apply


def test_minio_users_one_per_role_after_their_variables() -> None:
    commands = code_blocks()
    roles = sorted(p.stem for p in (KNATIVE / "minio" / "policies").glob("*.json"))
    for role in roles:
        exported = commands.index(f"export S3_ROLE={role} LENSFLOW_S3_ACCESS_KEY=lensflow-{role}")
        add = commands.index('mc admin user add lensflow "$LENSFLOW_S3_ACCESS_KEY"', exported)
        create = (
            f"mc admin policy create lensflow lensflow-{role} knative/minio/policies/{role}.json"
        )
        attach = f'mc admin policy attach lensflow lensflow-{role} --user "$LENSFLOW_S3_ACCESS_KEY"'
        assert exported < add < commands.index(create, exported) < commands.index(attach, exported)
    assert "readwrite" not in commands, "no role gets MinIO's readwrite policy"


def test_minio_chart_has_no_default_user_and_pinned_values() -> None:
    for overlay in OVERLAYS:
        values = yaml.safe_load((KNATIVE / "minio" / f"values-{overlay}.yaml").read_text())
        assert values["users"] == [], "the chart's default `console` user must not be created"
        assert values["existingSecret"] == "minio-root"
        mounts = {m["mountPath"] for m in values["extraVolumeMounts"]}
        assert "/events" in mounts
        assert values.get("tls", {}).get("enabled", False) is (overlay == "prod")
    assert "rootPassword=" not in code_blocks().split("helm install", 1)[1].split("\n", 1)[0]


def test_notifications_buffer_on_disk_and_prod_authenticates() -> None:
    commands = code_blocks()
    blocks = re.findall(
        r"mc admin config set lensflow notify_kafka:lensflow(.*?)\n(?!\s)", commands, re.S
    )
    assert len(blocks) == 2
    users = {u["metadata"]["name"]: u for u in of_kind(build("prod"), "KafkaUser")}
    for block in blocks:
        assert 'queue_dir="/events"' in block and re.search(r'queue_limit="\d+"', block)
        if ":9093" in block:
            for setting in ('tls="on"', 'sasl="on"', 'sasl_mechanism="sha512"'):
                assert setting in block
            user = re.search(r'sasl_username="([a-z-]+)"', block).group(1)
            acls = users[user]["spec"]["authorization"]["acls"]
            assert [a["resource"]["name"] for a in acls] == ["images"]
        else:
            assert ":9092" in block and "sasl" not in block


def test_security_flags_and_manual_round_are_documented() -> None:
    for flag in ('"authentication-oidc":"enabled"', '"default-authorization-mode":'):
        assert flag in code_blocks()
    commands = code_blocks()
    assert "create token lensflow-train-trigger" in commands
    assert "get jobsink lensflow-train" in commands
    one(build("prod"), "ServiceAccount", "lensflow-train-trigger")


def test_every_repository_path_in_the_doc_exists() -> None:
    pattern = r"(?<![\w/.-])((?:knative|docs|core|functions|tests)/[\w./$*-]+)"
    paths = {
        p.rstrip(".").replace("$OVERLAY", o) for p in re.findall(pattern, TEXT) for o in OVERLAYS
    }
    missing = [p for p in sorted(paths) if not list(REPO.glob(p))]
    assert not missing, missing


# ------------------------------------------------- what upstream source says (issue 18)


def test_event_policies_are_said_to_be_rejected_without_oidc() -> None:
    """knative/eventing 1.21 pkg/apis/eventing/v1alpha1/eventpolicy_validation.go: the webhook
    refuses to create an EventPolicy unless authentication-oidc is enabled."""
    assert "have no effect" not in TEXT
    assert "**rejects** every EventPolicy" in TEXT
    commands = code_blocks()
    oidc = commands.index('"authentication-oidc":"enabled"')
    assert oidc < commands.index("kubectl apply -k knative/overlays/$OVERLAY")


def test_transport_encryption_takes_permissive_or_strict() -> None:
    """pkg/apis/feature/features.go, NewFlagsConfigFromMap: only `permissive` and `strict` turn
    it on ("enabled" is parsed and never read)."""
    values = re.findall(r'"transport-encryption":"([^"]*)"', TEXT)
    assert values and set(values) <= {"permissive", "strict"}, values
    assert "`permissive`" in TEXT and "`strict`" in TEXT


def test_no_retry_after_flag_and_no_retry_after_max() -> None:
    """eventing-kafka-broker 1.21's egress contract has no Retry-After: the field and its
    feature flag would do nothing."""
    assert "delivery-retryafter" not in code_blocks()
    for overlay in OVERLAYS:
        source = one(build(overlay), "KafkaSource", "lensflow-images")
        assert "retryAfterMax" not in source["spec"]["delivery"]


def test_only_the_image_buckets_notify_and_the_training_bucket_is_made() -> None:
    commands = code_blocks()
    for overlay in OVERLAYS:
        data = config_map(build(overlay))["data"]
        images = data["LENSFLOW_IMAGE_BUCKETS"].split(",")
        made = set(re.findall(r"mc mb ([^\n]+)", commands)[0].replace("lensflow/", "").split())
        assert {*images, data["LENSFLOW_TRAIN_BUCKET"], data["LENSFLOW_MODEL_BUCKET"]} <= made
        notified = set(re.findall(r"mc event add lensflow/([a-z0-9.-]+) ", commands))
        assert notified and notified <= set(images), notified
        assert data["LENSFLOW_TRAIN_BUCKET"] not in notified


def test_minio_kafka_acks_are_not_called_two_copies() -> None:
    """MinIO internal/event/target/kafka.go: RequiredAcks = 1, so min.insync.replicas does not
    bind its notifications."""
    step9 = TEXT.split("## 9. MinIO -> Kafka notifications", 1)[1].split("\n## ", 1)[0]
    assert "acks=1" in step9
    prod = (KNATIVE / "overlays" / "prod" / "kustomization.yaml").read_text()
    claim = prod.split("kind: KafkaTopic", 1)[0].rsplit("- target:", 1)[0]
    assert "acks=1" in claim and "MinIO" in claim


def test_minio_image_is_pinned_deliberately_and_recreated() -> None:
    chart_default = "RELEASE.2024-12-18T13-15-44Z"  # chart 5.4.0's values.yaml image.tag
    for overlay in OVERLAYS:
        path = KNATIVE / "minio" / f"values-{overlay}.yaml"
        values = yaml.safe_load(path.read_text())
        tag = values["image"]["tag"]
        assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag)
        assert tag > chart_default, "newer than the chart's default, with 2025's fixes"
        assert values["image"]["repository"] == "quay.io/minio/minio"
        assert re.fullmatch(r"RELEASE\.[\dT-]+Z", values["mcImage"]["tag"])
        # One pod on ReadWriteOnce volumes: RollingUpdate would hang or run two servers.
        assert values["deploymentUpdate"] == {"type": "Recreate"}
        text = path.read_text()
        assert chart_default in text and "Source-Only" in text, "the reason is written down"


def test_predict_is_not_called_read_only() -> None:
    text = (KNATIVE / "base" / "predict-service.yaml").read_text()
    assert "read-only" not in text
    assert "to-label/" in text
