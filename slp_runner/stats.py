"""Summary statistics for latencies and throughputs.

Percentiles use linear interpolation between closest ranks (numpy's default
``linear`` method, R type 7): p = x[(n - 1) * q] with fractional indices
interpolated. The standard deviation is the sample one (n - 1).
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict[str, float]:
    """count, mean, stdev, min, p5, p50, p95, p99, max."""
    xs = list(values)
    if not xs:
        return {"count": 0}
    return {
        "count": len(xs),
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "p5": percentile(xs, 5),  # the low end of the p5-p95 band the sweep plot draws
        "p50": percentile(xs, 50),
        "p95": percentile(xs, 95),
        "p99": percentile(xs, 99),
        "max": max(xs),
    }
