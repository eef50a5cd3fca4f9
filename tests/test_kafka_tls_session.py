"""A whole Kafka session over TLS: every lensflow client, a private CA, a real broker.

Tansu 0.6.0 serves no TLS (docs/security.md), so Debian's stunnel terminates TLS in front of
it, with a certificate from a CA made here; Tansu listens in plaintext on a loopback port and
advertises the TLS port, so every connection a client makes after the bootstrap (metadata
names the broker at its advertised address) goes through the TLS listener too. The clients
are lensflow's own, built by ``lensflow_core.kafka`` from ``LENSFLOW_KAFKA_*`` only: the
admin client (``connect``, ``ensure_topics``), the producer (``make_producer``), the
dispatcher's consumer group and its dead-letter producer, and the topic reader the CLI uses.
"""

from __future__ import annotations

import json
import time

import pytest
from cloudevents.kafka import KafkaMessage

from lensflow.process import free_port
from lensflow.servers import KafkaBroker
from lensflow.stack import dispatcher_for
from lensflow_core.kafka import KafkaConnectError, KafkaConnection, connect
from lensflow_core.settings import Config
from lensflow_eventing.contracts import OBJECT_CREATED_PUT, ObjectEvent, notification_record
from lensflow_eventing.delivery import DeliverySpec
from lensflow_eventing.predictions import TopicReader
from lensflow_eventing.producer import make_producer, produce_and_wait
from lensflow_eventing.topics import ensure_topics, topic_specs
from tests.support.env import make_env
from tests.support.eventing_dispatcher import Sink
from tests.support.tls_certs import Stunnel, TestCA, stunnel_binary

pytestmark = pytest.mark.slow


class TlsFrontedBroker(KafkaBroker):
    """Tansu on a plaintext loopback port, advertising ``advertised_port`` (stunnel's)."""

    def __init__(self, advertised_port: int):
        self.advertised_port = advertised_port
        super().__init__()

    def server_command(self) -> list[str]:
        command = super().server_command()
        at = command.index("--advertised-listener-url") + 1
        command[at] = f"tcp://{self.host}:{self.advertised_port}"
        return command

    def answers(self) -> bool:  # its metadata names the TLS port: checked through stunnel
        return True


@pytest.fixture(scope="module")
def tls_kafka(tmp_path_factory):
    """(environment with the SSL settings and the CA, another CA's file, stunnel)."""
    stunnel_binary()  # skip (or, in CI, fail) before starting anything
    folder = tmp_path_factory.mktemp("kafka-tls-session")
    ca, other = TestCA(folder, "kafka"), TestCA(folder, "other")
    tls_port = free_port()  # first: Tansu must advertise it
    with (
        TlsFrontedBroker(tls_port) as broker,
        Stunnel(ca.issue(), broker.port, folder, port=tls_port) as tunnel,
    ):
        env = make_env(
            "http://127.0.0.1:1",  # no S3 in this test
            f"127.0.0.1:{tls_port}",
            LENSFLOW_KAFKA_SECURITY_PROTOCOL="SSL",
            LENSFLOW_KAFKA_CA_FILE=str(ca.pem),
        )
        connect(Config.from_env(env).kafka, timeout_s=20)  # the broker answers over TLS
        yield env, other.pem, tunnel


def test_every_client_moves_records_over_tls(tls_kafka):
    env, _, tunnel = tls_kafka
    config = Config.from_env(env)
    kafka = config.kafka
    handshakes = tunnel_handshakes(tunnel)
    assert (kafka.security_protocol, kafka.ca_file) == ("SSL", env["LENSFLOW_KAFKA_CA_FILE"])
    # admin: the topics, created through the TLS listener
    created = ensure_topics(kafka, topic_specs(*config.topics))
    assert set(created.values()) == {"created"}
    # producer: two MinIO notification records (one the sink takes, one it refuses)
    producer = make_producer(kafka)
    for name in ("good.jpg", "bad.jpg"):
        event = ObjectEvent(
            OBJECT_CREATED_PUT, config.image_buckets[0], f"tls/{name}", size=5, etag="e"
        )
        key, value = notification_record(event)
        produce_and_wait(producer, config.topic_images, _message(key, value), timeout_s=15)
    # consumer group: the local KafkaSource delivers both; the refused one is dead-lettered
    # by its own producer
    sink = Sink(
        lambda headers, body, n: (422, b'{"reason": "no"}') if b"bad" in body else (200, b"")
    )
    dispatcher = dispatcher_for(config, sink.url, delivery=FAST, group_id="tls-session").start()
    try:
        requests = sink.wait(2)
        dead = _read(kafka, config.topic_dlq, 1)
    finally:
        dispatcher.stop()
        sink.close()
    keys = sorted(json.loads(body)["Key"] for _, body, _ in requests)
    assert keys == [f"{config.image_buckets[0]}/tls/{n}" for n in ("bad.jpg", "good.jpg")]
    assert [m.key() for m in dead] == [f"{config.image_buckets[0]}/tls/bad.jpg".encode()]
    assert dispatcher.stats()["delivered"] == 1
    # each of the five clients (admin, producer, consumer group, dead-letter producer,
    # reader) negotiated its own TLS sessions with stunnel, to the bootstrap and to the
    # advertised broker address
    assert tunnel_handshakes(tunnel) - handshakes >= 5


def test_plaintext_and_another_ca_are_refused_by_the_same_listener(tls_kafka):
    env, other_ca, _ = tls_kafka
    bootstrap = env["LENSFLOW_KAFKA_BOOTSTRAP"]
    with pytest.raises(KafkaConnectError, match="LENSFLOW_KAFKA_CA_FILE"):
        connect(KafkaConnection(bootstrap, "SSL", ca_file=str(other_ca)), timeout_s=10)
    with pytest.raises(KafkaConnectError, match="LENSFLOW_KAFKA_BOOTSTRAP"):
        connect(KafkaConnection(bootstrap, "PLAINTEXT"), timeout_s=3)


def tunnel_handshakes(tunnel: Stunnel) -> int:
    """TLS sessions stunnel completed so far (it logs each one)."""
    return tunnel.log_path.read_text(errors="replace").count("TLS accepted: new session")


FAST = DeliverySpec(retry=1, backoff_delay_s=0.02, timeout_s=5)


def _message(key: bytes, value: bytes) -> KafkaMessage:
    return KafkaMessage(headers={}, key=key, value=value)


def _read(kafka: KafkaConnection, topic: str, count: int, timeout_s: float = 20.0) -> list:
    """The first ``count`` records of ``topic``, read by the CLI's topic reader."""
    found: list = []
    with TopicReader(kafka, topic, group="tls-reader") as reader:
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            found += reader.poll(0.2, max_records=count - len(found))
    return found
