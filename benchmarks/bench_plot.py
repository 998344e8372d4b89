"""
The ``--plot out.png`` of the benchmarks (``benchmarks.bench``): one PNG of a report.

:func:`plot` draws, from the JSON report of ``benchmarks.bench`` and its ``series``:

- throughput over time: events a second at the receiver against seconds since the start
  of the run, one line per scenario;
- the latency distribution: the share of events delivered within a time (an empirical
  CDF on a log scale), p50 and p99 marked, one line per scenario;
- the results: the median of every measure, its range over the runs, and its ratio to
  ``raw``.

When the report has a ``soak`` run's samples (:mod:`benchmarks.bench_soak`), it also draws
:func:`plot_soak` into ``<name>-soak.png`` beside it: the database's size on disk and the
memory over time, and the events ingested, delivered and deleted a second.

It needs matplotlib (``pip install -e '.[bench]'``), imported only when drawing; it draws
with the Agg backend, without touching pyplot or any display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: about this many bins over a run's throughput line, none shorter than MIN_BIN seconds
BINS = 100
MIN_BIN = 0.1
#: at most this many points of a latency CDF are drawn
CDF_POINTS = 2000


def plot(report: dict[str, Any], path: str) -> list[str]:
    """
    Draw ``report`` (with its ``series``) into the PNG file ``path``, and the soak's
    samples, if any, into :func:`soak_path`; the files written.
    """
    try:
        from matplotlib.backends.backend_agg import (
            FigureCanvasAgg,
        )
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install -e '.[bench]'") from None

    results: list[dict[str, Any]] = report.get("results") or []
    series: dict[str, dict[str, Any]] = report.get("series") or {}
    colors = {name: f"C{i % 10}" for i, name in enumerate(scenario_order(results, series))}
    table_height = 0.6 + 0.25 * max(1, len(results))
    figure = Figure(figsize=(11, 8.5 + table_height), layout="constrained")
    FigureCanvasAgg(figure)
    top, middle, bottom = figure.subplots(3, 1, height_ratios=[4, 4, table_height])
    figure.suptitle(title(report), fontsize=13)
    draw_throughput(top, series, colors)
    draw_latencies(middle, series, colors)
    draw_results(bottom, results)
    figure.savefig(path, format="png", dpi=100)
    samples = (series.get("soak") or {}).get("samples") or []
    if not samples:
        return [path]
    plot_soak(report, samples, soak_path(path))
    return [path, soak_path(path)]


def scenario_order(results: list[dict[str, Any]], series: dict[str, Any]) -> list[str]:
    """Every scenario, in the order of the results, then any others with a series."""
    return list(dict.fromkeys([*(str(r.get("scenario")) for r in results), *series]))


def title(report: dict[str, Any]) -> str:
    config = report.get("config") or {}
    machine = report.get("machine") or {}
    parts = ["delivery benchmarks"]
    if "runs" in config:
        parts.append(f"{config['runs']} run(s) per scenario, series of the last")
    if machine:
        parts.append(f"{machine.get('cpus', '?')} CPUs, {machine.get('processor', '?')}")
    return "; ".join(parts)


# -- throughput over time --


def bin_width(duration: float) -> float:
    """About ``duration / BINS`` seconds, rounded, so that whole bins fill ``duration``."""
    wanted = max(duration / BINS, MIN_BIN)
    scale = 10.0 ** math.floor(math.log10(wanted))
    nice = next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= wanted * 0.999)
    return duration / max(1, round(duration / nice))


def rates(arrivals: Sequence[Sequence[float]], width: float) -> tuple[list[float], list[float]]:
    """The bin edges and events a second of each bin, from ``[(t, events), ...]``."""
    end = max(t for t, _ in arrivals)
    bins = max(1, round(end / width))
    counts = [0.0] * bins
    for t, n in arrivals:
        counts[min(int(max(t, 0.0) / width), bins - 1)] += n
    return [i * width for i in range(bins + 1)], [c / width for c in counts]


def draw_throughput(ax: Axes, series: dict[str, dict[str, Any]], colors: dict[str, str]) -> None:
    ax.set_title("Throughput over time: events arriving at the receiver")
    ax.set_xlabel("seconds since the start of the run")
    ax.set_ylabel("events per second")
    drawn = False
    for name, data in series.items():
        arrivals = data.get("arrivals") or []
        if not arrivals:
            continue
        end = max(t for t, _ in arrivals)
        total = sum(n for _, n in arrivals)
        if end <= 0:
            continue  # everything at the start: no time to spread it over
        width = bin_width(end)
        edges, per_second = rates(arrivals, width)
        label = f"{name}: {total / end:,.0f}/s overall (bins of {width:.2g} s)"
        ax.stairs(per_second, edges, color=colors[name], linewidth=1.5, label=label)
        drawn = True
    if not drawn:
        nothing(ax, "no arrivals recorded")
        return
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:,.0f}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)


# -- latency distribution --


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted values (as ``statistics.quantiles``, inclusive)."""
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cdf_points(ordered: Sequence[float]) -> tuple[list[float], list[float]]:
    """At most CDF_POINTS points (value, share of values at most it) of sorted values."""
    n = len(ordered)
    step = max(1, n // CDF_POINTS)
    indexes = [*range(0, n, step), n - 1] if (n - 1) % step else list(range(0, n, step))
    return [ordered[i] for i in indexes], [(i + 1) / n for i in indexes]


def draw_latencies(ax: Axes, series: dict[str, dict[str, Any]], colors: dict[str, str]) -> None:
    ax.set_title("Latency: share of events delivered within a time (from submit to receiver)")
    ax.set_xlabel("milliseconds from submit to arrival (log scale)")
    ax.set_ylabel("share of events")
    drawn = False
    for name, data in series.items():
        latencies = data.get("latencies_ms") or []
        if not latencies:
            continue
        # a log axis shows no zero or less (clocks of two processes can tie, or be off by
        # a hair): those are drawn at the least latency above zero
        floor = min((ms for ms in latencies if ms > 0), default=0.001)
        ordered = sorted(max(ms, floor) for ms in latencies)
        xs, ys = cdf_points(ordered)
        color = colors[name]
        ax.step(
            xs,
            ys,
            where="post",
            color=color,
            linewidth=1.5,
            label=f"{name} ({len(ordered):,} events)",
        )
        for q in (50, 99):
            value = percentile(ordered, q)
            ax.plot([value], [q / 100], "o", color=color, markersize=5)
            ax.annotate(
                f"p{q} {value:,.1f} ms",
                (value, q / 100),
                xytext=(6, -12 if q == 50 else -14),
                textcoords="offset points",
                color=color,
                fontsize=9,
            )
        drawn = True
    if not drawn:
        nothing(ax, "no latencies recorded")
        return
    ax.set_xscale("log")
    # plain numbers on the time axis (1, 2, 5, 10...), not powers of ten
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_minor_formatter(lambda x, _: f"{x:g}" if _leading_digit(x) in (2, 5) else "")
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:.0%}")
    for share in (0.5, 0.99):
        ax.axhline(share, color="grey", linewidth=0.8, linestyle=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)


