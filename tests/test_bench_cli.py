"""The benchmark's command line and table: mistakes are found before any benchmark runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._core import Config, Result
from benchmarks.bench import parse_args, ratio, table


def test_results_go_to_bench_json_unless_told() -> None:
    assert parse_args([]).json == "bench.json"
    assert parse_args(["--json", "out.json", "raw"]).json == "out.json"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["raw", "throughput-nowhere"], "unknown scenarios: throughput-nowhere"),
        (["--json", "/no/such/folder/x.json"], "--json /no/such/folder/x.json: cannot write"),
        (["--plot", "/no/such/folder/x.png"], "--plot /no/such/folder/x.png: cannot write"),
    ],
)
def test_mistakes_are_named_at_once(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_soak_is_a_scenario_of_millions_and_small_when_quick() -> None:
    assert parse_args(["soak"]).scenarios == ["soak"]
    common = {"runs": 1, "postgres": "", "workdir": Path(".")}
    assert Config.sized(False, **common).soak_events == 2_000_000
    assert Config.sized(True, **common).soak_events == 60_000
    assert Config.sized(True, soak_events=500, **common).soak_events == 500


def test_a_writable_folder_is_accepted(tmp_path: Path) -> None:
    options = parse_args(["--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert (options.json, options.plot) == (str(tmp_path / "r.json"), str(tmp_path / "p.png"))


def test_every_rate_has_its_ratio_to_raw_and_nothing_else_has_one() -> None:
    raw = Result("raw", "events/s", "events/s", (40_000.0, 42_000.0, 41_000.0))
    results = [
        raw,
        Result("throughput-sqlite", "events/s", "events/s", (20_500.0,)),
        Result("fanout", "deliveries/s", "deliveries/s", (82_000.0,)),
        Result("latency", "p99", "ms", (3.0,)),
        Result("backlog-memory", "peak RSS", "MB", (67.0,)),
    ]
    assert [ratio(r, raw) for r in results] == [1.0, 0.5, 2.0, None, None]
    rows = table(results, raw).splitlines()
    assert rows[0].split()[-2:] == ["x", "raw"]
    assert [row.split()[-1] for row in rows[1:]] == ["1.00", "0.50", "2.00", "ms", "MB"]
