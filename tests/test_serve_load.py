"""bench/serve_load.py's summary of several rounds (the measurement itself needs a quiet machine)."""

import math

from bench.serve_load import median_round


def _round(rps, p99, errors=0, statuses=None, refused_p99=float("nan")):
    return {
        "rps": rps,
        "p50": 0.1,
        "p95": 0.2,
        "p99": p99,
        "errors": errors,
        "cpu": [("x", float(rps))],
        "statuses": statuses or {"200": int(rps * 10)},
        "refused_p99": refused_p99,
    }


def test_the_median_round_keeps_the_typical_throughput_and_the_worst_tail():
    rounds = [
        _round(30.0, 0.5),
        _round(20.0, 0.9),
        _round(25.0, 0.6, errors=2, statuses={"200": 240, "503": 2}, refused_p99=0.3),
    ]
    summary = median_round(rounds)
    assert summary["rps"] == 25.0 and summary["cpu"] == [("x", 25.0)]  # the median round's own figures
    assert summary["p99"] == 0.9  # the worst round's tail
    assert summary["errors"] == 2 and summary["statuses"] == {"200": 740, "503": 2}
    assert summary["refused_p99"] == 0.3
    assert rounds[2]["p99"] == 0.6  # the rounds themselves are left as measured


def test_an_even_count_takes_the_lower_median_and_no_refusals_stay_nan():
    summary = median_round([_round(40.0, 0.4), _round(10.0, 0.3)])
    assert summary["rps"] == 10.0 and summary["p99"] == 0.4
    assert math.isnan(summary["refused_p99"])
