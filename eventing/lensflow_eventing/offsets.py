"""Which offset of a partition may be committed, when events finish out of order.

Kafka commits one number per partition: "everything below this is done". With several
events of a partition in flight, a later one may finish first; committing it would claim
the earlier ones done too and lose them in a crash. So the commit point is the lowest
offset still outstanding (started and not yet done), or one past the highest started
offset when nothing is outstanding. An event that could neither be delivered nor
dead-lettered stays outstanding: the commit point never passes it in this run, and the
next owner of the partition gets it again (at-least-once; duplicates are allowed).
"""

from __future__ import annotations


class OffsetTracker:
    """Commit bookkeeping for one partition. Not thread-safe: one owner thread."""

    def __init__(self) -> None:
        self._outstanding: set[int] = set()
        self._next: int | None = None  # one past the highest offset started
        self.committed: int | None = None  # the last commit point handed to Kafka

    def start(self, offset: int) -> None:
        if self._next is None and self.committed is None:
            # The first record comes from where the group's commit (or the reset policy)
            # pointed: committing that same offset again would say nothing new.
            self.committed = offset
        self._outstanding.add(offset)
        if self._next is None or offset + 1 > self._next:
            self._next = offset + 1

    def done(self, offset: int) -> None:
        """Delivered or dead-lettered: it may be committed. (An event that was neither is
        never marked done, so it holds the commit point below it.)"""
        self._outstanding.discard(offset)

    def commit_point(self) -> int | None:
        """The offset to commit (Kafka's "next to read"), or None if nothing started."""
        if self._outstanding:
            return min(self._outstanding)
        return self._next

    def to_commit(self) -> int | None:
        """The commit point if it moved past the last one committed, else None."""
        point = self.commit_point()
        if point is None or (self.committed is not None and point <= self.committed):
            return None
        return point


def _committed(consumer, topic: str, timeout_s: float) -> list:
    """The group's committed offset of each partition of ``topic`` ([] if no topic)."""
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    if metadata.error is not None:
        if metadata.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return []
        raise KafkaException(metadata.error)
    partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
    return consumer.committed(partitions, timeout=timeout_s)


def _group_consumer(bootstrap, group_id: str):
    from confluent_kafka import Consumer

    from lensflow_core.kafka import client_settings

    return Consumer(client_settings(bootstrap, {"group.id": group_id}))


def group_lag(bootstrap, topic: str, group_id: str, timeout_s: float = 5.0) -> int:
    """Records of ``topic`` that consumer group ``group_id`` has not committed yet: the
    sum over partitions of the high watermark minus the committed offset (everything,
    for a partition the group never committed). Asks the broker now, nothing cached;
    raises ``KafkaException`` when it cannot."""
    consumer = _group_consumer(bootstrap, group_id)
    try:
        lag = 0
        for tp in _committed(consumer, topic, timeout_s):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            done = tp.offset if tp.offset >= 0 else low
            lag += max(high - done, 0)
        return lag
    finally:
        consumer.close()


def committed_offsets(bootstrap, topic: str, group_id: str, timeout_s: float = 5.0) -> dict:
    """{partition: committed offset} of group ``group_id`` on ``topic`` (partitions it
    never committed are left out). Raises ``KafkaException`` when the broker cannot say."""
    consumer = _group_consumer(bootstrap, group_id)
    try:
        return {
            tp.partition: tp.offset
            for tp in _committed(consumer, topic, timeout_s)
            if tp.offset >= 0
        }
    finally:
        consumer.close()
