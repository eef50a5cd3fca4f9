"""The three topics lensflow uses, and an idempotent way to create them.

Partition counts are the unit of parallelism: the images topic has 6 so that six
partitions (six ordered lanes, or six consumers of a group) can work at once; predictions
are lighter and need fewer; the dead-letter topic has 1 because it is read by people, in
order, rarely. In production the topics are declared as cluster resources; ``ensure_topics``
is for the embedded stack, tests and first runs against an empty cluster.

Tansu (the embedded broker) honours ``create_topics`` with any partition count, answers
TOPIC_ALREADY_EXISTS for a second create, and auto-creates unknown topics on produce with
its own default partition count, which is why the stack creates them up front.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from lensflow_core.kafka import KafkaConnection, connect

log = logging.getLogger(__name__)

IMAGES_PARTITIONS = 6
PREDICTIONS_PARTITIONS = 3
DLQ_PARTITIONS = 1


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(
    images: str, predictions: str, dlq: str, replication_factor: int = 1
) -> list[TopicSpec]:
    """The images, predictions and dead-letter topics, by name."""
    return [
        TopicSpec(images, IMAGES_PARTITIONS, replication_factor),
        TopicSpec(predictions, PREDICTIONS_PARTITIONS, replication_factor),
        TopicSpec(dlq, DLQ_PARTITIONS, replication_factor),
    ]


def ensure_topics(
    bootstrap: KafkaConnection | str, specs: list[TopicSpec], timeout_s: float = 15.0
) -> dict[str, str]:
    """Create the topics that do not exist yet; ``{name: "created" | "exists"}``.

    An existing topic is left as it is, even with another partition count (changing it
    would move keys between partitions and break per-key ordering); a warning says so.
    Brokers that do not answer, or refuse TLS or the login, raise ``KafkaSetupError``
    (one line naming the setting); any other failure raises ``KafkaException``.
    """
    admin = connect(bootstrap, timeout_s)
    existing = admin.list_topics(timeout=timeout_s).topics
    result: dict[str, str] = {}
    wanted = []
    for spec in specs:
        if spec.name in existing:
            result[spec.name] = "exists"
            _check_partitions(spec, len(existing[spec.name].partitions))
        else:
            wanted.append(spec)
    if not wanted:
        return result
    futures = admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication_factor, config=s.config) for s in wanted],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for spec in wanted:
        try:
            futures[spec.name].result(timeout=timeout_s)
            result[spec.name] = "created"
            log.info("created topic %s with %d partitions", spec.name, spec.partitions)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            result[spec.name] = "exists"  # someone else created it between list and create
    return result


def _check_partitions(spec: TopicSpec, actual: int) -> None:
    if actual != spec.partitions:
        log.warning(
            "topic %s has %d partitions, lensflow would create it with %d; leaving it as is",
            spec.name,
            actual,
            spec.partitions,
        )
