"""From measurements to what a person reads: summaries, ratios, targets; Markdown and JSON.

Everything here is plain values in, plain values out (no processes, no I/O but the final
writes), so it can be checked by reading.

Ratios are taken per repetition, between two measurements of the same run made next to
each other, then summarised as the median and the min-max range over repetitions; a
figure from one run is never divided by a figure from another.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from bench.ceiling import CycleCost
from bench.contenders import OURS, PEERS
from bench.scenarios import Scenario
from bench.stats import Spread

OK, FAILED, NA = "ok", "FAILED", "n/a"

#: Metrics shown in the table, with their column titles.
COLUMNS = (
    ("rate", "rate"),
    ("mib_s", "MiB/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("cpu", "CPU (cores)"),
    ("peak_rss_mib", "peak RSS MiB"),
)


@attrs.frozen
class Measurement:
    scenario: str
    contender: str
    rep: int
    status: str
    reason: str = ""
    metrics: dict[str, float] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Cell:
    """One contender in one scenario, over all repetitions."""

    status: str
    reason: str
    metrics: dict[str, Spread]


def summarise(measurements: Sequence[Measurement]) -> dict[str, dict[str, Cell]]:
    """``{scenario: {contender: Cell}}``; a single failed repetition fails the cell."""
    grouped: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        grouped.setdefault((m.scenario, m.contender), []).append(m)
    out: dict[str, dict[str, Cell]] = {}
    for (scenario, contender), ms in grouped.items():
        failed = [m for m in ms if m.status == FAILED]
        na = [m for m in ms if m.status == NA]
        if failed:
            cell = Cell(FAILED, f"{len(failed)}/{len(ms)} reps: {failed[0].reason}", {})
        elif na:
            cell = Cell(NA, na[0].reason, {})
        else:
            keys = sorted({k for m in ms for k in m.metrics})
            metrics = {}
            for key in keys:
                spread = Spread.of([m.metrics[key] for m in ms if key in m.metrics])
                if spread is not None:
                    metrics[key] = spread
            cell = Cell(OK, "", metrics)
        out.setdefault(scenario, {})[contender] = cell
    return out


def _by_rep(measurements: Iterable[Measurement], scenario: str, contender: str) -> dict[int, Any]:
    return {
        m.rep: m.metrics
        for m in measurements
        if m.scenario == scenario and m.contender == contender and m.status == OK
    }


@attrs.frozen
class Ratio:
    scenario: str
    metric: str
    higher_is_better: bool
    ours: str
    other: str
    spread: Spread

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "ratio": f"{self.ours} / {self.other}",
            **self.spread.to_json(),
        }


def ceiling_by_rep(ceilings: Sequence[Sequence[CycleCost]]) -> dict[str, dict[int, float]]:
    """``{implementation: {rep: ceiling req/s}}``."""
    out: dict[str, dict[int, float]] = {}
    for rep, costs in enumerate(ceilings):
        for cost in costs:
            if cost.ceiling_req_s is not None:
                out.setdefault(cost.name, {})[rep] = cost.ceiling_req_s
    return out


#: Which ceiling each of ours is held against: (contender, implementation).
CEILING_PAIRS = (
    ("trioproxy-h11", "h11"),
    ("trioproxy-h11", "seam-h11"),
    ("trioproxy", "httptools"),
    ("trioproxy", "seam-httptools"),
)


def ratios(
    measurements: Sequence[Measurement],
    scenarios: Sequence[Scenario],
    ceilings: Sequence[Sequence[CycleCost]],
) -> list[Ratio]:
    present = {m.contender for m in measurements}
    ceiling = ceiling_by_rep(ceilings)
    out = []
    for scenario in scenarios:
        for ours in (c for c in OURS if c in present):
            mine = _by_rep(measurements, scenario.name, ours)
            others = [c for c in (*PEERS, *OURS) if c in present and c != ours]
            for other in others:
                theirs = _by_rep(measurements, scenario.name, other)
                for metric, higher in scenario.compared:
                    values = [
                        mine[rep][metric] / theirs[rep][metric]
                        for rep in mine.keys() & theirs.keys()
                        if metric in mine[rep] and theirs[rep].get(metric)
                    ]
                    spread = Spread.of(values)
                    if spread is not None:
                        out.append(Ratio(scenario.name, metric, higher, ours, other, spread))
        if scenario.rate != "req_s":
            continue
        for ours, impl in CEILING_PAIRS:
            mine = _by_rep(measurements, scenario.name, ours)
            values = [
                mine[rep]["req_s"] / ceiling[impl][rep]
                for rep in mine.keys() & ceiling.get(impl, {}).keys()
            ]
            spread = Spread.of(values)
            if spread is not None:
                out.append(Ratio(scenario.name, "req_s", True, ours, f"ceiling({impl})", spread))
    return out


@attrs.frozen
class Target:
    text: str
    measured: str
    passed: bool | None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _find(rs: Sequence[Ratio], scenario: str, metric: str, ours: str, other: str) -> Ratio | None:
    return next(
        (
            r
            for r in rs
            if (r.scenario, r.metric, r.ours, r.other) == (scenario, metric, ours, other)
        ),
        None,
    )


def targets(
    summary: dict[str, dict[str, Cell]], rs: Sequence[Ratio], scenario_names: set[str]
) -> list[Target]:
    """The goals the team set, each with the value measured now (medians) and pass/fail;
    ``passed`` is None when this run could not measure it."""
    out: list[Target] = []

    def by_ratio(text: str, scenario: str, metric: str, ours: str, other: str, ok: Any) -> None:
        if scenario not in scenario_names:
            return
        r = _find(rs, scenario, metric, ours, other)
        if r is None:
            out.append(Target(text, "not measured (see the table)", None))
        else:
            out.append(
                Target(text, f"{ours} / {other} = {fmt_num(r.spread.median)}", ok(r.spread.median))
            )

    def by_value(
        text: str,
        scenario: str,
        contender: str,
        metric: str,
        unit: str,
        ok: Any,
        floor: str | None = None,
    ) -> None:
        if scenario not in scenario_names:
            return
        cell = summary.get(scenario, {}).get(contender)
        if cell is None:
            out.append(Target(text, "not run", None))
            return
        if cell.status != OK or metric not in cell.metrics:
            # trioproxy itself could not do it: that is a miss, not a missing figure.
            out.append(Target(text, f"{cell.status}: {cell.reason}", False))
            return
        value = cell.metrics[metric].median
        measured = f"{fmt_num(value)} {unit}"
        base = summary.get(scenario, {}).get(floor or "")
        if base is not None and base.status == OK and metric in base.metrics:
            # What the apparatus alone gives, to read the figure against.
            measured += f" ({floor}, no proxy: {fmt_num(base.metrics[metric].median)} {unit})"
        out.append(Target(text, measured, ok(value)))

    g64 = "get-small-64"
    by_ratio(
        "small GET 64 conns: req/s >= velithon's",
        g64,
        "req_s",
        "trioproxy",
        "velithon",
        lambda v: v >= 1.0,
    )
    by_ratio(
        "small GET 64 conns: req/s >= 25x fastapi-reverse-proxy's",
        g64,
        "req_s",
        "trioproxy",
        "fastapi-reverse-proxy",
        lambda v: v >= 25.0,
    )
    by_ratio(
        "small GET 64 conns: p99 <= 1/25 of fastapi-reverse-proxy's",
        g64,
        "p99_ms",
        "trioproxy",
        "fastapi-reverse-proxy",
        lambda v: v <= 1 / 25,
    )
    by_ratio(
        "1 MiB downloads: MiB/s >= 90% of nginx's",
        "download-1m",
        "mib_s",
        "trioproxy",
        "nginx",
        lambda v: v >= 0.9,
    )
    by_ratio(
        "--http h11 small GET 64 conns: >= 60% of the h11 ceiling",
        g64,
        "req_s",
        "trioproxy-h11",
        "ceiling(h11)",
        lambda v: v >= 0.6,
    )
    by_ratio(
        "50-route config (routes-64): small GET req/s >= 90% of one route's",
        "routes-64",
        "req_s",
        "trioproxy-50routes",
        "trioproxy",
        lambda v: v >= 0.9,
    )
    for ours in ("trioproxy-asgi", "fastapi-trioproxy"):
        by_ratio(
            f"ASGI front end, small GET 64 conns: {ours} req/s >= 3x fastapi-reverse-proxy's",
            "asgi-get-64",
            "req_s",
            ours,
            "fastapi-reverse-proxy",
            lambda v: v >= 3.0,
        )
        by_ratio(
            f"ASGI front end, 1 MiB downloads: {ours} MiB/s >= 2x fastapi-reverse-proxy's",
            "asgi-download-1m",
            "mib_s",
            ours,
            "fastapi-reverse-proxy",
            lambda v: v >= 2.0,
        )
    by_value(
        "10k idle keep-alive held: peak RSS <= 200 MB",
        "idle-10k",
        "trioproxy",
        "peak_rss_mib",
        "MiB",
        lambda v: v * (1 << 20) <= 200e6,
    )
    by_value(
        "SSE 1000 streams: p99 <= 20 ms",
        "sse-1000",
        "trioproxy",
        "p99_ms",
        "ms",
        lambda v: v <= 20.0,
        floor="direct",
    )
    by_ratio(
        "metrics + LLM meter: small GET 64 conns req/s >= 90% of them off",
        g64,
        "req_s",
        "trioproxy",
        "trioproxy-nometrics",
        lambda v: v >= 0.9,
    )
    for name in ("sse-llm-1000", "sse-llm-100"):
        if name in scenario_names:
            out.append(_meter_event_target(name, summary.get(name, {})))
    if "ws-echo" in scenario_names or "ws-echo-1" in scenario_names:
        out.extend(_websocket_targets(summary.get("ws-echo", {}), summary.get("ws-echo-1", {})))
    return out  # fmt: skip


def _meter_event_target(scenario: str, cells: dict[str, Cell]) -> Target:
    """The LLM meter's cost per event: the p99 of the token streams' events with it,
    less without it (medians), <= 1 ms."""
    text = f"LLM meter: <= 1 ms added to the p99 of token stream events ({scenario})"
    on, off = cells.get("trioproxy"), cells.get("trioproxy-nometrics")
    if on is None or off is None or on.status != OK or off.status != OK:
        return Target(text, "not measured (see the table)", None)
    added = on.metrics["p99_ms"].median - off.metrics["p99_ms"].median
    measured = (
        f"p99 {fmt_num(on.metrics['p99_ms'].median)} ms on, "
        f"{fmt_num(off.metrics['p99_ms'].median)} ms off: {fmt_num(added)} ms added"
    )
    cpu_on, cpu_off = on.metrics.get("cpu_us_event"), off.metrics.get("cpu_us_event")
    if cpu_on is not None and cpu_off is not None:
        measured += f"; CPU {fmt_num(cpu_on.median)} vs {fmt_num(cpu_off.median)} µs/event"
    return Target(text, measured, added <= 1.0)


def _websocket_targets(many: dict[str, Cell], one: dict[str, Cell]) -> list[Target]:
    """CPU per echo round trip on 16 connections (``ws-echo``), and round trips per
    second on one connection (``ws-echo-1``), against fastapi-reverse-proxy's, from the
    medians of this run."""

    def pair(cells: dict[str, Cell], *metrics: str) -> tuple[Cell, Cell] | None:
        ours, theirs = cells.get("trioproxy"), cells.get("fastapi-reverse-proxy")
        if ours is None or theirs is None:
            return None
        for cell in (ours, theirs):
            if cell.status != OK or not set(metrics) <= set(cell.metrics):
                return None
        return ours, theirs

    def per_msg(cell: Cell) -> float:
        return cell.metrics["cpu"].median / cell.metrics["msgs_s"].median * 1e6

    out = []
    text = "WebSocket echo (16 conns): CPU per round trip <= fastapi-reverse-proxy's"
    if (cells := pair(many, "cpu", "msgs_s")) is None:
        out.append(Target(text, "not measured (see the table)", None))
    else:
        ours, theirs = cells
        ratio = per_msg(ours) / per_msg(theirs)
        measured = f"{fmt_num(per_msg(ours))} vs {fmt_num(per_msg(theirs))} µs"
        out.append(Target(text, f"{measured} (ratio {fmt_num(ratio)})", ratio <= 1.0))
    text = "WebSocket echo (1 conn): round trips/s >= fastapi-reverse-proxy's"
    if (cells := pair(one, "msgs_s")) is None:
        out.append(Target(text, "not measured (see the table)", None))
    else:
        ours, theirs = cells
        ratio = ours.metrics["msgs_s"].median / theirs.metrics["msgs_s"].median
        measured = f"trioproxy / fastapi-reverse-proxy = {fmt_num(ratio)}"
        out.append(Target(text, measured, ratio >= 1.0))
    return out


def fmt_num(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def one_line(reason: str, limit: int = 240) -> str:
    """A reason fit for a table cell: its first and last lines (a traceback's headline
    and its exception), no pipes."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def _spread(spread: Spread | None) -> str:
    if spread is None:
        return "-"
    if spread.count == 1 or spread.low == spread.high:
        return fmt_num(spread.median)
    return f"{fmt_num(spread.median)} ({fmt_num(spread.low)}..{fmt_num(spread.high)})"


