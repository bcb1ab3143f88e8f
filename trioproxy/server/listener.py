"""The proxy listener: accept loop, connection handlers, signals and drain.

Lifetimes (see DESIGN.md)::

    serve(config)
    └─ root nursery
       ├─ signal watcher (SIGTERM/SIGINT → drain)
       ├─ stream hub (relays the streamed response bodies of every connection)
       └─ handler nursery ─ one task per client connection
          (the accept loops run in their own cancel scope, so that draining is
           "stop accepting, then put a deadline on the handler nursery", as
           hypercorn does it)

Drain: stop accepting and close the listening sockets; idle keep-alive
connections close at once; busy ones finish their exchange (with
``Connection: close``) until ``grace`` seconds have passed, when whatever is
left is cancelled and closed.
"""

from __future__ import annotations

import logging
import signal
import ssl
from collections.abc import Sequence

import trio

from trioproxy.admin import AdminApp, serve_admin
from trioproxy.balance.balancer import Balancer, BreakerSettings
from trioproxy.balance.health import HealthService, HealthSettings
from trioproxy.balance.retry import RetryBudget, RetryPolicy
from trioproxy.balance.strategies import make_strategy
from trioproxy.balance.target import Target
from trioproxy.config import Config
from trioproxy.engine import Engine
from trioproxy.http.parsers import client_factory, server_factory
from trioproxy.relay_hub import StreamHub
from trioproxy.server.connection import ClientConnection, ServerState
from trioproxy.server.websocket import WebSocketSettings
from trioproxy.sockets import ACCEPT_BATCH, CAPACITY_ERRNOS, FastSocketStream, ReadyAcceptor
from trioproxy.upstream.pool import UpstreamPool

log = logging.getLogger("trioproxy.server")


def make_ssl_context(config: Config) -> ssl.SSLContext:
    """Client-side TLS for https upstreams: verification on unless ``insecure``."""
    context = ssl.create_default_context(cafile=config.upstream_ca)
    if config.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def build_balancer(config: Config) -> Balancer:
    return Balancer(
        [Target(spec) for spec in config.upstreams],
        strategy=make_strategy(config.strategy),
        eject_after=config.eject_after,
        eject_for=config.eject_for,
        breaker_settings=BreakerSettings(
            failure_threshold=config.breaker_failures,
            window=config.breaker_window,
            open_for=config.breaker_open_for,
            half_open_max=config.breaker_half_open,
            success_threshold=config.breaker_successes,
        ),
    )


def build_engine(config: Config) -> Engine:
    needs_tls = any(spec.url.origin.tls for spec in config.upstreams)
    pool = UpstreamPool(
        connect_timeout=config.connect_timeout,
        pool_timeout=config.pool_timeout,
        idle_timeout=config.upstream_idle_timeout,
        max_per_origin=config.max_connections_per_upstream,
        max_head_size=config.max_header_size,
        ssl_context=make_ssl_context(config) if needs_tls else None,
        protocol_factory=client_factory(config.http),
    )
    return Engine(
        balancer=build_balancer(config),
        pool=pool,
        read_timeout=config.read_timeout,
        preserve_host=config.preserve_host,
        retry=RetryPolicy(max_attempts=config.retries + 1, replay_limit=config.retry_replay_limit),
        budget=RetryBudget(ratio=config.retry_budget),
    )


def build_health(config: Config, engine: Engine) -> HealthService:
    balancer = engine.balancer
    return HealthService(
        engine.balancer.targets,
        HealthSettings(
            enabled=config.health_check,
            method=config.health_method.encode("ascii"),
            path=config.health_path,
            expect=config.health_expect,
            interval=config.health_interval,
            timeout=config.health_timeout,
            rise=config.health_rise,
            fall=config.health_fall,
        ),
        ssl_context=engine.pool.ssl_context,
        protocol_factory=engine.pool.protocol_factory,
        on_recovered=lambda target: balancer.reinstate(target, trio.current_time()),
        status_hint="set --health-path (or health_path= per upstream) and --health-expect "
        "to the statuses it answers",
    )


