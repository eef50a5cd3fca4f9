"""librdkafka client settings, built in one place from explicit arguments.

Producers, consumers and the admin client all start from ``client_settings``, so the
connection options (where the brokers are, TLS, SASL) are set once for every client.
``KafkaConnection`` holds them (``KafkaConnection.from_env`` reads the
``LENSFLOW_KAFKA_*`` settings); a plain ``host:port`` string means plaintext.
``connect`` proves at start, in bounded time, that the brokers answer with those options,
or raises a one-line reason naming the setting to fix. No error names a credential's value.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # confluent_kafka is imported on use: the settings module imports this one
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")

BOOTSTRAP = "LENSFLOW_KAFKA_BOOTSTRAP"
PROTOCOL = "LENSFLOW_KAFKA_SECURITY_PROTOCOL"
MECHANISM = "LENSFLOW_KAFKA_SASL_MECHANISM"
USERNAME = "LENSFLOW_KAFKA_SASL_USERNAME"
PASSWORD = "LENSFLOW_KAFKA_SASL_PASSWORD"
CA_FILE = "LENSFLOW_KAFKA_CA_FILE"
CERT_FILE = "LENSFLOW_KAFKA_CERT_FILE"
KEY_FILE = "LENSFLOW_KAFKA_KEY_FILE"


class KafkaSetupError(RuntimeError):
    """Kafka cannot be used as configured; the message is one line naming the setting."""


class KafkaSettingError(KafkaSetupError, ValueError):
    """The settings contradict each other or name a file that cannot be read."""


class KafkaConnectError(KafkaSetupError):
    """The brokers did not answer, or refused the TLS handshake or the SASL login."""


@dataclass(frozen=True)
class KafkaConnection:
    """Where the brokers are and how to reach them. The password never reaches a repr."""

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], bootstrap: str) -> KafkaConnection:
        """The connection the ``LENSFLOW_KAFKA_*`` variables in ``env`` describe."""

        def get(name: str, default: str = "") -> str:
            return (env.get(name) or default).strip()

        return cls(
            bootstrap=bootstrap,
            security_protocol=get(PROTOCOL, "PLAINTEXT").upper(),
            sasl_mechanism=get(MECHANISM, "SCRAM-SHA-512").upper(),
            sasl_username=get(USERNAME),
            sasl_password=env.get(PASSWORD) or "",  # a password may start with a space
            ca_file=get(CA_FILE),
            cert_file=get(CERT_FILE),
            key_file=get(KEY_FILE),
        )

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def redact(self, text: str) -> str:
        """``text`` on one line, with the password (should a library echo it) masked."""
        if self.sasl_password:
            text = text.replace(self.sasl_password, "***")
        return " ".join(text.split())


def as_connection(kafka: KafkaConnection | str) -> KafkaConnection:
    """``kafka`` itself, or a plaintext connection to the bootstrap servers it names."""
    return KafkaConnection(kafka) if isinstance(kafka, str) else kafka


def validate(kafka: KafkaConnection) -> None:
    """Raise ``KafkaSettingError`` for settings that cannot work together."""
    if not kafka.bootstrap.strip():
        raise KafkaSettingError(f"{BOOTSTRAP} is empty")
    if kafka.security_protocol not in PROTOCOLS:
        raise KafkaSettingError(
            f"{PROTOCOL} must be one of {', '.join(PROTOCOLS)}, not {kafka.security_protocol!r}"
        )
    if kafka.sasl:
        if kafka.sasl_mechanism not in MECHANISMS:
            raise KafkaSettingError(
                f"{MECHANISM} must be one of {', '.join(MECHANISMS)}, not {kafka.sasl_mechanism!r}"
            )
        for name, value in ((USERNAME, kafka.sasl_username), (PASSWORD, kafka.sasl_password)):
            if not value:
                raise KafkaSettingError(
                    f"{name} is not set; {PROTOCOL}={kafka.security_protocol} logs in with it"
                )
    files = {CA_FILE: kafka.ca_file, CERT_FILE: kafka.cert_file, KEY_FILE: kafka.key_file}
    given = [name for name, path in files.items() if path]
    if given and not kafka.tls:
        # Most likely someone meant TLS: sending plaintext instead would be a silent downgrade.
        raise KafkaSettingError(
            f"{given[0]} is set but {PROTOCOL}={kafka.security_protocol} does not use TLS "
            "(use SSL or SASL_SSL)"
        )
    if bool(kafka.cert_file) != bool(kafka.key_file):
        have, missing = (CERT_FILE, KEY_FILE) if kafka.cert_file else (KEY_FILE, CERT_FILE)
        raise KafkaSettingError(f"{have} is set without {missing}: mTLS needs both")
    for name in given:
        path = files[name]
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise KafkaSettingError(f"{name}: no readable file at {path}")


def client_settings(
    kafka: KafkaConnection | str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Settings for a confluent-kafka client of ``kafka``, with ``extra`` on top.

    Raises ``KafkaSettingError`` when the connection settings cannot work.
    """
    kafka = as_connection(kafka)
    validate(kafka)
    settings: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap,
        "security.protocol": kafka.security_protocol.lower(),
        # Topics exist only as lensflow_eventing.topics.ensure_topics creates them: no client may
        # auto-create one with the broker's defaults (Tansu honours this flag, and then
        # creates nothing, not even on a produce to a topic it lost).
        "allow.auto.create.topics": False,
    }
    if kafka.sasl:
        settings |= {
            "sasl.mechanism": kafka.sasl_mechanism,
            "sasl.username": kafka.sasl_username,
            "sasl.password": kafka.sasl_password,
        }
    if kafka.ca_file:  # otherwise librdkafka trusts the system's CA store
        settings["ssl.ca.location"] = kafka.ca_file
    if kafka.cert_file:
        settings["ssl.certificate.location"] = kafka.cert_file
        settings["ssl.key.location"] = kafka.key_file
    return settings | dict(extra or {})