def markdown(
    *,
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    contenders: Sequence[str],
    summary: dict[str, dict[str, Cell]],
    rs: Sequence[Ratio],
    ceilings: Sequence[Sequence[CycleCost]],
    goals: Sequence[Target],
) -> str:
    lines = [
        f"# trioproxy bench: {meta['mode']} run, {meta['started']}",
        "",
        f"{meta['duration_s']:g} s per measurement after {meta['warmup_s']:g} s of warm-up,"
        f" {meta['reps']} repetition(s), contender order rotated per repetition."
        f" {meta['pinning']}",
        "Cells: median (min..max) over repetitions. CPU is the contender's CPU time over"
        " wall time (1.0 = one core). A FAILED cell had socket errors, non-2xx responses"
        " or a broken stream in at least one repetition and shows no numbers.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"trioproxy ran from {meta.get('trioproxy_src', '?')}."
        + (f" trioproxy-baseline from {meta['baseline_src']}." if "baseline_src" in meta else ""),
        "",
        "## Results",
        "",
        "| scenario | contender | " + " | ".join(title for _, title in COLUMNS) + " | notes |",
        "|---|---|" + "---:|" * len(COLUMNS) + "---|",
    ]
    for scenario in scenarios:
        for contender in contenders:
            cell = summary.get(scenario.name, {}).get(contender)
            if cell is None:
                continue
            if cell.status != OK:
                lines.append(
                    f"| {scenario.title} | {contender} |"
                    + " |" * len(COLUMNS)
                    + f" **{cell.status}**: {one_line(cell.reason)} |"
                )
                continue
            values = []
            for key, _ in COLUMNS:
                metric = scenario.rate if key == "rate" else key
                text = _spread(cell.metrics.get(metric))
                if key == "rate" and text != "-":
                    text += f" {scenario.rate_unit}"
                values.append(text)
            notes = []
            if "held" in cell.metrics:
                notes.append(
                    f"{fmt_num(cell.metrics['held'].median)} held, RSS"
                    f" {_spread(cell.metrics['rss_mib'])} MiB"
                )
            if "max_ms" in cell.metrics:
                notes.append(f"max {_spread(cell.metrics['max_ms'])} ms")
            lines.append(
                f"| {scenario.title} | {contender} | "
                + " | ".join(values)
                + f" | {'; '.join(notes)} |"
            )
    lines += ["", *_ratio_table(scenarios, contenders, rs)]
    lines += [
        "",
        "## Ceiling: one server-side + one client-side HTTP/1.1 cycle, in-process, no I/O",
        "",
        "| implementation | µs per cycle pair | ceiling req/s (1 core) |",
        "|---|---:|---:|",
    ]
    by_impl: dict[str, list[CycleCost]] = {}
    for costs in ceilings:
        for cost in costs:
            by_impl.setdefault(cost.name, []).append(cost)
    for name, costs in by_impl.items():
        us = Spread.of([c.us_per_pair for c in costs if c.us_per_pair is not None])
        if us is None:
            lines.append(f"| {name} | {one_line(costs[0].reason)} | |")
            continue
        ceiling = Spread.of([c.ceiling_req_s for c in costs if c.ceiling_req_s is not None])
        lines.append(f"| {name} | {_spread(us)} | {_spread(ceiling)} |")
    if goals:
        lines += [
            "",
            "## Targets (medians of this run)",
            "",
            "| target | measured | result |",
            "|---|---|---|",
        ]
        for goal in goals:
            result = {True: "pass", False: "**FAIL**", None: "n/a"}[goal.passed]
            lines.append(f"| {goal.text} | {one_line(goal.measured)} | {result} |")
    return "\n".join(lines) + "\n"


