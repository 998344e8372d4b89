"""The ``--plot`` of the benchmarks (``benchmarks.bench_plot``), on synthetic reports."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_plot import bin_width, percentile, plot, rates


def result(scenario: str, measure: str, unit: str, values: list[float]) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "measure": measure,
        "unit": unit,
        "values": values,
        "median": sorted(values)[len(values) // 2],
        "min": min(values),
        "max": max(values),
        "ratio_to_raw": None if unit == "ms" else values[0] / 50_000,
    }


def arrivals(rate: float, seconds: float, batch: int = 100) -> list[list[float]]:
    return [[i * batch / rate, batch] for i in range(1, int(rate * seconds / batch) + 1)]


RANDOM = random.Random(1)

REPORT: dict[str, Any] = {
    "config": {"events": 20_000, "runs": 1},
    "machine": {"cpus": 2, "processor": "test"},
    "results": [
        result("raw", "events/s", "events/s", [50_000.0]),
        result("ingest-http", "events/s", "events/s", [6_000.0]),
        result("latency", "p50", "ms", [5.5]),
        result("latency", "p99", "ms", [22.0]),
        result("recovery", "first after up", "s", [5.1]),
    ],
    "series": {
        "raw": {"arrivals": arrivals(50_000, 0.4), "latencies_ms": []},
        "ingest-http": {
            "arrivals": arrivals(6_000, 3),
            "latencies_ms": [RANDOM.lognormvariate(3.4, 0.5) for _ in range(5_000)],
        },
        "latency": {
            "arrivals": arrivals(1_000, 2, batch=10),
            "latencies_ms": [0.0, -0.1, *(RANDOM.lognormvariate(1.7, 0.6) for _ in range(2_000))],
        },
        "recovery": {},
    },
}


def is_png(path: Path) -> bool:
    return path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_draws_a_report_into_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    plot(REPORT, str(path))
    assert is_png(path)


@pytest.mark.parametrize(
    "report",
    [
        {},
        {"results": REPORT["results"]},
        {"results": [], "series": {"raw": {"arrivals": [], "latencies_ms": []}}},
        {"series": {"one": {"arrivals": [[0.0, 100]], "latencies_ms": [3.0]}}},
        {"series": {"late": {"arrivals": [[2.5, 100], [2.6, 100]]}}},
    ],
    ids=["empty", "no-series", "empty-series", "one-point", "no-latencies"],
)
def test_draws_whatever_is_missing(tmp_path: Path, report: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    plot(report, str(path))
    assert is_png(path)


def test_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[bench\]'"):
        plot(REPORT, str(tmp_path / "bench.png"))
    assert not (tmp_path / "bench.png").exists()


def test_bins_fill_the_run_and_keep_every_event() -> None:
    width = bin_width(33.0)
    assert 0.3 <= width <= 0.5
    assert 33.0 / width == pytest.approx(round(33.0 / width))
    edges, per_second = rates(arrivals(6_000, 33), width)
    assert edges[-1] == pytest.approx(33.0)
    assert sum(r * width for r in per_second) == pytest.approx(6_000 * 33)
    assert bin_width(0.5) == pytest.approx(0.1)


def test_percentiles_as_the_benchmark_computes_them() -> None:
    import statistics

    values = sorted(RANDOM.random() for _ in range(1_001))
    for q in (50, 99):
        expected = statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        assert percentile(values, q) == pytest.approx(expected)