def connect(kafka: KafkaConnection | str, timeout_s: float = 10.0) -> AdminClient:
    """An admin client whose brokers answered a metadata request within ``timeout_s``.

    Raises ``KafkaSettingError`` or ``KafkaConnectError`` with a one-line reason naming the
    setting to fix: at once for a refused TLS handshake or SASL login, after ``timeout_s``
    when no broker answers.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    kafka = as_connection(kafka)
    # librdkafka reports these through error_cb while it keeps retrying: neither heals by
    # waiting, so the first one ends the check.
    refusals = (KafkaError._AUTHENTICATION, KafkaError._SSL)
    errors: deque[KafkaError] = deque(maxlen=16)
    settings = client_settings(
        kafka,
        {
            "client.id": "lensflow-connect",
            "error_cb": errors.append,
            # The reasons come through error_cb and are raised once, on one line; without
            # this librdkafka would also print every reconnect attempt to stderr.
            "log_level": 0,
        },
    )
    try:
        admin = AdminClient(settings)
    except KafkaException as exc:  # e.g. a CA, certificate or key file that is not PEM
        raise KafkaSettingError(_unusable_file(kafka, exc.args[0])) from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=max(0.05, min(0.5, deadline - time.monotonic())))
            return admin
        except KafkaException as exc:
            last = exc.args[0]
        admin.poll(0)  # serves error_cb
        refused = [e for e in errors if e.code() in refusals]
        if refused or time.monotonic() >= deadline:
            # "1/1 brokers are down" says less than the reason a broker gave, if there is one.
            telling = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
            raise KafkaConnectError(_explain(kafka, refused or telling or [last], timeout_s))


def _unusable_file(kafka: KafkaConnection, err: KafkaError) -> str:
    text = kafka.redact(err.str())
    for name, key, path in (
        (CA_FILE, "ssl.ca", kafka.ca_file),
        (CERT_FILE, "ssl.certificate", kafka.cert_file),
        (KEY_FILE, "ssl.key", kafka.key_file),
    ):
        if key in text:
            return f"{name}: librdkafka cannot use {path}: {text}"
    return f"Kafka client settings rejected ({PROTOCOL}={kafka.security_protocol}): {text}"


def _explain(kafka: KafkaConnection, errors: list[KafkaError], timeout_s: float) -> str:
    from confluent_kafka import KafkaError

    err = errors[0]
    reason = kafka.redact(err.str())
    if err.code() == KafkaError._AUTHENTICATION:
        return (
            f"Kafka refused the SASL login ({USERNAME}, {PASSWORD}, "
            f"{MECHANISM}={kafka.sasl_mechanism}): {reason}"
        )
    if err.code() == KafkaError._SSL:
        if "certificate verify failed" in reason:
            trusted = f"{CA_FILE}={kafka.ca_file}" if kafka.ca_file else f"{CA_FILE} (unset)"
            return f"the brokers' TLS certificate is not trusted by {trusted}: {reason}"
        return f"TLS handshake with the brokers failed ({PROTOCOL}, {CA_FILE}): {reason}"
    return (
        f"no Kafka broker answered at {BOOTSTRAP}={kafka.bootstrap} within {timeout_s:g} s "
        f"({PROTOCOL}={kafka.security_protocol}): {reason}"
    )