class ProxyServer:
    """A listening proxy: ``await run(task_status=...)`` serves until drained."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = build_engine(config)
        self.health = build_health(config, self.engine)
        self.state = ServerState(
            self.engine,
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            keepalive_timeout=config.keepalive_timeout,
            max_header_size=config.max_header_size,
            max_body_size=config.max_body_size,
            protocol_factory=server_factory(config.http),
            websocket=WebSocketSettings(
                max_message_size=config.ws_max_message_size,
                idle_timeout=config.ws_idle_timeout or None,
            ),
        )
        self._accepting = trio.CancelScope()
        self._stopped = trio.Event()
        self._listeners: list[trio.SocketListener] | None = None

    async def bind(self) -> list[tuple[str, int]]:
        """Open the listening sockets (before ``run``, to report errors early).

        Raises:
            OSError: the address is in use, not available, or not permitted.
        """
        if self._listeners is None:
            self._listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        return [_address(listener) for listener in self._listeners]

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def shutdown(self) -> None:
        """Begin draining (idempotent)."""
        self._accepting.cancel()

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        config = self.config
        # The hot path reads the clock ~7 times per request. trio.current_time()
        # is the run's clock.current_time() behind KI protection and a run-context
        # lookup (~2.1k instructions; ~0.65k for the clock's own method): take the
        # method once per run. Same clock, same readings (and tests' MockClock too).
        engine = self.engine
        engine.current_time = engine.pool.current_time = trio.lowlevel.current_clock().current_time
        addresses = await self.bind()
        assert self._listeners is not None
        listeners = self._listeners
        try:
            async with trio.open_nursery() as root:
                if handle_signals:
                    # Installed before we report ready: a signal sent as soon as
                    # "listening on" is read must drain, not kill.
                    await root.start(self._watch_signals, root.cancel_scope)
                # Streamed response bodies are relayed by this one task (see
                # trioproxy/relay_hub.py); it outlives every connection handler.
                hub = StreamHub()
                await root.start(hub.run)
                self.engine.hub = hub
                if config.health_check and self.engine.balancer.targets:
                    # The first round of probes ends before the first accept.
                    await root.start(self.health.run)
                if config.admin_port is not None:
                    admin = await root.start(
                        serve_admin,
                        AdminApp(self.engine.balancer),
                        config.admin_host,
                        config.admin_port,
                    )
                    log.info("admin listening on %s", format_url(admin[0]))
                async with trio.open_nursery() as handlers:
                    # Opened before "listening on" is reported (a process measured from
                    # then on sees its descriptors from the start), closed before the
                    # listeners are (see ReadyAcceptor).
                    readies = [ReadyAcceptor(listener) for listener in listeners]
                    try:
                        with self._accepting:
                            async with trio.open_nursery() as accepting:
                                for listener, ready in zip(listeners, readies, strict=True):
                                    accepting.start_soon(
                                        self._accept_loop, listener, ready, handlers
                                    )
                                task_status.started(addresses)
                    finally:
                        for ready in readies:
                            ready.close()
                    # Draining: no more accepts.
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
                    log.info(
                        "draining %d connection(s), grace %.1f s",
                        self.state.open_connections,
                        config.grace,
                    )
                    self.state.drain()
                    handlers.cancel_scope.deadline = trio.current_time() + config.grace
                root.cancel_scope.cancel()
        finally:
            self.engine.hub = None
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            await self.engine.pool.aclose()
            self._stopped.set()
        log.info("stopped")

    async def _accept_loop(
        self, listener: trio.SocketListener, ready: ReadyAcceptor, handlers: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = FastSocketStream.adopt(await listener.accept())
                handlers.start_soon(self._serve_connection, stream)
                # The rest of a burst in this pass (see ReadyAcceptor).
                for _ in range(ACCEPT_BATCH):
                    if (more := ready.accept_nowait()) is None:
                        break
                    handlers.start_soon(self._serve_connection, more)
            except OSError as exc:
                if exc.errno in CAPACITY_ERRNOS:
                    log.error("accept: %s; retrying in 100 ms", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise

    async def _serve_connection(self, stream: FastSocketStream) -> None:
        try:
            await ClientConnection(stream, self.state).serve()
        except Exception:
            # A bug must cost one connection, not the server: log it for the
            # operator (the client only sees its connection close).
            log.exception("connection handler failed")

    async def _watch_signals(
        self,
        root: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """First SIGTERM/SIGINT drains; a second one stops at once."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._accepting.cancel_called:
                    log.warning("received %s again, stopping now", name)
                    root.cancel()
                    return
                log.info("received %s, draining", name)
                self.shutdown()


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    host, port = listener.socket.getsockname()[:2]
    return str(host), int(port)


def format_url(address: tuple[str, int]) -> str:
    host, port = address
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def announce(addresses: Sequence[tuple[str, int]]) -> None:
    """The one start line scripts read to learn the port; flushed at once."""
    print(f"listening on {format_url(addresses[0])}", flush=True)
    for address in addresses[1:]:
        log.info("also listening on %s", format_url(address))