def _leading_digit(x: float) -> int:
    return round(x / 10 ** math.floor(math.log10(x))) if x > 0 else 0


# -- the results --


def number(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, (int, float)) else "-"


def draw_results(ax: Axes, results: list[dict[str, Any]]) -> None:
    ax.set_axis_off()
    ax.set_title("Results: the median of the runs")
    if not results:
        nothing(ax, "no results")
        return
    rows = [
        [
            str(r.get("scenario", "?")),
            str(r.get("measure", "")),
            number(r.get("median")),
            f"{number(r.get('min'))} - {number(r.get('max'))}",
            str(r.get("unit", "")),
            "" if r.get("ratio_to_raw") is None else f"{r['ratio_to_raw']:.2f}",
        ]
        for r in results
    ]
    table = ax.table(
        cellText=rows,
        colLabels=["scenario", "measure", "median", "min - max", "unit", "x raw"],
        colLoc="left",
        cellLoc="left",
        loc="upper center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(6)))
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(fontweight="bold")


def nothing(ax: Axes, text: str) -> None:
    """Say in the middle of ``ax`` that there is nothing to draw."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


# -- the soak --

#: the share of the soak's time after which its first readings are taken (as
#: ``benchmarks.bench_soak.WARM_UP``)
SOAK_WARM_UP = 0.1


def soak_path(path: str) -> str:
    """Where the soak's figure goes: ``bench.png`` -> ``bench-soak.png``."""
    where = Path(path)
    return str(where.with_name(f"{where.stem}-soak{where.suffix}"))


def soak_rates(samples: Sequence[dict[str, Any]], field: str) -> tuple[list[float], list[float]]:
    """The sample times and ``field`` a second between each two samples (stairs)."""
    edges = [float(s["t"]) for s in samples]
    per_second = [
        (b[field] - a[field]) / (b["t"] - a["t"]) if b["t"] > a["t"] else 0.0
        for a, b in pairwise(samples)
    ]
    return edges, per_second


def plot_soak(report: dict[str, Any], samples: Sequence[dict[str, Any]], path: str) -> None:
    """Draw the soak's samples into the PNG file ``path``: sizes and rates over time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1)
    figure.suptitle(soak_title(report), fontsize=13)
    draw_soak_sizes(top, samples)
    draw_soak_rates(bottom, samples)
    figure.savefig(path, format="png", dpi=100)


def soak_title(report: dict[str, Any]) -> str:
    events = (report.get("config") or {}).get("soak_events")
    parts = [f"delivery soak: {events:,} events" if isinstance(events, int) else "delivery soak"]
    settings = ((report.get("series") or {}).get("soak") or {}).get("settings") or {}
    if "retention" in settings:
        parts.append(f"retention {settings['retention']:g} s")
    if settings.get("backlog") is not None:
        parts.append(f"at most {settings['backlog']:,} ahead of delivery")
    return "; ".join([*parts, "the last run"])


def draw_soak_sizes(ax: Axes, samples: Sequence[dict[str, Any]]) -> None:
    ax.set_title("The database on disk (file and -wal) and this process's resident memory")
    ax.set_ylabel("MB")
    times = [s["t"] for s in samples]
    disk = [(s["db_bytes"] + s["wal_bytes"]) / 2**20 for s in samples]
    lines = [
        ("database and -wal", disk, "C0", 2.0),
        ("database file", [s["db_bytes"] / 2**20 for s in samples], "C0", 0.8),
        ("-wal", [s["wal_bytes"] / 2**20 for s in samples], "C2", 0.8),
        ("resident memory", [s["rss_bytes"] / 2**20 for s in samples], "C3", 1.5),
    ]
    for label, values, color, width in lines:
        style = ":" if width < 1 else "-"
        ax.plot(times, values, style, color=color, linewidth=width, label=label)
    end = times[-1]
    warm = next(i for i, t in enumerate(times) if t >= SOAK_WARM_UP * end)
    if disk[warm] > 0:
        growth = 100 * (disk[-1] - disk[warm]) / disk[warm]
        ax.axvline(times[warm], color="grey", linewidth=0.8, linestyle="--")
        ax.annotate(
            f"database: {disk[warm]:,.1f} MB after {SOAK_WARM_UP:.0%} of the run,"
            f" {disk[-1]:,.1f} MB at the end ({growth:+.1f} %)",
            (times[warm], disk[warm]),
            xytext=(6, 8),
            textcoords="offset points",
            fontsize=9,
        )
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)


def draw_soak_rates(ax: Axes, samples: Sequence[dict[str, Any]]) -> None:
    ax.set_title("Events a second: ingested, delivered, deleted by housekeeping")
    ax.set_xlabel("seconds since the first submit")
    ax.set_ylabel("events per second")
    if len(samples) < 2:
        nothing(ax, "one sample: no rates")
        return
    for field, color in (("ingested", "C1"), ("delivered", "C0"), ("deleted", "C4")):
        edges, per_second = soak_rates(samples, field)
        total = samples[-1][field]
        ax.stairs(per_second, edges, color=color, linewidth=1.5, label=f"{field} ({total:,})")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:,.0f}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
