"""``python -m trioproxy``: command line → Config → serve.

The configuration comes in layers (``trioproxy.config.load``): model defaults <
TOML file < ``.env`` < environment < these flags. Every flag defaults to "not
given", so that it overrides the layers below only when it is; ``--help`` shows
the model's defaults.

Bad usage exits 2: a line per bad value, naming its source (flag, variable, or
file and key path) and the value; a running proxy exits 0 after a drain on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import attrs
import trio

from trioproxy.balance.target import TargetSpec
from trioproxy.config import ConfigError
from trioproxy.config.load import CliValue, ConfigSources, load_config
from trioproxy.config.model import AdminSettings, Config, ServerSettings, UpstreamGroup
from trioproxy.config.values import HEALTH_METHODS, HTTP_PARSERS, LOG_LEVELS
from trioproxy.observe import access, log_output
from trioproxy.server.worker import WorkerSettings, report_ready, worker_config, worker_loader
from trioproxy.snapshot import build_snapshot
from trioproxy.upstream.origin import UpstreamURL

#: Container allocations between two collections of CPython's youngest GC
#: generation (CPython's default: 700). See :func:`tune_gc`.
GC_GEN0_THRESHOLD = 10_000

# The defaults --help shows are the model's own.
_SERVER = ServerSettings()
_GROUP = UpstreamGroup(name="default", servers=())


def _seconds(value: float) -> str:
    return f"{value:g}"


def _bytes(value: int) -> str:
    for unit, factor in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


@attrs.frozen
class _Flag:
    """Where a flag's value goes: a key path below the file's root, or below every
    ``[upstreams.NAME]`` (``every_group``)."""

    path: tuple[str, ...]
    every_group: bool = False


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: argparse dest → where its value goes.
        self.flags: dict[str, _Flag] = {}

    def error(self, message: str) -> NoReturn:
        """Bad usage: one line naming the flag and the value, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _AppendUpstream(argparse.Action):
    """``--upstream`` and ``--backend-url``: keep each value with the flag that gave it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = [*(getattr(namespace, self.dest, None) or ()), (option_string, values)]
        setattr(namespace, self.dest, given)


_EPILOG = """\
Configuration comes in layers, each over the one before: the defaults shown here,
the TOML file (--config, or TRIOPROXY_CONFIG), .env (or --env-file), the
environment (TRIOPROXY_PORT, TRIOPROXY_LOG_LEVEL... one per [server] key, and
TRIOPROXY_UPSTREAM), then these flags. Server flags override [server] keys.
Upstream group flags (--strategy, --health-*, --eject-*, --breaker-*, --retries,
--retry-*, timeouts, pool, TLS and --preserve-host) set that key in every upstream
group, the file's included. --upstream gives the servers of the group "default";
with a file that defines routes, name them in an [upstreams.NAME] table instead.

