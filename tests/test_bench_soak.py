"""
The ``soak`` benchmark (``benchmarks.bench_soak``): a small soak against the real benchmark
receiver, its measures and samples in the JSON, and its figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted

from benchmarks._core import Config, Receiver, Result
from benchmarks.bench import bench, parse_args
from benchmarks.bench_plot import plot, soak_path, soak_rates
from benchmarks.bench_soak import (
    MB,
    Sample,
    Soak,
    SoakSeries,
    measures,
    run_soak,
    versus_throughput,
)

MEASURES = [
    "events/s",
    "db at 10%",
    "db at end",
    "db growth",
    "RSS at 10%",
    "RSS at end",
    "RSS growth",
    "deleted",
]


def config(tmp_path: Path, events: int) -> Config:
    return Config.sized(True, runs=1, postgres="", workdir=tmp_path, soak_events=events)


@pytest_twisted.ensureDeferred
async def test_housekeeping_deletes_while_the_producer_stays_within_its_backlog(
    reactor: Any, tmp_path: Path
) -> None:
    total, backlog = 20_000, 2_000
    settings = Soak(retention=0.2, interval=0.1, every=0.1, backlog=backlog)
    receiver = Receiver.start()
    try:
        run = await run_soak(reactor, config(tmp_path, total), receiver, 0, settings)
    finally:
        receiver.stop()
    assert [m.name for m in run.measures] == MEASURES
    values = {m.name: m.value for m in run.measures}
    assert isinstance(run.series, SoakSeries)
    samples = run.series.samples
    assert len(samples) >= 3
    assert samples[0].t < 0.1
    assert [s.t for s in samples] == sorted(s.t for s in samples)
    last = samples[-1]
    assert (last.ingested, last.delivered) == (total, total)
    # the producer never got more than the backlog ahead of delivery
    assert max(s.ingested - s.delivered for s in samples) <= backlog
    # housekeeping ran on the service and was counted (nothing is deleted without it)
    assert 0 < last.deleted <= total
    assert values["deleted"] == last.deleted
    assert last.db_bytes > 0
    assert values["db at end"] == pytest.approx(last.disk_bytes / MB)
    assert values["RSS at end"] == pytest.approx(last.rss_bytes / MB)
    assert values["events/s"] > 0
    assert sum(n for _, n in run.series.arrivals) == total
    data = json.loads(json.dumps(attrs.asdict(run.series)))
    assert data["samples"][-1]["delivered"] == total
    assert data["settings"]["backlog"] == backlog


def sample(t: float, disk_mb: float, rss_mb: float = 80.0, deleted: int = 0) -> Sample:
    return Sample(
        t=t,
        db_bytes=int(disk_mb * MB),
        wal_bytes=0,
        rss_bytes=int(rss_mb * MB),
        ingested=0,
        delivered=0,
        deleted=deleted,
    )


def test_growth_is_from_the_first_tenth_of_the_run_to_its_end() -> None:
    samples = [
        sample(0.0, 0.1),
        sample(1.0, 8.0),
        sample(2.0, 10.0, rss_mb=81.0),
        *(sample(float(t), 10.5) for t in range(3, 20)),
        sample(20.0, 11.0, rss_mb=82.0, deleted=1234),
    ]
    values = {m.name: m.value for m in measures(5_000.0, samples)}
    assert values == pytest.approx(
        {
            "events/s": 5_000.0,
            "db at 10%": 10.0,
            "db at end": 11.0,
            "db growth": 10.0,
            "RSS at 10%": 81.0,
            "RSS at end": 82.0,
            "RSS growth": 1.0,
            "deleted": 1234,
        }
    )


def test_a_run_shorter_than_a_sample_period_grows_by_nothing() -> None:
    values = {m.name: m.value for m in measures(1.0, [sample(0.0, 0.1), sample(0.4, 5.0)])}
    assert values["db at 10%"] == pytest.approx(5.0)
    assert values["db growth"] == 0.0


def test_soak_is_compared_to_throughput_sqlite_when_both_ran() -> None:
    soak = Result("soak", "events/s", "events/s", (18_000.0,))
    growth = Result("soak", "db growth", "%", (3.0,))
    sqlite = Result("throughput-sqlite", "events/s", "events/s", (20_000.0, 19_000.0, 21_000.0))
    assert versus_throughput([soak, growth, sqlite]) == pytest.approx(0.9)
    assert versus_throughput([soak, growth]) is None
    assert versus_throughput([sqlite]) is None


@pytest_twisted.ensureDeferred
async def test_the_quick_soak_from_the_command_line(
    reactor: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["soak", "throughput-sqlite", "--quick", "--events", "2000"]
    await bench(reactor, parse_args([*argv, "--json", str(out), "--plot", str(png)]))
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["config"]["soak_events"] == 2000
    soak = {r["measure"]: r for r in data["results"] if r["scenario"] == "soak"}
    assert list(soak) == MEASURES
    assert soak["events/s"]["ratio_to_raw"] is not None
    (sqlite,) = (r for r in data["results"] if r["scenario"] == "throughput-sqlite")
    versus = soak["events/s"]["median"] / sqlite["median"]
    assert data["soak_to_throughput_sqlite"] == pytest.approx(versus)
    assert f"soak events/s: {versus:.2f} x throughput-sqlite's" in printed
    assert "soak db growth" in printed
    series = data["series"]["soak"]
    assert series["settings"] == {
        "retention": 3.0,
        "interval": 1.0,
        "every": 1.0,
        "backlog": 10_000,
        "batch_size": None,
        "pace": None,
    }
    assert series["samples"][-1]["delivered"] == 2000
    assert set(series["samples"][0]) == {
        "t",
        "db_bytes",
        "wal_bytes",
        "rss_bytes",
        "ingested",
        "delivered",
        "deleted",
    }
    assert png.read_bytes().startswith(PNG)
    assert (tmp_path / "bench-soak.png").read_bytes().startswith(PNG)
    assert f"plotted: {tmp_path / 'bench-soak.png'}" in printed


# -- the figure --

PNG = b"\x89PNG\r\n\x1a\n"


def samples_of(seconds: int, rate: int) -> list[dict[str, Any]]:
    return [
        {
            "t": float(t),
            "db_bytes": min(t, 5) * 10 * MB,
            "wal_bytes": 4 * MB,
            "rss_bytes": 80 * MB,
            "ingested": t * rate,
            "delivered": t * rate,
            "deleted": max(0, t - 3) * rate,
        }
        for t in range(seconds + 1)
    ]


def report(samples: list[dict[str, Any]] | None) -> dict[str, Any]:
    soak: dict[str, Any] = {"arrivals": [[0.5, 100], [1.0, 100]], "latencies_ms": []}
    if samples is not None:
        soak["samples"] = samples
        soak["settings"] = {"retention": 3.0, "interval": 1.0, "every": 1.0, "backlog": None}
    return {"config": {"soak_events": 2_000_000, "runs": 1}, "series": {"soak": soak}}


@pytest.mark.parametrize(
    "samples",
    [samples_of(60, 30_000), samples_of(0, 0), samples_of(1, 100)],
    ids=["a-minute", "one-sample", "two-samples"],
)
def test_the_soak_has_a_figure_of_its_own(tmp_path: Path, samples: list[dict[str, Any]]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert plot(report(samples), str(path)) == [str(path), str(tmp_path / "bench-soak.png")]
    assert path.read_bytes().startswith(PNG)
    assert (tmp_path / "bench-soak.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("samples", [None, []], ids=["no-samples", "empty"])
def test_no_soak_figure_without_samples(
    tmp_path: Path, samples: list[dict[str, Any]] | None
) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert plot(report(samples), str(path)) == [str(path)]
    assert not (tmp_path / "bench-soak.png").exists()


def test_the_soak_figure_is_named_after_the_plot() -> None:
    assert soak_path("out/bench.png") == "out/bench-soak.png"
    assert soak_path("run.2.png") == "run.2-soak.png"


def test_rates_between_samples() -> None:
    samples = [
        {"t": 0.0, "delivered": 0},
        {"t": 1.0, "delivered": 100},
        {"t": 3.0, "delivered": 500},
    ]
    assert soak_rates(samples, "delivered") == ([0.0, 1.0, 3.0], [100.0, 200.0])
