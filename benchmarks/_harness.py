"""Rounds, statistics, the results table and the JSON file.

A *scenario* pairs a happen measurement with a baseline measurement (raw anyio, raw nats-py or
FastStream). Each measurement is an async function run once per round in a fresh event loop
(``anyio.run``); rounds of the two sides are interleaved so drift affects both alike. A side that
cannot run (happen's core not there yet, FastStream not installed) or fails is reported in the
table with its reason instead of stopping the run.
"""

from __future__ import annotations

import faulthandler
import json
import math
import statistics
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

#: ~100 bytes once encoded (118 bytes of msgpack, 140 of JSON); used by every scenario.
PAYLOAD: dict[str, Any] = {
    "id": 123456,
    "user": "alice@example.com",
    "items": [1, 2, 3, 5, 8],
    "amount": 99.95,
    "currency": "EUR",
    "note": "a benchmark payload of about 100 bytes",
}

IN_FLIGHT = 100
LOOPS = ("asyncio", "uvloop", "trio")
NATS_LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class Config:
    """What every measurement gets: how long to measure and where the nats-server is."""

    duration: float
    rounds: int
    nats_url: str | None = None
    loop: str = "asyncio"


@dataclass
class Sample:
    """One round's figure (e.g. ops/s), and facts worth printing beside it."""

    value: float
    notes: dict[str, Any] = field(default_factory=dict)


Measure = Callable[[Config], Awaitable[Sample]]


class Unavailable(Exception):
    """This side cannot run here (a missing module); the reason is printed, not a traceback."""


class RoundHung(Exception):
    """A round did not finish within :func:`round_limit` and was cancelled."""


@dataclass
class Side:
    """One side of a scenario: a name for the table and the function measuring one round."""

    name: str
    measure: Measure | None


@dataclass
class Scenario:
    """A row (per loop) of the table."""

    key: str
    title: str
    unit: str
    happen: Side
    baseline: Side | None
    target: float | None  # happen / baseline must be >= target
    loops: Sequence[str] = LOOPS
    #: Reuse the happen figure of this scenario (same loop) when it was measured in this run.
    reuse_happen: str | None = None
    #: Builds the table rows from the figures; the default compares happen with the baseline.
    report: Callable[[Scenario, str, Figure, Figure | None], list[Row]] | None = None


@dataclass
class Figure:
    """The median, min and max of a side's rounds, or why there are none."""

    median: float | None = None
    min: float | None = None
    max: float | None = None
    rounds: list[float] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    warning: str | None = None

    @classmethod
    def of(cls, samples: list[Sample]) -> Figure:
        values = [s.value for s in samples]
        return cls(
            median=statistics.median(values),
            min=min(values),
            max=max(values),
            rounds=values,
            notes=[s.notes for s in samples],
        )


@dataclass
class Row:
    scenario: str
    title: str
    loop: str
    unit: str
    happen_side: str
    baseline_side: str | None
    happen: Figure
    baseline: Figure | None
    ratio: float | None
    target: str
    met: bool | None
    note: str = ""


@dataclass
class Problem:
    scenario: str
    loop: str
    side: str
    error: str
    traceback: str


def round_limit(config: Config) -> float:
    """A round that takes this long is treated as hung (and cancelled)."""
    return 30 + 10 * config.duration


def run_round(measure: Measure, config: Config) -> Sample:
    """Run one measurement in a fresh event loop of the given kind."""

    async def guarded() -> Sample:
        with anyio.move_on_after(round_limit(config)) as scope:
            return await measure(config)
        assert scope.cancelled_caught
        raise RoundHung(f"no result within {round_limit(config):.0f} s")

    # Last resort if a cancelled round does not unwind: dump every thread's stack and exit.
    faulthandler.dump_traceback_later(round_limit(config) + 30, exit=True)
    try:
        if config.loop == "trio":
            return anyio.run(guarded, backend="trio")
        options = {"use_uvloop": config.loop == "uvloop"}
        return anyio.run(guarded, backend="asyncio", backend_options=options)
    finally:
        faulthandler.cancel_dump_traceback_later()


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        more = f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else ""
        return describe(leaves[0]) + more
    if isinstance(exc, Unavailable):
        return f"unavailable: {exc}"
    if isinstance(exc, RoundHung):
        return f"hung: {exc}"
    return f"error: {type(exc).__name__}: {exc}"


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def measure_sides(
    scenario: Scenario,
    sides: list[Side],
    config: Config,
    problems: list[Problem],
    progress: Callable[[str], None],
) -> list[Figure]:
    """Interleave the rounds of ``sides``.

    A side that is unavailable or hangs is not tried again; a round that fails is reported (its
    first traceback kept) and the side's figure comes from the rounds that succeeded.
    """
    samples: list[list[Sample]] = [[] for _ in sides]
    stopped: list[str | None] = [None] * len(sides)
    failures: list[list[str]] = [[] for _ in sides]
    for index in range(config.rounds):
        for i, side in enumerate(sides):
            if stopped[i] is not None:
                continue
            if side.measure is None:
                stopped[i] = "unavailable"
                continue
            where = f"  {scenario.key:<24} {config.loop:<8} {side.name:<10}"
            try:
                sample = run_round(side.measure, config)
            except Exception as exc:
                error = describe(exc)
                progress(f"{where} round {index + 1}: {error}")
                if isinstance(exc, Unavailable | RoundHung):
                    stopped[i] = error
                if not isinstance(exc, Unavailable) and error not in failures[i]:
                    problems.append(_problem(scenario, config.loop, side, error, exc))
                failures[i].append(error)
            else:
                samples[i].append(sample)
                progress(f"{where} round {index + 1}: {fmt(sample.value)} {scenario.unit}")
    figures = []
    for done, failed in zip(samples, failures, strict=True):
        if not done:
            figures.append(Figure(error=failed[0] if failed else "unavailable"))
            continue
        figure = Figure.of(done)
        if failed:
            figure.warning = f"{len(failed)} round(s) failed ({failed[0]})"
        figures.append(figure)
    return figures