Example: python -m trioproxy --upstream http://127.0.0.1:8000 --port 8080
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trioproxy",
        description="A streaming, cancellation-safe HTTP/1.1 reverse proxy built on trio.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # Not given = absent, so that a flag overrides the file only when it is given.
        argument_default=argparse.SUPPRESS,
    )

    def flag(
        group: Any,
        name: str,
        path: tuple[str, ...],
        *,
        every_group: bool = False,
        **kwargs: Any,
    ) -> None:
        action = group.add_argument(name, **kwargs)
        parser.flags[action.dest] = _Flag(path, every_group)

    def server(name: str, path: tuple[str, ...], **kwargs: Any) -> None:
        flag(parser, name, path, **kwargs)

    def upstream(group: Any, name: str, path: tuple[str, ...], **kwargs: Any) -> None:
        flag(group, name, path, every_group=True, **kwargs)

    files = parser.add_argument_group("configuration sources")
    files.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration file (default: $TRIOPROXY_CONFIG, else none)",
    )
    files.add_argument(
        "--env-file",
        metavar="PATH",
        help="read TRIOPROXY_* variables from this file (default: ./.env if it exists); "
        "the real environment wins over it",
    )
    files.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (every layer) without listening, print a summary "
        "and exit: 0 if it is good, 2 with one line per problem if not",
    )
    files.add_argument(
        "--watch",
        action="store_true",
        help="reload on file change: the config file, .env, or a file the config names "
        "(TLS certificates and keys, API key files); needs a config file",
    )

    parser.add_argument(
        "--upstream",
        "--backend-url",
        dest="upstream",
        action=_AppendUpstream,
        metavar="URL[,OPTIONS]",
        help="upstream base URL (http:// or https://, optional path prefix), optionally "
        "followed by ,weight=N ,max_inflight=N ,health_path=/path; repeat the flag for "
        "several upstreams. These are the servers of the group 'default' "
        "(default: $TRIOPROXY_UPSTREAM); --backend-url is the same flag",
    )
    upstream(
        parser,
        "--strategy",
        ("strategy",),
        metavar="NAME",
        help="balancing: round_robin, random, weighted, least_connections, fastest, or "
        f"package.module:Class for a custom one (default: {_GROUP.strategy})",
    )
    server(
        "--demo",
        ("server", "demo"),
        action="store_const",
        const=True,
        help="start two built-in demo upstreams in-process and proxy to them",
    )
    server("--host", ("server", "host"), help=f"address to listen on (default: {_SERVER.host})")
    server(
        "--port",
        ("server", "port"),
        help=f"port to listen on; 0 picks a free one (default: {_SERVER.port})",
    )
    server(
        "--log-level",
        ("server", "log_level"),
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help=f"(default: {_SERVER.log_level})",
    )
    server(
        "--http",
        ("server", "http"),
        metavar="{" + ",".join(HTTP_PARSERS) + "}",
        help="HTTP/1.1 parser: httptools (llhttp, fast), h11 (pure Python, the reference), "
        f"or auto = httptools when installed (default: {_SERVER.http})",
    )
    upstream(
        parser,
        "--connect-timeout",
        ("timeouts", "connect"),
        metavar="S",
        help="upstream connect (and TLS handshake) timeout "
        f"(default: {_seconds(_GROUP.timeouts.connect)})",
    )
    upstream(
        parser,
        "--read-timeout",
        ("timeouts", "read"),
        metavar="S",
        help="upstream idle time allowed between two reads; long for slow LLM streams "
        f"(default: {_seconds(_GROUP.timeouts.read)})",
    )
    server(
        "--header-timeout",
        ("server", "header_timeout"),
        metavar="S",
        help="time a client has to send a whole request head "
        f"(default: {_seconds(_SERVER.header_timeout)})",
    )
    server(
        "--body-timeout",
        ("server", "body_timeout"),
        metavar="S",
        help="client idle time allowed between two reads of a request body "
        f"(default: {_seconds(_SERVER.body_timeout)})",
    )
    server(
        "--keepalive-timeout",
        ("server", "keepalive_timeout"),
        metavar="S",
        help="how long an idle client keep-alive connection stays open "
        f"(default: {_seconds(_SERVER.keepalive_timeout)})",
    )
    server(
        "--max-header-size",
        ("server", "max_header_size"),
        metavar="BYTES",
        help="largest request head accepted, else 431 "
        f"(default: {_bytes(_SERVER.max_header_size)})",
    )
    server(
        "--max-body-size",
        ("server", "max_body_size"),
        metavar="BYTES",
        help="largest request body accepted, else 413 (default: unlimited)",
    )
    upstream(
        parser,
        "--max-connections-per-upstream",
        ("pool", "max_connections"),
        metavar="N",
        help="cap on open connections to one upstream; callers wait "
        f"(default: {_GROUP.pool.max_connections})",
    )
    upstream(
        parser,
        "--pool-timeout",
        ("pool", "timeout"),
        metavar="S",
        help="how long a request waits for a connection under that cap, else 503 "
        f"(default: {_seconds(_GROUP.pool.timeout)})",
    )
    server(
        "--workers",
        ("server", "workers"),
        metavar="N",
        help="worker processes, each with its own SO_REUSEPORT listener, under one "
        'supervisor; "auto" = one per CPU this process may use; 1 = this process serves, '
        f"no supervisor (default: {_SERVER.workers})",
    )
    server(
        "--grace",
        ("server", "grace"),
        metavar="S",
        help="on SIGTERM/SIGINT, how long in-flight requests may finish "
        f"(default: {_seconds(_SERVER.grace)})",
    )
    upstream(
        parser,
        "--preserve-host",
        ("preserve_host",),
        action="store_const",
        const=True,
        help="send the client's Host header upstream instead of the upstream's",
    )
    health = parser.add_argument_group(
        "health checks, breaker and retries (each sets its key in every upstream group)"
    )
    upstream(
        health,
        "--no-health-check",
        ("health",),
        action="store_const",
        const=False,
        help="do not probe the upstreams",
    )
    upstream(
        health,
        "--health-path",
        ("health", "path"),
        metavar="PATH",
        help="probe path, expected to answer 200-399 (or --health-expect); by default / is "
        "probed and any answer below 500 passes",
    )
    upstream(
        health,
        "--health-expect",
        ("health", "expect"),
        metavar="STATUSES",
        help="statuses that pass a probe: codes and ranges, e.g. 200 or 200,204 or 200-299 "
        "(default: 200-399 with a health path, else any below 500)",
    )
    upstream(
        health,
        "--health-method",
        ("health", "method"),
        metavar="{" + ",".join(HEALTH_METHODS) + "}",
        help=f"(default: {_GROUP.health.method.decode()})",
    )
    upstream(
        health,
        "--health-interval",
        ("health", "interval"),
        metavar="S",
        help="seconds between probes of one upstream "
        f"(default: {_seconds(_GROUP.health.interval)})",
    )
    upstream(
        health,
        "--health-timeout",
        ("health", "timeout"),
        metavar="S",
        help=f"a probe slower than this fails (default: {_seconds(_GROUP.health.timeout)})",
    )
    upstream(
        health,
        "--health-rise",
        ("health", "rise"),
        metavar="N",
        help=f"good probes in a row that make an upstream healthy (default: {_GROUP.health.rise})",
    )
    upstream(
        health,
        "--health-fall",
        ("health", "fall"),
        metavar="N",
        help=f"failed probes in a row that make it unhealthy (default: {_GROUP.health.fall})",
    )
    upstream(
        health,
        "--eject-after",
        ("passive", "eject_after"),
        metavar="N",
        help="live connect errors or 5xx in a row that eject an upstream; 0 = never "
        f"(default: {_GROUP.passive.eject_after})",
    )
    upstream(
        health,
        "--eject-for",
        ("passive", "eject_for"),
        metavar="S",
        help="how long an ejected upstream gets no traffic "
        f"(default: {_seconds(_GROUP.passive.eject_for)})",
    )
    upstream(
        health,
        "--breaker-failures",
        ("breaker", "failures"),
        metavar="N",
        help="failures within --breaker-window that open an upstream's circuit; 0 = no "
        f"breaker (default: {_GROUP.breaker.failure_threshold})",
    )
    upstream(
        health,
        "--breaker-window",
        ("breaker", "window"),
        metavar="S",
        help=f"(default: {_seconds(_GROUP.breaker.window)})",
    )
    upstream(
        health,
        "--breaker-open-for",
        ("breaker", "open_for"),
        metavar="S",
        help="how long an open circuit stays open before trial requests "
        f"(default: {_seconds(_GROUP.breaker.open_for)})",
    )
    upstream(
        health,
        "--breaker-half-open",
        ("breaker", "half_open"),
        metavar="N",
        help=f"trial requests admitted while half-open (default: {_GROUP.breaker.half_open_max})",
    )
    upstream(
        health,
        "--breaker-successes",
        ("breaker", "successes"),
        metavar="N",
        help="trial successes that close the circuit again "
        f"(default: {_GROUP.breaker.success_threshold})",
    )
    upstream(
        health,
        "--retries",
        ("retry", "attempts"),
        metavar="N",
        help="extra attempts on other upstreams where safe; 0 = none "
        f"(default: {_GROUP.retry.attempts})",
    )
    upstream(
        health,
        "--retry-budget",
        ("retry", "budget"),
        metavar="RATIO",
        help=f"retries at most this share of recent requests (default: {_GROUP.retry.budget})",
    )
    upstream(
        health,
        "--retry-replay-limit",
        ("retry", "replay_limit"),
        metavar="BYTES",
        help="largest request body kept to be sent again on a retry "
        f"(default: {_bytes(_GROUP.retry.replay_limit)})",
    )
    admin = parser.add_argument_group("admin listener")
    flag(
        admin,
        "--admin-port",
        ("server", "admin", "port"),
        metavar="PORT",
        help="serve /health, /ping and /status on this port (default: off)",
    )
    flag(
        admin,
        "--admin-host",
        ("server", "admin", "host"),
        metavar="HOST",
        help=f"(default: {AdminSettings().host})",
    )
    upstream(
        parser,
        "--upstream-ca",
        ("tls", "ca"),
        metavar="FILE",
        help="CA bundle to verify https upstreams with (default: the system's)",
    )
    upstream(
        parser,
        "--insecure",
        ("tls", "verify"),
        action="store_const",
        const=False,
        help="do not verify https upstream certificates (never in production)",
    )
    tls = parser.add_argument_group("TLS termination (more in [server] tls of the config file)")
    flag(
        tls,
        "--certfile",
        ("server", "tls", "cert"),
        metavar="FILE",
        help="serve https with this certificate chain (PEM, leaf first); needs --keyfile",
    )
    flag(
        tls,
        "--keyfile",
        ("server", "tls", "key"),
        metavar="FILE",
        help="the private key (PEM) of --certfile",
    )
    observe = parser.add_argument_group("metrics and logs")
    flag(
        observe,
        "--metrics-path",
        ("server", "metrics_path"),
        metavar="PATH",
        help="also serve the Prometheus metrics at PATH on the proxy's own port, e.g. "
        "/metrics (always at /metrics on the admin port; default: not on the proxy port)",
    )
    flag(
        observe,
        "--no-metrics",
        ("server", "metrics"),
        action="store_const",
        const=False,
        help="keep no metrics and do not meter LLM streams",
    )
    flag(
        observe,
        "--metrics-buckets",
        ("server", "metrics_buckets"),
        metavar="S,S,...",
        help="bucket bounds of the duration histograms, in seconds (default: 0.001 ... 300)",
    )
    flag(
        observe,
        "--log-format",
        ("server", "log_format"),
        metavar="{text,json}",
        help=f"access log lines: text, or json (one object per line) "
        f"(default: {_SERVER.log_format})",
    )
    flag(
        observe,
        "--access-log",
        ("server", "access_log"),
        metavar="PATH",
        help="append the access log to this file instead of stderr; it never makes the "
        "proxy wait (default: stderr)",
    )
    websocket = parser.add_argument_group("WebSocket tunnels")
    flag(
        websocket,
        "--ws-max-message-size",
        ("server", "ws_max_message_size"),
        metavar="BYTES",
        help="largest WebSocket message relayed, either way; a larger one closes the tunnel "
        f"with 1009 (default: {_bytes(_SERVER.ws_max_message_size)})",
    )
    flag(
        websocket,
        "--ws-idle-timeout",
        ("server", "ws_idle_timeout"),
        metavar="S",
        help="close a WebSocket tunnel (1001) after S seconds with no data either way; "
        f"0 = never (default: {_seconds(_SERVER.ws_idle_timeout)})",
    )
    return parser


