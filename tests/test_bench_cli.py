"""The benchmark's command line: mistakes are found before any benchmark runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery.bench import parse_args


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


def test_a_writable_folder_is_accepted(tmp_path: Path) -> None:
    options = parse_args(["--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert (options.json, options.plot) == (str(tmp_path / "r.json"), str(tmp_path / "p.png"))
