"""Summary figures of measured values: one convention for the tool and the benchmarks.

Percentiles interpolate between the nearest ranks (``statistics.quantiles``' "inclusive"
method, numpy's default), so the 50th is the true median, never the upper one.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def percentile(values: Iterable[float], pct: int) -> float | None:
    """The ``pct``-th percentile (1..99) of ``values``; the value itself for a single one;
    None for none."""
    values = list(values)
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def rounded(value: float | None, digits: int = 3, scale: float = 1.0) -> float | None:
    """``value`` times ``scale`` (1000: seconds to ms), rounded to ``digits``; None stays
    None (a figure not measured)."""
    return None if value is None else round(value * scale, digits)
