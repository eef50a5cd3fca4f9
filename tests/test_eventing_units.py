"""Pure pieces of the eventing half: delivery policy, commit bookkeeping, dead letters."""

from __future__ import annotations

import base64

import pytest
from cloudevents.http import CloudEvent
from cloudevents.kafka import KafkaMessage, from_binary

from lensflow_eventing.contracts import kafkasource_event
from lensflow_eventing.dead_letter import annotate, kafka_binary
from lensflow_eventing.delivery import DeliverySpec, deliver, parse_duration, retryable
from lensflow_eventing.offsets import OffsetTracker


def test_backoff_delays_are_knatives():
    exponential = DeliverySpec(backoff_delay_s=0.3)
    assert [exponential.delay_s(n) for n in (1, 2, 3)] == pytest.approx([0.6, 1.2, 2.4])
    linear = DeliverySpec(backoff_policy="linear", backoff_delay_s=0.5)
    assert [linear.delay_s(n) for n in (1, 2, 3)] == pytest.approx([0.5, 1.0, 1.5])
    with pytest.raises(ValueError):
        DeliverySpec(backoff_policy="fibonacci")


def test_delivery_spec_from_a_manifest():
    assert DeliverySpec.from_knative(None) == DeliverySpec(10, "exponential", 0.3, 600.0)
    assert DeliverySpec.from_knative({"backoffDelay": "PT1S"}).retry == 0  # no retry: zero
    spec = DeliverySpec.from_knative(
        {"retry": 3, "backoffPolicy": "linear", "backoffDelay": "PT0.5S", "timeout": "PT2M"}
    )
    assert spec == DeliverySpec(3, "linear", 0.5, 120.0)
    assert parse_duration("PT1H2M3.5S") == 3723.5
    with pytest.raises(ValueError):
        parse_duration("10s")


@pytest.mark.parametrize(
    "status, again",
    [
        (None, True),
        (500, True),
        (503, True),
        (404, True),
        (408, True),
        (409, True),
        (429, True),
        (400, False),
        (413, False),
        (415, False),
        (422, False),
        (301, False),
        (401, False),
    ],
)
def test_which_statuses_are_retried(status, again):
    assert retryable(status) is again


class ScriptedSink:
    url = "local://scripted"

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls = 0

    def post(self, headers, body, timeout_s):
        self.calls += 1
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_deliver_retries_network_errors_and_stops_at_a_final_status():
    spec = DeliverySpec(retry=5, backoff_delay_s=0.001)
    sink = ScriptedSink(ConnectionError("refused"), (503, b""), (200, b"ok"))
    result = deliver(sink, {}, b"", spec)
    assert (result.delivered, result.attempts, result.retries) == (True, 3, 2)
    sink = ScriptedSink((503, b""), (415, b"no"))
    result = deliver(sink, {}, b"", spec)
    assert (result.delivered, result.status, result.body, result.attempts) == (False, 415, b"no", 2)
    sink = ScriptedSink(ConnectionError("refused"), ConnectionError("refused"))
    result = deliver(sink, {}, b"", DeliverySpec(retry=1, backoff_delay_s=0.001))
    assert (result.delivered, result.status, result.attempts) == (False, None, 2)
    assert "refused" in result.error


def test_commit_point_is_the_finished_prefix():
    offsets = OffsetTracker()
    assert offsets.to_commit() is None
    for o in (10, 11, 12, 13):
        offsets.start(o)
    assert offsets.to_commit() is None  # 10 is where we started: nothing new to say
    offsets.done(12)
    offsets.done(11)
    assert offsets.to_commit() is None  # 10 still in flight
    offsets.done(10)
    assert offsets.to_commit() == 13
    offsets.committed = 13
    offsets.start(13)  # then neither delivered nor dead-lettered: never done
    offsets.start(14)
    offsets.done(14)
    assert offsets.to_commit() is None and offsets.commit_point() == 13


def test_dead_letter_without_datacontenttype_round_trips():
    event = kafkasource_event(
        source="/apis/v1/namespaces/default/kafkasources/s",
        topic="images",
        partition=2,
        offset=9,
        timestamp_ms=1_700_000_000_000,
        key=b"b/k.jpg",
        value=b'{"Records": []}',
        headers={},
    )
    annotate(event, "http://sink/", 422, b"x" * 3000)
    message = kafka_binary(event, b"b/k.jpg")
    assert "content-type" not in message.headers and message.key == b"b/k.jpg"
    back = from_binary(
        KafkaMessage(message.headers, message.key, message.value), data_unmarshaller=lambda d: d
    )
    assert back["id"] == "partition:2/offset:9" and back.get_data() == b'{"Records": []}'
    assert back["knativeerrorcode"] == "422"
    assert base64.b64decode(back["knativeerrordata"]) == b"x" * 1024
    assert "datacontenttype" not in back.get_attributes()


def test_dead_letter_with_datacontenttype_uses_the_sdk():
    event = CloudEvent({"type": "t", "source": "/s", "datacontenttype": "application/json"}, b"{}")
    annotate(event, "http://sink/", None, b"")  # a network error: no code, no data
    message = kafka_binary(event, "k")
    assert message.headers["content-type"] == b"application/json"
    assert "ce_knativeerrorcode" not in message.headers
    assert message.headers["ce_knativeerrordest"] == b"http://sink/"


def test_retry_after_is_honoured_up_to_the_cap_on_429_and_503_only():
    from lensflow_eventing.delivery import parse_retry_after

    spec = DeliverySpec(retry=3, backoff_delay_s=0.1, retry_after_max_s=5.0)
    assert spec.pause_s(1, 503, "2") == 2.0  # longer than the 0.2 s backoff
    assert spec.pause_s(1, 429, "120") == 5.0  # capped
    assert spec.pause_s(1, 500, "2") == 0.2  # only 429 and 503
    assert spec.pause_s(3, 503, "0") == 0.8  # never shorter than the backoff
    assert DeliverySpec(retry=3, backoff_delay_s=0.1).pause_s(1, 503, "2") == 0.2  # no cap set
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert parse_retry_after("soon") is None


def test_a_503_with_retry_after_waits_as_asked():
    import threading
    import time

    from lensflow_eventing.delivery import deliver

    class Sink:
        url = "test://sink"
        calls: list[float] = []

        def post(self, headers, body, timeout_s):
            self.calls.append(time.monotonic())
            if len(self.calls) == 1:
                return 503, b"busy", {"Retry-After": "1"}
            return 200, b"ok", {}

    sink = Sink()
    spec = DeliverySpec(retry=2, backoff_delay_s=0.01, retry_after_max_s=3.0)
    result = deliver(sink, {}, b"", spec, threading.Event())
    assert result.delivered and result.attempts == 2
    assert sink.calls[1] - sink.calls[0] >= 0.95
