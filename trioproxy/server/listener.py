"""The proxy listener: accept loop, connection handlers, signals and drain.

Lifetimes (see DESIGN.md)::

    serve(config)
    └─ root nursery
       ├─ signal watcher (SIGTERM/SIGINT → drain)
       ├─ engine (stream hub, health probers of the upstream groups)
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
import socket
from collections.abc import Callable, Sequence

import trio

from trioproxy.admin import AdminApp, serve_admin
from trioproxy.config.errors import ConfigError
from trioproxy.config.model import Config, ServerSettings
from trioproxy.edge.limits import EdgeService
from trioproxy.edge.redirect import serve_redirect
from trioproxy.edge.tls import CertificateError, TLSTerminator, handshake
from trioproxy.engine import Engine
from trioproxy.observe.observer import Observer
from trioproxy.server.connection import ClientConnection, ServerState, peer_host
from trioproxy.server.reuseport import as_listeners, bind_sockets
from trioproxy.server.watch import watch_files
from trioproxy.snapshot import build_snapshot
from trioproxy.sockets import ACCEPT_BATCH, CAPACITY_ERRNOS, FastSocketStream, ReadyAcceptor

log = logging.getLogger("trioproxy.server")


class ProxyServer:
    """A listening proxy: ``await run(task_status=...)`` serves until drained.

    Args:
        config: what to serve.
        load: reads and validates the config again (the file, ``.env``, the
            environment, the command line) for a reload on SIGHUP or on a change
            of a ``watch`` file; raises ConfigError. None: no reload.
        watch: files whose change triggers a reload (``--watch``).
    """

    def __init__(
        self,
        config: Config,
        *,
        load: Callable[[], Config] | None = None,
        watch: Sequence[str] = (),
        reuse_port: bool = False,
        sockets: Sequence[socket.socket] = (),
    ) -> None:
        self.config = config
        #: A worker of several (``trioproxy.server.supervisor``): bind with
        #: ``SO_REUSEPORT`` (``reuse_port``), or serve the listening ``sockets``
        #: the supervisor made and this process inherited.
        self._reuse_port = reuse_port
        self._inherited = list(sockets)
        #: Where the admin listener is, once ``run`` has started it.
        self.admin_addresses: list[tuple[str, int]] = []
        self._load = load
        self._watch = tuple(watch)
        self._reloading = trio.Lock()
        server = config.server
        self.engine = Engine()
        #: Runs the Redis store of rate limits, if the config has one.
        self.edge = EdgeService()
        #: Made live now (not in ``run``), so that a bad value is found before binding.
        self.snapshot = build_snapshot(config)
        self.state = ServerState(self.engine)
        self.state.configure(server)
        #: TLS termination (``[server] tls``), None for plain HTTP.
        self.tls = TLSTerminator(server.tls) if server.tls is not None else None
        if self.tls is not None:
            self.state.scheme = "https"
        self._redirect_listeners: list[trio.SocketListener] = []
        if server.metrics:
            # The engine's observer: metrics (with gauges read from the live
            # snapshot and this listener when scraped) and the LLM meter.
            engine = self.engine
            observer = engine.observer = Observer(server)
            observer.bind(
                lambda: engine.snapshot,
                lambda: engine.current_time(),
                lambda: {"proxy": self.state.open_connections},
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
            server = self.config.server
            redirect = server.tls.redirect_http if server.tls is not None else None
            if self._inherited:
                self._listeners = as_listeners(self._inherited)
            elif self._reuse_port:
                self._listeners = as_listeners(
                    bind_sockets(server.host, server.port, reuse_port=True)
                )
            else:
                self._listeners = await trio.open_tcp_listeners(server.port, host=server.host)
            if redirect is not None and self._reuse_port:
                self._redirect_listeners = as_listeners(
                    bind_sockets(redirect.host or server.host, redirect.port, reuse_port=True)
                )
            elif redirect is not None:
                self._redirect_listeners = await trio.open_tcp_listeners(
                    redirect.port, host=redirect.host or server.host
                )
        return [_address(listener) for listener in self._listeners]

    @property
    def scheme(self) -> str:
        """``https`` with TLS termination, else ``http``."""
        return self.state.scheme

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
        server = self.config.server
        addresses = await self.bind()
        assert self._listeners is not None
        listeners = self._listeners
        try:
            async with trio.open_nursery() as root:
                if handle_signals:
                    # Installed before we report ready: a signal sent as soon as
                    # "listening on" is read must drain, not kill.
                    await root.start(self._watch_signals, root.cancel_scope)
                # The engine (stream hub, health probers) outlives every
                # connection handler; the first round of probes ends before the
                # first accept.
                await root.start(self.engine.run)
                await root.start(self.edge.run)
                await self.edge.activate(self.snapshot.edge)
                await self.engine.activate(self.snapshot)
                if self._watch and self._load is not None:
                    changed = "config file changed, reloading"
                    root.start_soon(watch_files, self._watched, self.reload, changed)
                if server.admin is not None:
                    admin = await root.start(
                        serve_admin,
                        AdminApp(self.engine),
                        server.admin.host,
                        server.admin.port,
                    )
                    self.admin_addresses = admin
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
                                for plain in self._redirect_listeners:
                                    accepting.start_soon(
                                        self._redirect_loop, plain, addresses[0][1], handlers
                                    )
                                    log.info("redirecting %s to https", format_url(_address(plain)))
                                task_status.started(addresses)
                    finally:
                        for ready in readies:
                            ready.close()
                    # Draining: no more accepts.
                    for listener in [*listeners, *self._redirect_listeners]:
                        await trio.aclose_forcefully(listener)
                    log.info(
                        "draining %d connection(s), grace %.1f s",
                        self.state.open_connections,
                        server.grace,
                    )
                    self.state.drain()
                    handlers.cancel_scope.deadline = trio.current_time() + server.grace
                root.cancel_scope.cancel()
        finally:
            for listener in [*listeners, *self._redirect_listeners]:
                await trio.aclose_forcefully(listener)
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

    async def _redirect_loop(
        self, listener: trio.SocketListener, https_port: int, handlers: trio.Nursery
    ) -> None:
        """``tls.redirect_http``: every connection gets its 308 (trioproxy.edge.redirect)."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in CAPACITY_ERRNOS:
                    log.error("accept: %s; retrying in 100 ms", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            handlers.start_soon(self._serve_redirect, stream, https_port)

    async def _serve_redirect(self, stream: trio.SocketStream, https_port: int) -> None:
        state = self.state
        try:
            await serve_redirect(
                stream,
                https_port=https_port,
                header_timeout=state.header_timeout,
                protocol_factory=state.protocol_factory,
                max_header_size=state.max_header_size,
            )
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: FastSocketStream) -> None:
        if self.tls is not None:
            await self._serve_tls(stream, self.tls)
            return
        try:
            await ClientConnection(stream, self.state).serve()
        except Exception:
            # A bug must cost one connection, not the server: log it for the
            # operator (the client only sees its connection close).
            log.exception("connection handler failed")

    async def _serve_tls(self, stream: FastSocketStream, tls: TLSTerminator) -> None:
        """The TLS handshake, then the connection; the header timeout runs from the
        accept to the end of the first request head (see ``trioproxy.edge.tls``)."""
        deadline = trio.current_time() + self.state.header_timeout
        try:
            peer = peer_host(stream)
            tls_stream = await handshake(stream, tls.context, deadline=deadline, peer=peer)
            if tls_stream is None:
                return
            connection = ClientConnection(tls_stream, self.state, head_deadline=deadline)
            await connection.serve()
        except Exception:
            log.exception("connection handler failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def reload(self) -> bool:
        """Read the config again and serve it from the next request on.

        An invalid config changes nothing: one error line is logged, and the
        old config keeps serving. Exchanges under way finish on the snapshot
        they started with (see ``trioproxy.snapshot``). Listener settings
        (host, port) need a restart: the log says so, and the rest is applied.

        Returns:
            Whether the new config is served.
        """
        if self._load is None:
            log.warning("reload: this server was not given a way to read its config again")
            return False
        async with self._reloading:
            engine = self.engine
            previous = engine.snapshot
            generation = (previous.generation if previous is not None else 0) + 1
            try:
                config = self._load()
                snapshot = build_snapshot(config, previous, generation=generation)
            except ConfigError as exc:
                lines = str(exc).splitlines() or [repr(exc)]
                more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
                engine.config_error = f"{lines[0]}{more}"
                log.error("reload refused, the config in use stays: %s", engine.config_error)
                if engine.observer is not None:
                    engine.observer.reloaded(None, ok=False)
                return False
            old, new = self.config.server, config.server
            if (old.host, old.port) != (new.host, new.port):
                log.warning(
                    "reload: listening on %s:%s needs a restart (still on %s:%s)",
                    new.host,
                    new.port,
                    old.host,
                    old.port,
                )
            self._reload_tls(old, new)
            if _observing(old) != _observing(new):
                log.warning(
                    "reload: metrics, metrics_buckets, log_format and access_log are taken "
                    "at start; a restart applies the new ones"
                )
            self.state.configure(new)
            await self.edge.activate(snapshot.edge)
            await engine.activate(snapshot)
            self.config = config
            engine.config_error = None
            if engine.observer is not None:
                engine.observer.reloaded(snapshot, ok=True)
            log.info(
                "config reloaded (generation %d): %d routes, %d upstream groups",
                generation,
                len(snapshot.routes),
                len(snapshot.groups),
            )
            return True

    def _reload_tls(self, old: ServerSettings, new: ServerSettings) -> None:
        """New certificates from the next handshake on; turning TLS on or off, or
        moving the redirect listener, needs a restart (the log says so)."""
        if (old.tls is None) != (new.tls is None) or (
            old.tls is not None
            and new.tls is not None
            and old.tls.redirect_http != new.tls.redirect_http
        ):
            log.warning("reload: turning TLS or redirect_http on or off needs a restart")
        if self.tls is not None and new.tls is not None:
            try:
                self.tls.reload(new.tls)
            except CertificateError as exc:  # checked by the loader; changed since
                log.error("reload: certificates kept, the new ones cannot be used: %s", exc)
            else:
                log.info("TLS certificates reloaded")

    def _watched(self) -> Sequence[str]:
        """The files ``--watch`` polls: the config's own (and ``.env``), and those the
        config names (certificates, API key files: ``Config.files_read``)."""
        return (*self._watch, *self.config.files_read())

    async def _watch_signals(
        self,
        root: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """First SIGTERM/SIGINT drains; a second one stops at once. SIGHUP reloads."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async with trio.open_nursery() as reloads:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP, reloading the config")
                        reloads.start_soon(self.reload)
                        continue
                    self._on_stop_signal(signum, root)
                    if root.cancel_called:
                        return

    def _on_stop_signal(self, signum: int, root: trio.CancelScope) -> None:
        name = signal.Signals(signum).name
        if self._accepting.cancel_called:
            log.warning("received %s again, stopping now", name)
            root.cancel()
            return
        log.info("received %s, draining", name)
        self.shutdown()


def _observing(server: ServerSettings) -> tuple[object, ...]:
    """The ``[server]`` keys of metrics and logs that a reload cannot change."""
    return (server.metrics, server.metrics_buckets, server.log_format, server.access_log)


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    host, port = listener.socket.getsockname()[:2]
    return str(host), int(port)


def format_url(address: tuple[str, int], scheme: str = "http") -> str:
    host, port = address
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def announce(addresses: Sequence[tuple[str, int]], scheme: str = "http") -> None:
    """The one start line scripts read to learn the port; flushed at once."""
    print(f"listening on {format_url(addresses[0], scheme)}", flush=True)
    for address in addresses[1:]:
        log.info("also listening on %s", format_url(address, scheme))