def sources_from_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> ConfigSources:
    """What the command line says to read the configuration from (see ``build_parser``)."""
    flags: dict[str, _Flag] = getattr(parser, "flags", {})
    cli = [
        CliValue(f"--{dest.replace('_', '-')}", flag.path, getattr(args, dest), flag.every_group)
        for dest, flag in flags.items()
        if hasattr(args, dest)
    ]
    upstreams: list[tuple[str, str]] = getattr(args, "upstream", [])
    if upstreams:
        texts = [text for _, text in upstreams]
        cli.append(CliValue(upstreams[0][0], ("upstreams", "default", "servers"), texts))
    return ConfigSources(
        config_file=getattr(args, "config", None),
        env_file=getattr(args, "env_file", None),
        environ=dict(os.environ if environ is None else environ),
        cwd=os.getcwd() if cwd is None else cwd,
        cli=tuple(cli),
        watch=getattr(args, "watch", False),
    )


def _exit_with(error: ConfigError) -> NoReturn:
    for line in error.errors:
        print(line, file=sys.stderr)
    sys.exit(2)


def config_from_args(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Config:
    """The configuration the command line, the environment (``os.environ`` by default),
    ``.env`` and the file say, layered; exits 2 with a line per problem if it is bad."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return load_config(sources_from_args(parser, args, environ, cwd))
    except ConfigError as exc:
        _exit_with(exc)


def summary(config: Config) -> str:
    """``--check-config``'s line for a good configuration."""
    return (
        f"config OK: {len(config.routes)} routes, {len(config.upstreams)} upstream groups, "
        f"{config.servers()} servers"
    )


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


async def _main(
    config: Config, sources: ConfigSources, worker: WorkerSettings | None = None
) -> int:
    from trioproxy.server.listener import ProxyServer, announce

    async with trio.open_nursery() as nursery:
        if config.server.demo:
            from trioproxy.demo import run_demo_upstreams

            urls = await run_demo_upstreams(nursery)
            config = with_demo_servers(config, urls)
            sources = attrs.evolve(sources, demo_urls=tuple(urls))
        watch = (
            [path for path in (config.source, _env_file(sources)) if path] if config.watch else []
        )
        load: Callable[[], Config] = lambda: _reload(sources)  # noqa: E731
        if worker is not None:
            load = worker_loader(load, worker)
        server = ProxyServer(
            config,
            load=load,
            watch=watch,
            reuse_port=worker is not None and not worker.listen_fds,
            sockets=worker.sockets() if worker is not None else (),
        )
        try:
            await server.bind()
        except OSError as exc:
            host, port = config.server.host, config.server.port
            print(
                f"trioproxy: cannot listen on {host}:{port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            nursery.cancel_scope.cancel()
            return 1
        tune_gc()
        addresses = await nursery.start(server.run)
        if worker is None:
            announce(addresses, server.scheme)
        else:
            nursery.start_soon(report_ready, worker, server.admin_addresses, server.shutdown)
        await server.wait_stopped()
        nursery.cancel_scope.cancel()
    return 0


def with_demo_servers(config: Config, urls: Sequence[str]) -> Config:
    """``config`` with the built-in demo upstreams added to its group ``default``."""
    demo = tuple(TargetSpec(url=UpstreamURL.parse(url)) for url in urls)
    group = config.upstreams["default"]
    upstreams = {**config.upstreams, "default": attrs.evolve(group, servers=group.servers + demo)}
    return attrs.evolve(config, upstreams=upstreams)


def _reload(sources: ConfigSources) -> Config:
    """The config read again from the same sources (the file, .env, the environment
    as it was at start, the flags), the demo upstreams kept."""
    config = load_config(sources)
    if sources.demo_urls:
        config = with_demo_servers(config, sources.demo_urls)
    return config


def _env_file(sources: ConfigSources) -> str | None:
    path = sources.env_file or os.path.join(sources.cwd, ".env")
    return path if os.path.exists(path) else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = sources_from_args(parser, args)
    try:
        config = load_config(sources)
        # What is only found wrong when made live (the router's rules, a body
        # transform's import) is found now too, before anything is bound.
        build_snapshot(config)
    except ConfigError as exc:
        _exit_with(exc)
    if getattr(args, "check_config", False):
        print(summary(config))
        sys.exit(0)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    worker = WorkerSettings.from_environ(os.environ)
    if worker is not None:
        config = worker_config(config, worker)
        log_format = worker.log_format()
        access.set_worker(worker.id)
        if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from trioproxy.observe.fleet import install_worker_values

            install_worker_values(directory, worker.id)
    log_output.install(config.server.log_level, log_format)
    access.set_format(config.server.log_format)
    try:
        log_output.install_access(config.server.access_log, config.server.log_format, log_format)
    except OSError as exc:
        print(
            f"--access-log: cannot open {config.server.access_log!r}: {exc.strerror}",
            file=sys.stderr,
        )
        sys.exit(2)
    status = 0
    if worker is None and config.server.workers > 1:
        from trioproxy.server.supervisor import Supervisor

        files = (config.source, _env_file(sources))
        watch = [path for path in files if path] if config.watch else []
        supervisor = Supervisor(
            config,
            load=lambda: _reload(sources),
            argv=sys.argv[1:] if argv is None else list(argv),
            watch=watch,
        )
        try:
            status = trio.run(supervisor.run)
        except* KeyboardInterrupt:
            status = 0
        sys.exit(status)
    try:
        status = trio.run(_main, config, sources, worker)
    except* KeyboardInterrupt:
        # Ctrl-C before the signal handlers are in place (nurseries wrap it).
        status = 0
    sys.exit(status)


if __name__ == "__main__":
    main()
