"""Kafka TLS/SASL: the librdkafka settings, and failing fast, on one line, at start.

Real parts: a loopback TLS listener with certificates from private CAs (Tansu 0.6.0 serves
no TLS, see docs/security.md), and Tansu with ``--authentication`` (SASL SCRAM; it refuses
every login here, as no user can be created on its in-memory storage).
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from lensflow.cli import main as cli
from lensflow.function_server import FunctionServer
from lensflow.process import port_open
from lensflow.servers import KafkaBroker
from lensflow_core.kafka import (
    KafkaConnectError,
    KafkaConnection,
    KafkaSettingError,
    client_settings,
    connect,
)
from lensflow_core.settings import SETTINGS, Config
from tests.support.env import make_env
from tests.support.tls_certs import TestCA, TlsListener

# Distinctive secrets: no output, log or error may ever contain them.
PASSWORD = "kafka-pw-Q7vX2mZ9"
S3_SECRET = "s3-secret-R4nT8wK1"


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kafka-tls")
    return TestCA(folder, "cluster"), TestCA(folder, "other")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Readable stand-ins for the PEM files (validation only reads their existence)."""
    folder = tmp_path_factory.mktemp("pem")
    paths = {}
    for name in ("ca", "cert", "key"):
        (folder / f"{name}.pem").write_text("-----BEGIN X-----\n")
        paths[name] = str(folder / f"{name}.pem")
    return paths


class AuthenticatingBroker(KafkaBroker):
    """Tansu with ``--authentication``: SASL SCRAM required from every client."""

    def server_command(self) -> list[str]:
        return [*super().server_command(), "--authentication"]

    def answers(self) -> bool:  # a plaintext metadata request is refused by design
        return True


@pytest.fixture(scope="module")
def auth_broker():
    with AuthenticatingBroker() as broker:
        yield broker


def settings_of(env: dict[str, str]) -> dict:
    return client_settings(Config.from_env(env).kafka)


