"""How one event is delivered to a sink: Knative's delivery spec, retries and backoff.

The rules are Knative's (docs/contract.md, "Events"): 2xx is delivered; 5xx, 404, 408, 409,
429, a network error or a timeout is retried after ``backoff_delay * 2^n`` (exponential)
or ``backoff_delay * n`` (linear) before retry n = 1..retry; any other status of 300 or
more is final at once and the event goes to the dead-letter topic. Redirects are not
followed: a sink that redirects is misconfigured, and saying so beats guessing.

``Retry-After`` on a 429 or 503 is honoured as Knative does when the delivery spec sets
``retryAfterMax``: the pause before the next retry is the larger of the backoff and the
header's delay, capped at ``retryAfterMax``; without it the header is ignored.

A *sink* is anything with ``post(headers, body, timeout_s) -> (status, body)`` (or
``(status, body, response_headers)``, which lets ``Retry-After`` through) and a
``url`` naming it (used as ``knativeerrordest``). ``HttpSink`` posts over HTTP with a
``requests.Session`` per thread; a local replica pool (scale-to-zero stand-in) can be a
sink too, by starting a replica inside ``post`` when none is running, as Knative's
activator holds a request while a pod starts. ``post`` raises on a network error.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Protocol, runtime_checkable

import requests
from requests.adapters import HTTPAdapter

RETRYABLE_STATUSES = frozenset({404, 408, 409, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})
# A 503 whose JSON says ``{"waiting": REASON}`` (the predict function before any model
# exists) means "not yet", not "this event failed": the event is held and tried again
# without spending its retries, for at most MAX_WAITING_S, polling every few seconds.
# Knative's KafkaSource does not know this and simply retries the 503 per its spec.
WAITING_KEY = "waiting"
MAX_WAITING_S = 600.0
MAX_WAIT_INTERVAL_S = 5.0


@runtime_checkable
class Sink(Protocol):
    """Where events go. ``url`` names it in dead letters."""

    @property
    def url(self) -> str: ...

    def post(
        self, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]: ...


class HttpSink:
    """POST to a URL, or to whatever URL ``resolve()`` says at the time of each attempt.

    The resolver form lets a sink move (a replica restarted on another port) without
    restarting the dispatcher.
    """

    def __init__(self, target: str | Callable[[], str], pool_size: int = 16):
        self._resolve = target if callable(target) else (lambda: target)
        self._pool_size = pool_size
        self._local = threading.local()

    @property
    def url(self) -> str:
        return self._resolve()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def post(
        self, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        reply = self._session().post(
            self._resolve(),
            headers=dict(headers),
            data=body,
            timeout=timeout_s,
            allow_redirects=False,
        )
        return reply.status_code, reply.content, reply.headers


def as_sink(target: str | Callable[[], str] | Sink, pool_size: int = 16) -> Sink:
    if isinstance(target, Sink):
        return target
    return HttpSink(target, pool_size)


@dataclass(frozen=True)
class DeliverySpec:
    """A KafkaSource's ``spec.delivery``; the defaults are Knative's when it is omitted."""

    retry: int = 10
    backoff_policy: str = "exponential"
    backoff_delay_s: float = 0.3
    timeout_s: float = 600.0
    retry_after_max_s: float | None = None  # None: Retry-After is ignored (Knative's default)

    def __post_init__(self) -> None:
        if self.backoff_policy not in ("exponential", "linear"):
            raise ValueError(
                f"backoff policy must be exponential or linear, not {self.backoff_policy!r}"
            )
        if self.retry < 0 or self.backoff_delay_s < 0 or self.timeout_s <= 0:
            raise ValueError("retry and backoff delay must be >= 0, timeout > 0")

    def delay_s(self, retry_number: int) -> float:
        """Pause before retry ``retry_number`` (1 for the first retry)."""
        if self.backoff_policy == "exponential":
            return self.backoff_delay_s * 2**retry_number
        return self.backoff_delay_s * retry_number

    @property
    def backoff_budget_s(self) -> float:
        """Seconds of backoff in all before an event is dead-lettered (attempt time not
        counted): retry 10, exponential, PT0.3S is 0.3 x (2 + 4 + ... + 1024) = 613.8 s."""
        return sum(self.delay_s(n) for n in range(1, self.retry + 1))

    def pause_s(self, retry_number: int, status: int | None, retry_after: str | None) -> float:
        """The pause before retry ``retry_number``: the backoff, or a longer
        ``Retry-After`` (on 429/503, up to ``retry_after_max_s``) when that is set."""
        delay = self.delay_s(retry_number)
        if self.retry_after_max_s is None or status not in RETRY_AFTER_STATUSES:
            return delay
        asked = parse_retry_after(retry_after)
        if asked is None:
            return delay
        return max(delay, min(asked, self.retry_after_max_s))

    @classmethod
    def from_knative(cls, delivery: Mapping[str, object] | None) -> DeliverySpec:
        """From a manifest's ``delivery`` block: omitted means Knative's defaults, but a
        block without ``retry`` means zero retries, as Knative does."""
        if delivery is None:
            return cls()
        return cls(
            retry=int(delivery.get("retry", 0)),  # type: ignore[arg-type]
            backoff_policy=str(delivery.get("backoffPolicy", "exponential")),
            backoff_delay_s=parse_duration(str(delivery.get("backoffDelay", "PT0.3S"))),
            timeout_s=parse_duration(str(delivery.get("timeout", "PT600S"))),
            retry_after_max_s=(
                parse_duration(str(delivery["retryAfterMax"]))
                if delivery.get("retryAfterMax")
                else None
            ),
        )


_DURATION = re.compile(r"^PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?$")


def parse_duration(text: str) -> float:
    """Seconds in an ISO-8601 time duration such as ``PT0.3S`` or ``PT10M``."""
    match = _DURATION.match(text.strip().upper())
    if not match or not any(match.groups()):
        raise ValueError(f"not an ISO-8601 duration like PT0.3S: {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def retryable(status: int | None) -> bool:
    """``None`` stands for a network error or timeout: retried, as Knative does."""
    return status is None or status >= 500 or status in RETRYABLE_STATUSES


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    status: int | None  # the last response's status; None after a network error
    body: bytes  # the last response's body
    attempts: int
    error: str | None = None  # the last network error
    aborted: bool = False  # stopped during a backoff: neither delivered nor dead-lettered

    @property
    def retries(self) -> int:
        return max(self.attempts - 1, 0)


def waiting_reason(status: int | None, reply: bytes) -> str | None:
    """The sink's reason to hold events (a 503 with ``{"waiting": ...}``), or None."""
    if status != 503 or not reply or len(reply) > 4096:
        return None
    try:
        data = json.loads(reply)
    except ValueError:
        return None
    value = data.get(WAITING_KEY) if isinstance(data, dict) else None
    return str(value) if value else None


