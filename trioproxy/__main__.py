"""``python -m trioproxy``: command line → Config → serve.

Bad usage exits 2 with one line naming the flag and the value; a running proxy
exits 0 after a drain on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from typing import NoReturn

import attrs
import trio

from trioproxy.balance.health_rules import StatusRanges
from trioproxy.balance.strategies import make_strategy
from trioproxy.balance.target import TargetSpec
from trioproxy.config import Config, ConfigError, parse_target
from trioproxy.http.parsers import PARSER_CHOICES
from trioproxy.observe import log_output
from trioproxy.upstream.origin import UpstreamURL

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: Container allocations between two collections of CPython's youngest GC
#: generation (CPython's default: 700). See :func:`tune_gc`.
GC_GEN0_THRESHOLD = 10_000


def _size(text: str) -> int:
    """A byte size: 1048576, 64k, 10m, 1g (binary multiples)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    value = text.strip().lower()
    factor = 1
    if value[-1:] in units:
        factor = units[value[-1]]
        value = value[:-1]
        if value.endswith("i"):
            value = value[:-1]
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 65536, 64k, 10m)")
    return int(value) * factor


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value != value or value < 0:  # NaN or negative
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0: {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (0-65535): {text!r}")
    return int(text)


def _upstream(text: str) -> TargetSpec:
    try:
        return parse_target(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(text)


def _statuses(text: str) -> StatusRanges:
    try:
        return StatusRanges.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc} in {text!r} (use e.g. 200, 200,204 or 200-299)"
        ) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad usage: one line naming the flag and the value, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trioproxy",
        description="A streaming, cancellation-safe HTTP/1.1 reverse proxy built on trio.",
        epilog="Example: python -m trioproxy --upstream http://127.0.0.1:8000 --port 8080",
    )
    add = parser.add_argument
    add(
        "--upstream",
        action="append",
        type=_upstream,
        default=[],
        metavar="URL[,OPTIONS]",
        help="upstream base URL (http:// or https://, optional path prefix), optionally "
        "followed by ,weight=N ,max_inflight=N ,health_path=/path; repeat the flag for "
        "several upstreams",
    )
    add(
        "--strategy",
        default="round_robin",
        metavar="NAME",
        help="balancing: round_robin, random, weighted, least_connections, fastest, or "
        "package.module:Class for a custom one (default: %(default)s)",
    )
    add(
        "--demo",
        action="store_true",
        help="start two built-in demo upstreams in-process and proxy to them",
    )
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add(
        "--port",
        type=_port,
        default=8080,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    add("--log-level", default="info", choices=_LOG_LEVELS, help="(default: %(default)s)")
    add(
        "--http",
        default="auto",
        choices=PARSER_CHOICES,
        help="HTTP/1.1 parser: httptools (llhttp, fast), h11 (pure Python, the reference), "
        "or auto = httptools when installed (default: %(default)s)",
    )
    add(
        "--connect-timeout",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="upstream connect (and TLS handshake) timeout (default: %(default)s)",
    )
    add(
        "--read-timeout",
        type=_seconds,
        default=300.0,
        metavar="S",
        help="upstream idle time allowed between two reads; long for slow LLM streams "
        "(default: %(default)s)",
    )
    add(
        "--header-timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="time a client has to send a whole request head (default: %(default)s)",
    )
    add(
        "--body-timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="client idle time allowed between two reads of a request body (default: %(default)s)",
    )
    add(
        "--keepalive-timeout",
        type=_seconds,
        default=75.0,
        metavar="S",
        help="how long an idle client keep-alive connection stays open (default: %(default)s)",
    )
    add(
        "--max-header-size",
        type=_size,
        default=65536,
        metavar="BYTES",
        help="largest request head accepted, else 431 (default: %(default)s)",
    )
    add(
        "--max-body-size",
        type=_size,
        default=None,
        metavar="BYTES",
        help="largest request body accepted, else 413 (default: unlimited)",
    )
    add(
        "--max-connections-per-upstream",
        type=int,
        default=256,
        metavar="N",
        help="cap on open connections to one upstream; callers wait (default: %(default)s)",
    )
    add(
        "--pool-timeout",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="how long a request waits for a connection under that cap, else 503 "
        "(default: %(default)s)",
    )
    add(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="on SIGTERM/SIGINT, how long in-flight requests may finish (default: %(default)s)",
    )
    add(
        "--preserve-host",
        action="store_true",
        help="send the client's Host header upstream instead of the upstream's",
    )
    health = parser.add_argument_group("health checks, breaker and retries")
    health.add_argument("--no-health-check", action="store_true", help="do not probe the upstreams")
    health.add_argument(
        "--health-path",
        default=None,
        metavar="PATH",
        help="probe path, expected to answer 200-399 (or --health-expect); by default / is "
        "probed and any answer below 500 passes",
    )
    health.add_argument(
        "--health-expect",
        type=_statuses,
        default=None,
        metavar="STATUSES",
        help="statuses that pass a probe: codes and ranges, e.g. 200 or 200,204 or 200-299 "
        "(default: 200-399 with a health path, else any below 500)",
    )
    health.add_argument(
        "--health-method", default="HEAD", choices=("HEAD", "GET"), help="(default: %(default)s)"
    )
    health.add_argument(
        "--health-interval",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="seconds between probes of one upstream (default: %(default)s)",
    )
    health.add_argument(
        "--health-timeout",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="a probe slower than this fails (default: %(default)s)",
    )
    health.add_argument(
        "--health-rise",
        type=_count,
        default=2,
        metavar="N",
        help="good probes in a row that make an upstream healthy (default: %(default)s)",
    )
    health.add_argument(
        "--health-fall",
        type=_count,
        default=3,
        metavar="N",
        help="failed probes in a row that make it unhealthy (default: %(default)s)",
    )
    health.add_argument(
        "--eject-after",
        type=_count,
        default=3,
        metavar="N",
        help="live connect errors or 5xx in a row that eject an upstream; 0 = never "
        "(default: %(default)s)",
    )
    health.add_argument(
        "--eject-for",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="how long an ejected upstream gets no traffic (default: %(default)s)",
    )
    health.add_argument(
        "--breaker-failures",
        type=_count,
        default=5,
        metavar="N",
        help="failures within --breaker-window that open an upstream's circuit; 0 = no "
        "breaker (default: %(default)s)",
    )
    health.add_argument(
        "--breaker-window", type=_seconds, default=10.0, metavar="S", help="(default: %(default)s)"
    )
    health.add_argument(
        "--breaker-open-for",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="how long an open circuit stays open before trial requests (default: %(default)s)",
    )
    health.add_argument(
        "--breaker-half-open",
        type=_count,
        default=3,
        metavar="N",
        help="trial requests admitted while half-open (default: %(default)s)",
    )
    health.add_argument(
        "--breaker-successes",
        type=_count,
        default=2,
        metavar="N",
        help="trial successes that close the circuit again (default: %(default)s)",
    )
    health.add_argument(
        "--retries",
        type=_count,
        default=2,
        metavar="N",
        help="extra attempts on other upstreams where safe; 0 = none (default: %(default)s)",
    )
    health.add_argument(
        "--retry-budget",
        type=_ratio,
        default=0.2,
        metavar="RATIO",
        help="retries at most this share of recent requests (default: %(default)s)",
    )
    health.add_argument(
        "--retry-replay-limit",
        type=_size,
        default=1 << 20,
        metavar="BYTES",
        help="largest request body kept to be sent again on a retry (default: 1m)",
    )
    admin = parser.add_argument_group("admin listener")
    admin.add_argument(
        "--admin-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve /health, /ping and /status on this port (default: off)",
    )
    admin.add_argument(
        "--admin-host", default="127.0.0.1", metavar="HOST", help="(default: %(default)s)"
    )
    add(
        "--upstream-ca",
        metavar="FILE",
        help="CA bundle to verify https upstreams with (default: the system's)",
    )
    add(
        "--insecure",
        action="store_true",
        help="do not verify https upstream certificates (never in production)",
    )
    websocket = parser.add_argument_group("WebSocket tunnels")
    websocket.add_argument(
        "--ws-max-message-size",
        type=_size,
        default=16 << 20,
        metavar="BYTES",
        help="largest WebSocket message relayed, either way; a larger one closes the tunnel "
        "with 1009 (default: 16m)",
    )
    websocket.add_argument(
        "--ws-idle-timeout",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="close a WebSocket tunnel (1001) after S seconds with no data either way; "
        "0 = never (default: 0)",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.upstream and not args.demo:
        parser.error("no upstream: give --upstream URL (repeatable) or --demo")
    try:
        make_strategy(args.strategy)
    except ValueError as exc:
        parser.error(f"argument --strategy: {exc}")
    if args.upstream_ca is not None:
        try:
            with open(args.upstream_ca, "rb"):
                pass
        except OSError as exc:
            parser.error(f"--upstream-ca {args.upstream_ca!r}: {exc.strerror}")
    try:
        return Config(
            upstreams=tuple(args.upstream),
            demo=args.demo,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            http=args.http,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            keepalive_timeout=args.keepalive_timeout,
            max_header_size=args.max_header_size,
            max_body_size=args.max_body_size,
            max_connections_per_upstream=args.max_connections_per_upstream,
            pool_timeout=args.pool_timeout,
            grace=args.grace,
            preserve_host=args.preserve_host,
            upstream_ca=args.upstream_ca,
            insecure=args.insecure,
            ws_max_message_size=args.ws_max_message_size,
            ws_idle_timeout=args.ws_idle_timeout,
            strategy=args.strategy,
            health_check=not args.no_health_check,
            health_method=args.health_method,
            health_path=args.health_path,
            health_expect=args.health_expect,
            health_interval=args.health_interval,
            health_timeout=args.health_timeout,
            health_rise=args.health_rise,
            health_fall=args.health_fall,
            eject_after=args.eject_after,
            eject_for=args.eject_for,
            breaker_failures=args.breaker_failures,
            breaker_window=args.breaker_window,
            breaker_open_for=args.breaker_open_for,
            breaker_half_open=args.breaker_half_open,
            breaker_successes=args.breaker_successes,
            retries=args.retries,
            retry_budget=args.retry_budget,
            retry_replay_limit=args.retry_replay_limit,
            admin_host=args.admin_host,
            admin_port=args.admin_port,
        )
    except ConfigError as exc:
        parser.error(f"--{exc}")


def tune_gc() -> None:
    """Collect less often, and never walk what was built at start again.

    Also called by ``bench.ceiling`` and ``bench.floor``, so that what they measure
    runs under the proxy's own collector settings.

    A relay allocates a few short-lived containers per chunk (trio's outcome
    and trap objects, event objects); with the default threshold of 700 the
    young generation was collected every ~100 SSE events, and each collection
    also walked the big live containers the young objects point into (the
    run queue, the epoll results): measured with ``python -m bench.floor``,
    ~28 % of the proxy's CPU on 1000 SSE streams was ``gc_collect_main``.
    ``gc.freeze`` moves the modules, config and parsers built at start out of
    every later full collection. Memory cost: at most ``GC_GEN0_THRESHOLD``
    young objects wait for collection (about a megabyte).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)


async def _main(config: Config) -> int:
    from trioproxy.server.listener import ProxyServer, announce

    async with trio.open_nursery() as nursery:
        if config.demo:
            from trioproxy.demo import run_demo_upstreams

            urls = await run_demo_upstreams(nursery)
            demo = tuple(TargetSpec(url=UpstreamURL.parse(url)) for url in urls)
            config = attrs.evolve(config, upstreams=config.upstreams + demo)
        server = ProxyServer(config)
        try:
            await server.bind()
        except OSError as exc:
            print(
                f"trioproxy: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            nursery.cancel_scope.cancel()
            return 1
        tune_gc()
        addresses = await nursery.start(server.run)
        announce(addresses)
        await server.wait_stopped()
        nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    log_output.install(config.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    status = 0
    try:
        status = trio.run(_main, config)
    except* KeyboardInterrupt:
        # Ctrl-C before the signal handlers are in place (nurseries wrap it).
        status = 0
    sys.exit(status)


if __name__ == "__main__":
    main()