def sasl(protocol: str, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
    return {
        "LENSFLOW_KAFKA_SECURITY_PROTOCOL": protocol,
        "LENSFLOW_KAFKA_SASL_MECHANISM": mechanism,
        "LENSFLOW_KAFKA_SASL_USERNAME": "lensflow-predict",
        "LENSFLOW_KAFKA_SASL_PASSWORD": PASSWORD,
    }


SASL_SETTINGS = {"sasl.username": "lensflow-predict", "sasl.password": PASSWORD}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, {"security.protocol": "plaintext"}),
        ({"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "SSL"}, {"security.protocol": "ssl"}),
        (
            {"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "ssl", "LENSFLOW_KAFKA_CA_FILE": "{ca}"},
            {"security.protocol": "ssl", "ssl.ca.location": "{ca}"},
        ),
        (
            {
                "LENSFLOW_KAFKA_SECURITY_PROTOCOL": "SSL",
                "LENSFLOW_KAFKA_CA_FILE": "{ca}",
                "LENSFLOW_KAFKA_CERT_FILE": "{cert}",
                "LENSFLOW_KAFKA_KEY_FILE": "{key}",
            },
            {
                "security.protocol": "ssl",
                "ssl.ca.location": "{ca}",
                "ssl.certificate.location": "{cert}",
                "ssl.key.location": "{key}",
            },
        ),
        (
            {**sasl("SASL_SSL"), "LENSFLOW_KAFKA_CA_FILE": "{ca}"},
            {
                "security.protocol": "sasl_ssl",
                "sasl.mechanism": "SCRAM-SHA-512",
                **SASL_SETTINGS,
                "ssl.ca.location": "{ca}",
            },
        ),
        (
            sasl("SASL_SSL", "SCRAM-SHA-256"),
            {"security.protocol": "sasl_ssl", "sasl.mechanism": "SCRAM-SHA-256", **SASL_SETTINGS},
        ),
        (
            sasl("SASL_PLAINTEXT", "PLAIN"),
            {"security.protocol": "sasl_plaintext", "sasl.mechanism": "PLAIN", **SASL_SETTINGS},
        ),
        (
            {**sasl("SASL_PLAINTEXT"), "LENSFLOW_KAFKA_SASL_MECHANISM": ""},  # the default
            {"security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-512"}
            | SASL_SETTINGS,
        ),
        (  # a mechanism without a SASL protocol is not used
            {"LENSFLOW_KAFKA_SASL_MECHANISM": "PLAIN"},
            {"security.protocol": "plaintext"},
        ),
    ],
)
def test_librdkafka_settings_for_each_combination(env, expected, files):
    env = {k: v.format(**files) for k, v in env.items()}
    expected = {k: v.format(**files) for k, v in expected.items()}
    settings = settings_of({"LENSFLOW_KAFKA_BOOTSTRAP": "kafka:9093", **env})
    assert settings == {
        "bootstrap.servers": "kafka:9093",
        "allow.auto.create.topics": False,  # every client, whatever the security
        **expected,
    }


def test_every_client_kind_starts_from_the_same_settings(files):
    """Producers, consumers and admin clients all get the security settings."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient

    from lensflow_eventing.dispatcher import Dispatcher
    from lensflow_eventing.producer import make_producer

    kafka = Config.from_env(
        {**sasl("SASL_SSL"), "LENSFLOW_KAFKA_CA_FILE": files["ca"].replace("ca.pem", "none")}
    ).kafka
    # A missing CA file is refused however the client is made.
    for make in (
        lambda: make_producer(kafka),
        lambda: Dispatcher(
            kafka, "images", "http://127.0.0.1:1", source="s", group_id="g", dead_letter_topic="d"
        ),
        lambda: connect(kafka),
    ):
        with pytest.raises(KafkaSettingError, match="LENSFLOW_KAFKA_CA_FILE"):
            make()
    # And the settings they are made from are accepted by every kind of client.
    ok = Config.from_env(sasl("SASL_PLAINTEXT")).kafka
    for kind in (Producer, AdminClient):
        kind(client_settings(ok))
    Consumer(client_settings(ok, {"group.id": "g"})).close()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "TLS"}, "LENSFLOW_KAFKA_SECURITY_PROTOCOL"),
        (
            {**sasl("SASL_SSL"), "LENSFLOW_KAFKA_SASL_MECHANISM": "GSSAPI"},
            "LENSFLOW_KAFKA_SASL_MECHANISM",
        ),
        (
            {**sasl("SASL_SSL"), "LENSFLOW_KAFKA_SASL_PASSWORD": ""},
            "LENSFLOW_KAFKA_SASL_PASSWORD",
        ),
        (
            {**sasl("SASL_PLAINTEXT"), "LENSFLOW_KAFKA_SASL_USERNAME": ""},
            "LENSFLOW_KAFKA_SASL_USERNAME",
        ),
        (
            {"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "SSL", "LENSFLOW_KAFKA_CA_FILE": "/nowhere.pem"},
            "LENSFLOW_KAFKA_CA_FILE: no readable file at /nowhere.pem",
        ),
        (
            {"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "SSL", "LENSFLOW_KAFKA_CERT_FILE": "{cert}"},
            "LENSFLOW_KAFKA_CERT_FILE is set without LENSFLOW_KAFKA_KEY_FILE",
        ),
        (
            {"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "SSL", "LENSFLOW_KAFKA_KEY_FILE": "{key}"},
            "LENSFLOW_KAFKA_KEY_FILE is set without LENSFLOW_KAFKA_CERT_FILE",
        ),
        (  # a CA with plaintext would silently not use TLS
            {**sasl("SASL_PLAINTEXT"), "LENSFLOW_KAFKA_CA_FILE": "{ca}"},
            "LENSFLOW_KAFKA_CA_FILE is set but LENSFLOW_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        ),
        ({"LENSFLOW_KAFKA_BOOTSTRAP": " "}, "LENSFLOW_KAFKA_BOOTSTRAP is empty"),
    ],
)
def test_settings_that_cannot_work_fail_on_one_line_naming_the_setting(env, named, files):
    env = {k: v.format(**files) for k, v in env.items()}
    with pytest.raises(KafkaSettingError) as caught:
        settings_of(env)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message and PASSWORD not in message


def test_the_password_stays_out_of_reprs():
    config = Config.from_env(sasl("SASL_SSL"))
    assert config.kafka.sasl_password == PASSWORD
    assert PASSWORD not in repr(config) and PASSWORD not in repr(config.kafka)
    assert {s.name for s in SETTINGS if s.secret} >= {"LENSFLOW_KAFKA_SASL_PASSWORD"}


def test_a_certificate_from_another_ca_fails_the_handshake_fast(cas):
    cluster, other = cas
    with TlsListener(other.issue()) as listener:
        kafka = KafkaConnection(listener.address, "SSL", ca_file=str(cluster.pem))
        started = time.monotonic()
        with pytest.raises(KafkaConnectError) as caught:
            connect(kafka, timeout_s=10)
        assert time.monotonic() - started < 5, "a refused certificate ends the check at once"
    message = str(caught.value)
    assert "LENSFLOW_KAFKA_CA_FILE" in message and "certificate verify failed" in message
    assert "\n" not in message


def test_the_right_ca_passes_the_handshake(cas):
    """The same listener with a certificate the CA file vouches for: the TLS handshake
    completes (this listener speaks no Kafka, so the check then times out, naming the
    bootstrap, not the CA)."""
    cluster, _ = cas
    with TlsListener(cluster.issue()) as listener:
        kafka = KafkaConnection(listener.address, "SSL", ca_file=str(cluster.pem))
        with pytest.raises(KafkaConnectError) as caught:
            connect(kafka, timeout_s=1.5)
        assert listener.handshakes >= 1
    assert "LENSFLOW_KAFKA_BOOTSTRAP" in str(caught.value)
    assert "certificate" not in str(caught.value)


def test_a_file_that_is_not_pem_is_named(tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate")
    with pytest.raises(KafkaSettingError, match=f"LENSFLOW_KAFKA_CA_FILE: .*{junk}"):
        connect(KafkaConnection("127.0.0.1:1", "SSL", ca_file=str(junk)))


def test_no_listener_fails_within_the_timeout(cas):
    """A TLS client against a plaintext Kafka port, and any client against a closed port,
    give up after the timeout instead of retrying forever."""
    cluster, _ = cas
    started = time.monotonic()
    with pytest.raises(KafkaConnectError, match="LENSFLOW_KAFKA_BOOTSTRAP=127.0.0.1:1 "):
        connect(KafkaConnection("127.0.0.1:1", "SSL", ca_file=str(cluster.pem)), timeout_s=1)
    assert time.monotonic() - started < 4


def test_a_refused_sasl_login_fails_fast_naming_the_credentials(auth_broker):
    kafka = KafkaConnection(
        auth_broker.bootstrap, "SASL_PLAINTEXT", "SCRAM-SHA-512", "lensflow-predict", PASSWORD
    )
    started = time.monotonic()
    with pytest.raises(KafkaConnectError) as caught:
        connect(kafka, timeout_s=10)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "LENSFLOW_KAFKA_SASL_PASSWORD" in message and "SASL" in message
    assert PASSWORD not in message and "\n" not in message


def test_plaintext_against_an_authenticating_broker_is_bounded(auth_broker):
    with pytest.raises(KafkaConnectError, match="LENSFLOW_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"):
        connect(auth_broker.bootstrap, timeout_s=1)


# --- at start: the CLI and a predict replica ---------------------------------------------


def secret_env(s3_endpoint: str, bootstrap: str, **extra: str) -> dict[str, str]:
    return make_env(
        s3_endpoint,
        bootstrap,
        **{**sasl("SASL_PLAINTEXT"), "LENSFLOW_S3_SECRET_KEY": S3_SECRET, **extra},
    )


def run_cli(monkeypatch, capfd, env: dict[str, str], argv: list[str]) -> tuple[int, str, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli(argv)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "extra", "named"),
    [
        (["predictions", "tail", "--json"], {}, "LENSFLOW_KAFKA_SASL_PASSWORD"),
        (["dispatch", "--json", "--sink", "http://127.0.0.1:1"], {}, "LENSFLOW_KAFKA_SASL"),
        (["dlq", "list", "--json"], {}, "LENSFLOW_KAFKA_SASL_PASSWORD"),
        (
            ["dlq", "list"],
            {"LENSFLOW_KAFKA_SASL_PASSWORD": ""},
            "LENSFLOW_KAFKA_SASL_PASSWORD is not set",
        ),
        (
            ["predictions", "tail"],
            {"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "LENSFLOW_KAFKA_CA_FILE": "/no.pem"},
            "LENSFLOW_KAFKA_CA_FILE: no readable file at /no.pem",
        ),
    ],
)
def test_cli_fails_at_start_on_one_line_without_secrets(
    argv, extra, named, auth_broker, s3_server, monkeypatch, capfd, tmp_path
):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8 not really")
    env = secret_env(s3_server.endpoint, auth_broker.bootstrap, **extra)
    started = time.monotonic()
    code, out, err = run_cli(monkeypatch, capfd, env, [a.format(image=image) for a in argv])
    assert time.monotonic() - started < 15
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert named in err
    if "--json" in argv:
        assert named in json.loads(out)["error"]
    for secret in (PASSWORD, S3_SECRET):
        assert secret not in out + err


def wait_reason(url: str, timeout_s: float = 30.0) -> requests.Response:
    """/healthz once the replica knows why it is not ready."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = requests.get(f"{url}/healthz", timeout=15)
        reason = reply.json().get("reason", "")
        if reply.ok or ("checking" not in reason) or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({}, "LENSFLOW_KAFKA_SASL_PASSWORD"),  # refused by the broker
        (  # refused before connecting: the mounted CA file is not there
            {"LENSFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "LENSFLOW_KAFKA_CA_FILE": "/no.pem"},
            "LENSFLOW_KAFKA_CA_FILE: no readable file at /no.pem",
        ),
    ],
)
def test_predict_replica_stays_not_ready_with_the_reason(
    extra, named, auth_broker, s3_server, tmp_path
):
    env = secret_env(s3_server.endpoint, auth_broker.bootstrap, **extra)
    log = tmp_path / "predict.log"
    server = FunctionServer("predict", env, log)
    server.start(lambda: port_open("127.0.0.1", server.port), timeout_s=60)
    try:
        health = wait_reason(server.url)
        assert health.status_code == 503
        assert named in health.json()["reason"]
        post = requests.post(server.url, data=b"{}", timeout=15)
        assert post.status_code == 503
        texts = [health.text, post.text]
    finally:
        server.stop()
    texts.append(log.read_text())
    assert named in texts[-1], "the log says why, too"
    for secret in (PASSWORD, S3_SECRET):
        assert not any(secret in text for text in texts)