def deliver(
    sink: Sink,
    headers: Mapping[str, str],
    body: bytes,
    spec: DeliverySpec,
    stopping: threading.Event | None = None,
    on_retry: Callable[[int, int | None], None] | None = None,
    max_waiting_s: float = MAX_WAITING_S,
) -> DeliveryResult:
    """Post until delivered, final, or out of retries. ``stopping`` cuts a backoff short.
    While the sink says it is waiting (``waiting_reason``), attempts do not count, for at
    most ``max_waiting_s``."""
    attempt = 0
    waited = 0.0
    interval = max(spec.backoff_delay_s, 0.1)
    while True:
        attempt += 1
        status: int | None = None
        reply = b""
        error: str | None = None
        retry_after: str | None = None
        try:
            answer = sink.post(headers, body, spec.timeout_s)
            status, reply = answer[0], answer[1]
            if len(answer) > 2 and answer[2] is not None:
                retry_after = answer[2].get("Retry-After")
        except Exception as exc:  # any failure to talk to the sink is "network"
            error = f"{type(exc).__name__}: {exc}"
        if status is not None and 200 <= status < 300:
            return DeliveryResult(True, status, reply, attempt)
        if waited < max_waiting_s and waiting_reason(status, reply) is not None:
            attempt -= 1  # the sink is not ready for anyone: this one does not count
            if stopping is not None and stopping.wait(interval):
                return DeliveryResult(False, status, reply, attempt, error, aborted=True)
            if stopping is None:
                time.sleep(interval)
            waited += interval
            interval = min(interval * 2, MAX_WAIT_INTERVAL_S)
            continue
        if not retryable(status) or attempt > spec.retry:
            return DeliveryResult(False, status, reply, attempt, error)
        if on_retry is not None:
            on_retry(attempt, status)
        delay = spec.pause_s(attempt, status, retry_after)
        if stopping is not None:
            if stopping.wait(delay):
                return DeliveryResult(False, status, reply, attempt, error, aborted=True)
        else:
            time.sleep(delay)
