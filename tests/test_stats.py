import math

import pytest

from slp_runner.stats import percentile, summarize


def test_percentiles_match_linear_interpolation():
    xs = [15, 20, 35, 40, 50]
    assert percentile(xs, 0) == 15 and percentile(xs, 100) == 50
    assert percentile(xs, 50) == 35
    assert percentile(xs, 40) == pytest.approx(29.0)  # (5-1)*0.4 = 1.6 -> 20 + 0.6*15
    assert percentile(reversed(xs), 95) == pytest.approx(48.0)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_summary_of_known_data():
    s = summarize([2, 4, 4, 4, 5, 5, 7, 9])
    assert s["count"] == 8 and s["mean"] == 5
    assert s["stdev"] == pytest.approx(2.138, abs=1e-3)  # sample standard deviation
    assert (s["min"], s["max"]) == (2, 9)
    assert s["p50"] == 4.5


def test_edge_cases():
    assert summarize([]) == {"count": 0}
    assert summarize([3.0])["stdev"] == 0.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)
