"""``--workers``: what a second worker costs per request, and what it buys in req/s.

``python -m bench.workers [--reps N] [--duration S] [--contenders a,b]`` runs the
small-GET load (wrk, 64 keep-alive connections on the 100-byte ``/small`` of the
bench's nginx back end) against each contender in turn, order rotated by one per
repetition:

``trioproxy-1``
    ``python -m trioproxy`` as it is by default (one process, no supervisor);
``trioproxy-2``
    ``--workers 2``: the supervisor and two workers (the supervisor's CPU counted);
``trioproxy-1-mp``
    one process with ``PROMETHEUS_MULTIPROC_DIR`` set, as each worker has it: what
    prometheus-client's multiprocess mode costs alone;
``trioproxy-1-nometrics``, ``trioproxy-2-nometrics``
    both with ``--no-metrics`` (not run unless named in ``--contenders``);
``nginx-1``, ``nginx-2``
    the bench's nginx reverse proxy (``bench/nginx.py``) with ``worker_processes``
    1 and 2 (its default listener: one socket shared by the workers, no
    ``reuseport``).

Unlike the rest of the bench nothing is pinned: the point is to use both cores, so
the contender, wrk (two threads) and the nginx back end (one worker) all share this
machine's two cores, and the load generator and back end take what the contender
does not. req/s at N = 2 cannot double here; what it shows is how much of the
second core a contender can turn into requests against the load generator it shares
it with. CPU per request (the contender's whole process tree, user + system, over
the requests wrk counted) is the figure that must hold still from N = 1 to N = 2.

``--pin`` puts every contender (supervisor and workers alike) on core 1 and wrk
(one thread) and the back end on core 0, as the rest of the bench does: two workers
then share one core, req/s cannot scale, and CPU per request shows only what the
split into processes costs, without the contention for cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import floor, nginx, wrk
from bench.contenders import REPO_DIR
from bench.env import discover
from bench.procs import CORE_LOAD, CORE_PROXY, Child, free_port, pin_self, raise_nofile_limit, start

CONTENDERS = ("trioproxy-1", "trioproxy-2", "trioproxy-1-mp", "nginx-1", "nginx-2")
CONNECTIONS = 64


def _contender(name: str, upstream: str, workdir: Path, core: int | None) -> Child:
    port = free_port()
    if name.startswith("trioproxy"):
        _, workers, *variant = name.split("-")
        argv = [sys.executable, "-m", "trioproxy", "--upstream", f"http://{upstream}"]
        argv += ["--port", str(port), "--log-level", "warning", "--workers", workers]
        argv += ["--max-connections-per-upstream", "4096"]
        env = {}
        if variant == ["nometrics"]:
            argv.append("--no-metrics")
        elif variant == ["mp"]:
            # One process keeping its metrics as a worker does (multiprocess mode).
            metrics_dir = workdir / f"{name}-{port}-metrics"
            metrics_dir.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        return start(name, argv, port=port, core=core, log_dir=workdir, cwd=REPO_DIR, env=env)
    tools = discover()
    assert tools.nginx is not None, "nginx not found"
    conf = nginx.write_proxy(workdir / name, port, upstream, raise_nofile_limit(), stream=False)
    workers = name.rsplit("-", 1)[1]
    conf.write_text(
        conf.read_text().replace("worker_processes 1;", f"worker_processes {workers};", 1)
    )
    return start(name, nginx.command(tools.nginx, conf), port=port, core=core, log_dir=workdir)


def _wrk(url: str, duration: float, pin: bool) -> wrk.WrkResult:
    tools = discover()
    assert tools.wrk is not None, "wrk not found"
    if pin:
        return wrk.run(tools.wrk, url, connections=CONNECTIONS, duration=duration)
    argv = [tools.wrk, "-t2", f"-c{CONNECTIONS}", f"-d{max(1, round(duration))}s"]
    argv += ["--timeout=30s", "--latency", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    return wrk.parse(proc.stdout)


def _once(child: Child, duration: float, pin: bool) -> dict[str, float]:
    url = f"http://127.0.0.1:{child.port}/small"
    _wrk(url, 1, pin)  # warm-up
    before = child.cpu_seconds()
    load_before = os.getloadavg()[0]
    result = _wrk(url, duration, pin)
    used = child.cpu_seconds() - before
    if result.errors or result.non_2xx or not result.requests:
        raise SystemExit(f"wrk saw errors: {result}")
    return {
        "req_s": result.requests / duration,
        "p99_ms": result.p99_ms,
        "cpu_us_per_req": used * 1e6 / result.requests,
        "cores": used / duration,
        "load": load_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--pin",
        action="store_true",
        help="every contender (all its processes) on core 1, wrk -t1 and the back end on "
        "core 0, as the rest of the bench: CPU per request without the contention for cores",
    )
    args = parser.parse_args()
    names = args.contenders.split(",")
    raise_nofile_limit()
    if args.pin:
        pin_self(CORE_LOAD)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        os.chmod(tmp, 0o755)  # nginx's workers (another user) read the files in it
        workdir = Path(tmp)
        backend = floor._backend("http", workdir)
        try:
            for rep in range(args.reps):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    core = CORE_PROXY if args.pin else None
                    child = _contender(name, f"127.0.0.1:{backend.port}", workdir, core)
                    try:
                        figures = _once(child, args.duration, args.pin)
                    finally:
                        child.stop()
                    runs[name].append(figures)
                    print(
                        f"rep {rep + 1} {name}: req/s {figures['req_s']:.0f}, "
                        f"cpu µs/req {figures['cpu_us_per_req']:.1f}, "
                        f"cores {figures['cores']:.2f}, p99 {figures['p99_ms']:.1f} ms, "
                        f"load {figures['load']:.1f}",
                        flush=True,
                    )
        finally:
            backend.stop()
    print(
        f"\nmedians of {args.reps} repetitions, {args.duration:g} s each, "
        f"wrk -c{CONNECTIONS} /small, "
        + ("contender on core 1, wrk on core 0:" if args.pin else "nothing pinned, wrk -t2:")
    )
    print(f"{'contender':12} {'req/s':>8} {'µs/req':>7} {'cores':>6} {'p99 ms':>7}")
    for name in names:
        med = {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
        print(
            f"{name:12} {med['req_s']:8.0f} {med['cpu_us_per_req']:7.1f} "
            f"{med['cores']:6.2f} {med['p99_ms']:7.1f}"
        )
    for base in ("trioproxy", "nginx"):
        one, two = f"{base}-1", f"{base}-2"
        if one in runs and two in runs:
            pairs = list(zip(runs[two], runs[one], strict=True))
            rate = statistics.median(a["req_s"] / b["req_s"] for a, b in pairs)
            cpu = statistics.median(a["cpu_us_per_req"] / b["cpu_us_per_req"] for a, b in pairs)
            print(f"{two} / {one}: req/s {rate:.2f}, CPU per request {cpu:.2f}")


if __name__ == "__main__":
    main()
