"""``python -m bench``: measure trioproxy against nginx and the Python peers, in one run.

Exit status: 0 when every measurement gave numbers or was "n/a" (a contender without
the feature); 1 when any measurement FAILED (socket errors, non-2xx responses, a broken
stream, a child that died); 2 for bad usage or missing prerequisites (the message says
how to get them). Targets that are not met yet do not change the exit status: they are
goals, printed with pass/fail.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from bench import env, procs, report, runner
from bench.contenders import CONTENDERS
from bench.progress import Progress
from bench.scenarios import SCENARIOS, SMOKE, SMOKE_ROUTES, Scenario

RESULTS_DIR = env.BENCH_DIR / "results"
SMOKE_CONTENDERS = ("trioproxy", "trioproxy-h11", "trioproxy-50routes")


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure trioproxy against nginx, fastapi-reverse-proxy and velithon"
        " (and no proxy at all), in one run; see bench/README.rst.",
    )
    add = parser.add_argument
    add(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds per measurement (default: 10, or 3 with --quick)",
    )
    add(
        "--reps",
        type=int,
        default=None,
        metavar="N",
        help="interleaved repetitions (default: 3, or 1 with --quick)",
    )
    add(
        "--scenarios",
        type=lambda t: _names(t, list(SCENARIOS), "scenario"),
        default=list(SCENARIOS),
        metavar="A,B",
        help=f"(default: all) {','.join(SCENARIOS)}",
    )
    add(
        "--contenders",
        type=lambda t: _names(t, list(CONTENDERS), "contender"),
        default=None,
        metavar="X,Y",
        help=f"(default: all; trioproxy-baseline with --baseline-src) {','.join(CONTENDERS)}",
    )
    add(
        "--smoke",
        action="store_true",
        help="a few seconds: trioproxy alone behind a Python back end, Python load generator,"
        " no nginx/wrk/peers needed; writes no results unless --out is given",
    )
    add("--quick", action="store_true", help="--duration 3 --reps 1")
    add(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where results go (default: bench/results; --smoke writes none by default)",
    )
    add("--no-chart", action="store_true", help="do not draw the PNG chart")
    add(
        "--trioproxy-src",
        type=Path,
        default=env.BENCH_DIR.parent,
        metavar="DIR",
        help="run trioproxy from this source tree (a checkout's root) instead of this one,"
        " e.g. to compare two commits (default: %(default)s)",
    )
    add(
        "--baseline-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="the source tree the contender trioproxy-baseline runs from, to compare two"
        " commits in one run, e.g. git archive COMMIT trioproxy | tar -x -C DIR",
    )
    add(
        "--install-peers",
        action="store_true",
        help="create bench/.venv-peers and pip-install the Python peers and matplotlib into"
        " it, then run (add --check to only install)",
    )
    add("--check", action="store_true", help="check prerequisites and exit")
    return parser


def _needs(scenarios: Sequence[Scenario], contender_names: Sequence[str], chart: bool) -> set[str]:
    needs: set[str] = {"taskset"}
    for scenario in scenarios:
        needs |= scenario.needs
        if scenario.backend == "http":
            needs.add("nginx")
    for name in contender_names:
        needs |= CONTENDERS[name].needs
    if chart:
        needs.add("matplotlib")
    return needs


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    # Unwind through every finally: each child started gets stopped.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.install_peers:
        try:
            env.install_peers()
        except subprocess.CalledProcessError as exc:
            print(f"bench: installing the peers failed: {exc}", file=sys.stderr)
            return 2
    scenarios: list[Scenario]
    if args.smoke:
        mode, scenarios, names = "smoke", [SMOKE, SMOKE_ROUTES], list(SMOKE_CONTENDERS)
        duration, reps, warmup, budget, ready_timeout = 2.0, 1, 0.5, 0.2, 10.0
    else:
        mode = "quick" if args.quick else "full"
        scenarios = [SCENARIOS[n] for n in args.scenarios]
        if args.contenders is not None:
            names = list(args.contenders)
        else:  # all of them; the baseline only when there is one
            names = [n for n in CONTENDERS if n != "trioproxy-baseline" or args.baseline_src]
        duration, reps = (3.0, 1) if args.quick else (10.0, 3)
        duration = args.duration if args.duration is not None else duration
        reps = args.reps if args.reps is not None else reps
        warmup = max(1.0, min(3.0, round(duration * 0.2)))
        budget = 0.5 if args.quick else 1.0
        ready_timeout = procs.READY_TIMEOUT
    if duration <= 0 or reps < 1:
        print("bench: --duration must be > 0 and --reps >= 1", file=sys.stderr)
        return 2
    baseline = args.baseline_src
    if "trioproxy-baseline" in names:
        if baseline is None:
            print("bench: trioproxy-baseline needs --baseline-src DIR", file=sys.stderr)
            return 2
        if not (baseline / "trioproxy" / "__main__.py").is_file():
            print(f"bench: --baseline-src {baseline}: no trioproxy/ in it", file=sys.stderr)
            return 2
    chart = not args.no_chart and not args.smoke
    tools = env.discover()
    missing = tools.missing(_needs(scenarios, names, chart=False))
    if chart and not tools.peers_matplotlib:
        print(
            f"bench: no chart: matplotlib is missing; get it with: {env.HOW_TO['matplotlib']}",
            file=sys.stderr,
        )
        chart = False
    if missing:
        print("bench: missing prerequisites:", file=sys.stderr)
        for need in missing:
            print(f"  {need}: {env.HOW_TO[need]}", file=sys.stderr)
        return 2
    if args.check:
        print("bench: everything needed is there", file=sys.stderr)
        return 0
    if not procs.cores_available():
        print("bench: fewer than 2 cores (or no taskset): nothing is pinned", file=sys.stderr)
    procs.pin_self(procs.CORE_LOAD)
    # The ceiling's seam figures come from the same tree as the trioproxy processes.
    sys.path.insert(0, str(args.trioproxy_src.resolve()))

    plan = runner.Plan(
        scenarios=scenarios,
        contenders=[CONTENDERS[n] for n in names],
        duration=duration,
        warmup=warmup,
        reps=reps,
        ceiling_budget=budget,
        trioproxy_src=args.trioproxy_src.resolve(),
        baseline_src=baseline.resolve() if baseline is not None else None,
        ready_timeout=ready_timeout,
    )
    started = dt.datetime.now(dt.UTC).astimezone()
    total = reps + plan.measurements()
    with tempfile.TemporaryDirectory(prefix="trioproxy-bench-") as tmp, Progress(total) as progress:
        # nginx started as root serves its files from an unprivileged worker.
        os.chmod(tmp, 0o755)
        outcome = runner.run(plan, tools, Path(tmp), progress)
    finished = dt.datetime.now(dt.UTC).astimezone()

    meta = {
        "mode": mode,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": duration,
        "warmup_s": warmup,
        "reps": reps,
        "contenders": names,
        "pinning": (
            f"Contender pinned to core {procs.CORE_PROXY}; load generators, back ends and"
            f" the bench to core {procs.CORE_LOAD}."
            if procs.cores_available()
            else "Nothing pinned (fewer than 2 cores)."
        ),
        "versions": tools.versions,
        "trioproxy_src": _describe_tree(plan.trioproxy_src),
    }
    if plan.baseline_src is not None and "trioproxy-baseline" in names:
        meta["baseline_src"] = _describe_tree(plan.baseline_src)
    summary = report.summarise(outcome.measurements)
    ratios = report.ratios(outcome.measurements, scenarios, outcome.ceilings)
    goals = report.targets(summary, ratios, {s.name for s in scenarios}) if not args.smoke else []
    md = report.markdown(
        meta=meta,
        scenarios=scenarios,
        contenders=names,
        summary=summary,
        rs=ratios,
        ceilings=outcome.ceilings,
        goals=goals,
    )
    data = report.to_json(
        meta=meta,
        scenarios=scenarios,
        measurements=outcome.measurements,
        summary=summary,
        rs=ratios,
        ceilings=outcome.ceilings,
        goals=goals,
    )
    print(md)
    out_dir = args.out if args.out is not None else (None if args.smoke else RESULTS_DIR)
    if out_dir is not None:
        stamp = started.strftime("%Y%m%d-%H%M%S") + f"-{mode}"
        md_path, json_path = report.write(out_dir, stamp, md, data)
        print(f"bench: wrote {md_path} and {json_path} (and latest.*)", file=sys.stderr)
        if chart:
            _chart(tools, json_path, out_dir)
    failed = [m for m in outcome.measurements if m.status == report.FAILED]
    if failed:
        print(f"bench: {len(failed)} measurement(s) FAILED:", file=sys.stderr)
        for m in failed:
            print(f"  {m.scenario} x {m.contender} (rep {m.rep + 1}): {m.reason}", file=sys.stderr)
        return 1
    return 0


def _describe_tree(path: Path) -> str:
    """``PATH @ COMMIT`` (``+dirty`` when it has local changes), as far as git can tell."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--", "trioproxy"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(path)
    return f"{path} @ {commit}{'+dirty' if dirty else ''}"


def _chart(tools: env.Tools, json_path: Path, out_dir: Path) -> None:
    assert tools.peers_python is not None
    png = json_path.with_suffix(".png")
    proc = subprocess.run(
        [tools.peers_python, str(env.BENCH_DIR / "chart.py"), str(json_path), str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        print(f"bench: the chart failed:\n{proc.stderr}", file=sys.stderr)
        return
    latest = out_dir / "latest.png"
    tmp = latest.with_name("latest.png.tmp")
    tmp.write_bytes(png.read_bytes())
    tmp.replace(latest)
    print(f"bench: wrote {png} (and latest.png)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
