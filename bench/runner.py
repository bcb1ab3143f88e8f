"""One run: the back ends up for its whole length, then repetitions of every scenario
against every contender, the contenders' order rotated from one repetition to the next
so that no contender always runs first (cold caches) or last (a warm, tired machine).

Each measurement starts its contender afresh (so its peak RSS belongs to that scenario
alone), waits until ``/ready`` answers through it, warms it up, measures, and stops it.
The ceiling (``bench/ceiling.py``) is measured once per repetition, before the
contenders, in a fresh process pinned to the contenders' core.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import attrs

from bench import ceiling, nginx, procs
from bench.contenders import Contender, Site
from bench.env import Tools
from bench.procs import CORE_LOAD, CORE_PROXY, BenchError, Child, Watch
from bench.progress import Progress
from bench.report import FAILED, NA, OK, Measurement, fmt_num, one_line
from bench.scenarios import Context, NotApplicable, Scenario

MIB = 1 << 20


def _repo() -> Path:
    return Path(__file__).resolve().parent.parent


@attrs.frozen
class Plan:
    scenarios: Sequence[Scenario]
    contenders: Sequence[Contender]
    duration: float
    warmup: float
    reps: int
    ceiling_budget: float
    #: Seconds an SSE back end waits between two events (each stream gets one per tick).
    sse_interval: float = 0.5
    #: The source tree trioproxy runs from.
    trioproxy_src: Path = attrs.field(factory=_repo)
    #: The source tree ``trioproxy-baseline`` runs from.
    baseline_src: Path | None = None
    #: How long a contender may take to answer ``/ready`` through itself.
    ready_timeout: float = procs.READY_TIMEOUT

    def measurements(self) -> int:
        """How many measurements the plan makes (not every scenario runs every contender)."""
        pairs = sum(s.runs(c) for s in self.scenarios for c in self.contenders)
        return self.reps * pairs


@attrs.define
class Outcome:
    measurements: list[Measurement] = attrs.field(factory=list)
    ceilings: list[list[ceiling.CycleCost]] = attrs.field(factory=list)


def rotated(items: Sequence[Contender], rep: int) -> list[Contender]:
    shift = rep % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def _start_backend(
    kind: str, tools: Tools, workdir: Path, nofile: int, sse_interval: float
) -> Child:
    port = procs.free_port()
    if kind == "http":
        assert tools.nginx is not None
        conf = nginx.write_backend(workdir / "backend-nginx", port, nofile)
        argv = nginx.command(tools.nginx, conf)
    else:
        server = "http" if kind == "pyhttp" else kind
        argv = [sys.executable, "-m", "bench.servers", server, "--port", str(port)]
        if kind == "sse":
            argv += ["--interval", str(sse_interval)]
    return procs.start(
        f"backend-{kind}", argv, port=port, core=CORE_LOAD, log_dir=workdir, cwd=_repo()
    )


def _summary_line(scenario: Scenario, m: Measurement) -> str:
    head = f"rep {m.rep + 1} {scenario.name:<13} {m.contender:<22}"
    if m.status != OK:
        return f"{head} {m.status}: {one_line(m.reason)}"
    rate = m.metrics.get(scenario.rate, float("nan"))
    parts = [f"{fmt_num(rate)} {scenario.rate_unit}"]
    if "p99_ms" in m.metrics:
        parts.append(f"p99 {fmt_num(m.metrics['p99_ms'])} ms")
    if "cpu" in m.metrics:
        parts.append(f"cpu {m.metrics['cpu']:.2f}")
    if "peak_rss_mib" in m.metrics:
        parts.append(f"rss {fmt_num(m.metrics['peak_rss_mib'])} MiB")
    return f"{head} " + ", ".join(parts)


def measure_one(
    scenario: Scenario,
    contender: Contender,
    rep: int,
    *,
    plan: Plan,
    tools: Tools,
    backends: dict[str, Child],
    workdir: Path,
    nofile: int,
    progress: Progress,
) -> Measurement:
    label = f"rep {rep + 1}/{plan.reps} · {scenario.title} · {contender.name}"
    port = procs.free_port()
    prefix = workdir / f"{scenario.name}-{contender.name}-{rep}"
    prefix.mkdir(parents=True, exist_ok=True)
    backend = backends[scenario.backend]
    site = Site(
        tools,
        scenario.backend,
        f"127.0.0.1:{backend.port}",
        port,
        prefix,
        nofile,
        plan.trioproxy_src,
        plan.baseline_src,
    )
    launch = contender.launch(site)
    progress.status(f"{label} · starting")
    try:
        child = procs.start(
            contender.name,
            launch.argv,
            port=port,
            core=CORE_PROXY,
            log_dir=prefix,
            env=launch.env,
            cwd=launch.cwd,
            ready_timeout=plan.ready_timeout,
            tls=contender.scheme == "https",
        )
    except BenchError as exc:
        return Measurement(scenario.name, contender.name, rep, FAILED, f"start: {exc}")
    try:
        progress.status(f"{label} · measuring ({plan.warmup:g} s warm-up + {plan.duration:g} s)")
        with Watch(child) as watch:
            ctx = Context(child, watch, contender, tools, plan.duration, plan.warmup, prefix)
            metrics = scenario.measure(ctx)
        metrics["peak_rss_mib"] = watch.peak_rss / MIB
        backend.check_alive()
        return Measurement(scenario.name, contender.name, rep, OK, metrics=metrics)
    except NotApplicable as exc:
        return Measurement(scenario.name, contender.name, rep, NA, str(exc))
    except BenchError as exc:
        return Measurement(scenario.name, contender.name, rep, FAILED, str(exc))
    finally:
        progress.status(f"{label} · stopping")
        child.stop()


def run(plan: Plan, tools: Tools, workdir: Path, progress: Progress) -> Outcome:
    """Run the plan; every child it starts is stopped before it returns or raises."""
    nofile = procs.raise_nofile_limit()
    outcome = Outcome()
    with ExitStack() as stack:
        backends: dict[str, Child] = {}
        for kind in sorted({s.backend for s in plan.scenarios}):
            progress.status(f"starting the {kind} back end")
            child = _start_backend(kind, tools, workdir, nofile, plan.sse_interval)
            stack.callback(child.stop)
            backends[kind] = child
        for rep in range(plan.reps):
            progress.status(f"rep {rep + 1}/{plan.reps} · ceiling (in-process cycle cost)")
            core = procs.CORE_PROXY if procs.cores_available() else None
            costs = ceiling.measure_on_core(core, budget_s=plan.ceiling_budget)
            outcome.ceilings.append(costs)
            progress.finished(
                f"rep {rep + 1} ceiling: "
                + ", ".join(
                    f"{c.name} {c.us_per_pair:.1f} µs" if c.us_per_pair else f"{c.name} n/a"
                    for c in costs
                )
            )
            order = rotated(plan.contenders, rep)
            for scenario in plan.scenarios:
                for contender in order:
                    if not scenario.runs(contender):
                        continue
                    started = time.monotonic()
                    m = measure_one(
                        scenario,
                        contender,
                        rep,
                        plan=plan,
                        tools=tools,
                        backends=backends,
                        workdir=workdir,
                        nofile=nofile,
                        progress=progress,
                    )
                    outcome.measurements.append(m)
                    line = _summary_line(scenario, m)
                    progress.finished(f"{line}  [{time.monotonic() - started:.0f} s]")
                    if m.status == FAILED:
                        progress.note(f"!!! {scenario.name} x {contender.name}: {m.reason}")
    return outcome