_SHORT = {"fastapi-reverse-proxy": "fastapi-rp"}
_METRIC_TITLES = {
    "req_s": "req/s",
    "p99_ms": "p99",
    "mib_s": "MiB/s",
    "msgs_s": "msgs/s",
    "kib_per_conn": "KiB/conn",
    "rss_mib": "RSS",
    "cpu_us": "CPU µs/req",
}


def _ratio_table(
    scenarios: Sequence[Scenario], contenders: Sequence[str], rs: Sequence[Ratio]
) -> list[str]:
    """One row per (scenario, metric, one of ours); one column per contender compared."""
    others = [c for c in (*PEERS, *OURS) if c in contenders]
    lookup = {(r.scenario, r.metric, r.ours, r.other): r.spread for r in rs}
    lines = [
        "## Ratios: ours / theirs, per repetition of this run; median (min..max)",
        "",
        "req/s, MiB/s, msgs/s: higher is better; p99, KiB/conn, RSS, CPU µs/req: lower is"
        " better."
        " The ceiling column divides req/s by the in-process ceiling of the parser it uses.",
        "",
        "| scenario | metric | ours | "
        + " | ".join(f"/ {_SHORT.get(o, o)}" for o in others)
        + " | / ceiling |",
        "|---|---|---|" + "---:|" * (len(others) + 1),
    ]
    for scenario in scenarios:
        for metric, _ in scenario.compared:
            for ours in (c for c in OURS if c in contenders):
                cells = [
                    ""
                    if other == ours
                    else _spread(lookup.get((scenario.name, metric, ours, other)))
                    for other in others
                ]
                ceiling = [
                    f"{impl}: {_spread(lookup[key])}"
                    for c, impl in CEILING_PAIRS
                    if c == ours
                    and (key := (scenario.name, metric, ours, f"ceiling({impl})")) in lookup
                ]
                if all(c in ("", "-") for c in cells) and not ceiling:
                    continue
                lines.append(
                    f"| {scenario.title} | {_METRIC_TITLES.get(metric, metric)} | {ours} | "
                    + " | ".join(cells)
                    + f" | {'; '.join(ceiling)} |"
                )
    return lines


