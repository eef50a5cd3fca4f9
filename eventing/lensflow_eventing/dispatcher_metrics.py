"""The local dispatcher's Prometheus metrics, read from ``Dispatcher.stats()`` at scrape time.

A collector rather than counters incremented in the loop: the dispatcher already keeps
its counts (under a lock, for ``stats()``), so a scrape reads them and the hot path
stays as it is. Register it on a registry (``dispatcher_registry``) and serve that with
``serve_metrics`` (``lensflow dispatch --metrics-port``) or the dashboard (``lensflow up``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

COUNTERS = (
    ("delivered", "lensflow_dispatcher_delivered", "Events the sink took (2xx)"),
    (
        "retried",
        "lensflow_dispatcher_retries",
        "Delivery attempts retried (5xx, 404, 408, 409, 429, network)",
    ),
    (
        "dead_lettered",
        "lensflow_dispatcher_dead_lettered",
        "Events written to the dead-letter topic",
    ),
    (
        "failed",
        "lensflow_dispatcher_held_back",
        "Events neither delivered nor dead-lettered (their commit is held)",
    ),
)


class DispatcherCollector(Collector):
    """Metrics of whatever ``stats()`` returns now (a dispatcher's, or None when none runs)."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None], topic: str):
        self._stats = stats
        self._topic = topic

    def collect(self):
        stats = self._stats() or {}
        for key, name, documentation in COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=["topic"])
            family.add_metric([self._topic], float(stats.get(key) or 0))
            yield family
        in_flight = GaugeMetricFamily(
            "lensflow_dispatcher_in_flight", "Events being delivered now", labels=["topic"]
        )
        in_flight.add_metric([self._topic], float(stats.get("in_flight") or 0))
        yield in_flight
        buffered = GaugeMetricFamily(
            "lensflow_dispatcher_buffered", "Records fetched, waiting for a slot", labels=["topic"]
        )
        buffered.add_metric([self._topic], float(stats.get("buffered") or 0))
        yield buffered
        lag = GaugeMetricFamily(
            "lensflow_dispatcher_lag_records",
            "Records behind the end of the partition (not yet committed)",
            labels=["topic", "partition"],
        )
        for partition, behind in sorted((stats.get("lag_by_partition") or {}).items()):
            lag.add_metric([self._topic, str(partition)], float(behind))
        yield lag


def dispatcher_registry(
    stats: Callable[[], dict[str, Any] | None], topic: str
) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DispatcherCollector(stats, topic))
    return registry


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """Serve ``registry`` on http://host:port/metrics in a daemon thread; the server."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
