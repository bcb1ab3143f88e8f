"""What rate limits and ``max_inflight`` cost on the small-GET load.

``python -m bench.limits [--reps N] [--duration S]`` starts the bench's nginx back end
(and a ``redis-server``, both on core 0 with the load), then, for each repetition,
trioproxy on core 1 with each of these configs in turn (order rotated by one per
repetition), loaded by wrk with 64 keep-alive connections on the 100-byte ``/small``,
as ``python -m bench.floor small`` does:

``plain``
    one route, no limits;
``memory``
    the same route with ``rate_limit = [{ key = "ip", ... }]`` in the memory store,
    set so high that no request is refused (the cost of counting, not of refusing);
``memory-3``
    three such limits (``ip``, ``route``, ``header:user-agent``);
``inflight``
    ``max_inflight = 100000``;
``redis``
    one ``store = "redis"`` limit: one ``EVALSHA`` round trip per request.

It prints req/s and the proxy's CPU time per request for each, and each one's ratio
to ``plain`` within the same repetition (medians over repetitions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import floor
from bench.contenders import REPO_DIR
from bench.procs import CORE_LOAD, CORE_PROXY, Child, free_port, pin_self, raise_nofile_limit, start

HIGH = 'average = 100000000, period = "1s", burst = 100000000'

CONFIGS = {
    "plain": "",
    "memory": f'rate_limit = [{{ {HIGH}, key = "ip" }}]',
    "memory-3": (
        f'rate_limit = [{{ {HIGH}, key = "ip" }}, {{ {HIGH}, key = "route" }}, '
        f'{{ {HIGH}, key = "header:user-agent" }}]'
    ),
    "inflight": "max_inflight = 100000",
    "redis": f'rate_limit = [{{ {HIGH}, key = "ip", store = "redis" }}]',
}


def config_text(upstream: str, redis_url: str, route_extra: str) -> str:
    return (
        "[server]\n"
        f'redis = {{ url = "{redis_url}", timeout = "200ms" }}\n'
        "[upstreams.backend]\n"
        f'servers = ["http://{upstream}"]\n'
        "pool = { max_connections = 4096 }\n"
        "[routes.all]\n"
        'upstream = "backend"\n'
        f"{route_extra}\n"
    )


def _proxy(name: str, config: Path, workdir: Path) -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "trioproxy", "--config", str(config), "--port", str(port)]
    argv += ["--log-level", "warning"]
    return start(name, argv, port=port, core=CORE_PROXY, log_dir=workdir, cwd=REPO_DIR)


def _redis(workdir: Path) -> Child:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return start("redis", argv, port=port, core=CORE_LOAD, log_dir=workdir, ready_path=None)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    names = args.configs.split(",")
    pin_self(CORE_LOAD)
    raise_nofile_limit()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        os.chmod(tmp, 0o755)  # nginx's worker (another user) reads the files in it
        workdir = Path(tmp)
        backend = floor._backend("http", workdir)
        redis = _redis(workdir)
        try:
            for rep in range(args.reps):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    config = workdir / f"{name}.toml"
                    config.write_text(
                        config_text(
                            f"127.0.0.1:{backend.port}",
                            f"redis://127.0.0.1:{redis.port}/0",
                            CONFIGS[name],
                        )
                    )
                    child = _proxy(name, config, workdir)
                    try:
                        figures = floor._small_once(child, args.duration)
                    finally:
                        child.stop()
                    runs[name].append(figures)
                    print(
                        f"rep {rep + 1} {name}: req/s {figures['req_s']:.0f}, "
                        f"cpu µs/req {figures['cpu_us_per_req']:.1f}",
                        flush=True,
                    )
        finally:
            redis.stop()
            backend.stop()
    print(f"\nmedians of {args.reps} repetitions, {args.duration:g} s each, wrk -c 64 /small:")
    print(f"{'config':10} {'req/s':>8} {'/plain':>7} {'µs/req':>7} {'/plain':>7}")
    for name in names:
        rate = statistics.median(r["req_s"] for r in runs[name])
        cpu = statistics.median(r["cpu_us_per_req"] for r in runs[name])
        ratios = [r["req_s"] / p["req_s"] for r, p in zip(runs[name], runs["plain"], strict=True)]
        cpu_ratios = [
            r["cpu_us_per_req"] / p["cpu_us_per_req"]
            for r, p in zip(runs[name], runs["plain"], strict=True)
        ]
        print(
            f"{name:10} {rate:8.0f} {statistics.median(ratios):7.3f} "
            f"{cpu:7.1f} {statistics.median(cpu_ratios):7.3f}"
        )


if __name__ == "__main__":
    main()