def to_json(
    *,
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    measurements: Sequence[Measurement],
    summary: dict[str, dict[str, Cell]],
    rs: Sequence[Ratio],
    ceilings: Sequence[Sequence[CycleCost]],
    goals: Sequence[Target],
) -> dict[str, Any]:
    return {
        "meta": meta,
        "scenarios": [
            {"name": s.name, "title": s.title, "rate": s.rate, "rate_unit": s.rate_unit}
            for s in scenarios
        ],
        "measurements": [m.to_json() for m in measurements],
        "summary": {
            scenario: {
                contender: {
                    "status": cell.status,
                    "reason": cell.reason,
                    "metrics": {k: v.to_json() for k, v in cell.metrics.items()},
                }
                for contender, cell in cells.items()
            }
            for scenario, cells in summary.items()
        },
        "ratios": [r.to_json() for r in rs],
        "ceiling": [[c.name, c.to_json()] for costs in ceilings for c in costs],
        "targets": [g.to_json() for g in goals],
    }


def write_atomically(path: Path, text: str) -> None:
    """Write through ``PATH.tmp`` and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(out_dir: Path, stamp: str, md: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """``STAMP.md`` and ``STAMP.json`` in ``out_dir``, copied to ``latest.md/json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=str) + "\n"
    md_path, json_path = out_dir / f"{stamp}.md", out_dir / f"{stamp}.json"
    write_atomically(md_path, md)
    write_atomically(json_path, text)
    write_atomically(out_dir / "latest.md", md)
    write_atomically(out_dir / "latest.json", text)
    return md_path, json_path