def _problem(scenario: Scenario, loop: str, side: Side, error: str, exc: BaseException) -> Problem:
    tb = "".join(traceback.format_exception(exc))
    return Problem(scenario.key, loop, side.name, error, tb)


def run_scenario(
    scenario: Scenario,
    config: Config,
    loops: Sequence[str],
    measured: dict[tuple[str, str], Figure],
    problems: list[Problem],
    progress: Callable[[str], None],
) -> list[Row]:
    """Measure ``scenario`` on each of ``loops`` it supports; ``measured`` caches happen figures."""
    rows = []
    for loop in [lp for lp in loops if lp in scenario.loops]:
        reused = measured.get((scenario.reuse_happen or "", loop))
        sides = ([] if reused else [scenario.happen]) + (
            [scenario.baseline] if scenario.baseline else []
        )
        figures = measure_sides(scenario, sides, replace(config, loop=loop), problems, progress)
        happen = reused or figures.pop(0)
        baseline = figures[0] if scenario.baseline else None
        measured[(scenario.key, loop)] = happen
        report = scenario.report or compare
        rows.extend(report(scenario, loop, happen, baseline))
    return rows


def compare(scenario: Scenario, loop: str, happen: Figure, baseline: Figure | None) -> list[Row]:
    """The default row: happen's median over the baseline's median, against the target."""
    ratio = None
    met = None
    target = "—"
    if happen.median is not None and baseline is not None and baseline.median:
        ratio = happen.median / baseline.median  # (printed with no target too: a calibration)
    if scenario.target is not None:
        target = f"≥ {scenario.target:g}"
        if ratio is not None:
            met = ratio >= scenario.target
    return [make_row(scenario, loop, happen, baseline, ratio=ratio, target=target, met=met)]


def make_row(
    scenario: Scenario,
    loop: str,
    happen: Figure,
    baseline: Figure | None,
    *,
    ratio: float | None,
    target: str,
    met: bool | None,
    note: str = "",
    suffix: str = "",
    unit: str | None = None,
) -> Row:
    baseline_name = scenario.baseline.name if scenario.baseline else "baseline"
    errors = [
        f"{name}: {text}"
        for name, f in ((scenario.happen.name, happen), (baseline_name, baseline))
        if f is not None
        for text in (f.error, f.warning)
        if text
    ]
    summaries = [str(n["summary"]) for n in happen.notes if n.get("summary")]
    if baseline is not None:
        summaries += [str(n["summary"]) for n in baseline.notes if n.get("summary")]
    return Row(
        scenario=scenario.key + suffix,
        title=scenario.title,
        loop=loop,
        unit=unit or scenario.unit,
        happen_side=scenario.happen.name,
        baseline_side=scenario.baseline.name if scenario.baseline else None,
        happen=happen,
        baseline=baseline,
        ratio=ratio,
        target=target,
        met=met,
        note="; ".join([*errors, *dict.fromkeys(summaries), *([note] if note else [])]),
    )


# --- output -----------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.2f}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.1f}k"
    if magnitude >= 1e3:
        return f"{value / 1e3:.2f}k"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def fmt_figure(figure: Figure | None) -> str:
    if figure is None:
        return "—"
    if figure.median is None:
        return (figure.error or "—").split(":")[0]
    if len(figure.rounds) == 1:
        return fmt(figure.median)
    return f"{fmt(figure.median)} [{fmt(figure.min)}-{fmt(figure.max)}]"


def table(rows: list[Row]) -> str:
    header = ["scenario", "unit", "loop", "happen", "vs", "baseline", "ratio", "target", "met"]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row.scenario,
                row.unit,
                row.loop,
                fmt_figure(row.happen),
                row.baseline_side or "—",
                fmt_figure(row.baseline),
                "—" if row.ratio is None else f"{row.ratio:.2f}",
                row.target,
                {True: "yes", False: "NO", None: "—"}[row.met],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    # One line per distinct note, naming the rows it applies to.
    where: dict[str, list[str]] = {}
    for row in rows:
        if row.note:
            where.setdefault(row.note, []).append(f"{row.scenario}/{row.loop}")
    if where:
        out.append("")
        out.append("notes:")
        for note, places in where.items():
            at = ", ".join(places) if len(places) <= 3 else f"{len(places)} rows"
            out.append(f"  {note}  [{at}]")
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], problems: list[Problem]) -> None:
    document = {
        "meta": meta,
        "rows": [asdict(row) for row in rows],
        "problems": [asdict(p) for p in problems],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def print_problems(problems: list[Problem]) -> None:
    if not problems:
        return
    print("\nproblems (first traceback of each):", file=sys.stderr)
    for p in problems:
        print(f"\n--- {p.scenario} / {p.loop} / {p.side}: {p.error}", file=sys.stderr)
        print(p.traceback.rstrip(), file=sys.stderr)
