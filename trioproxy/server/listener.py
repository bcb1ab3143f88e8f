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
from collections.abc import Sequence

import trio

from trioproxy.admin import AdminApp, serve_admin
from trioproxy.config.model import Config
from trioproxy.engine import Engine
from trioproxy.http.parsers import server_factory
from trioproxy.server.connection import ClientConnection, ServerState
from trioproxy.server.websocket import WebSocketSettings
from trioproxy.snapshot import build_snapshot
from trioproxy.sockets import ACCEPT_BATCH, CAPACITY_ERRNOS, FastSocketStream, ReadyAcceptor

log = logging.getLogger("trioproxy.server")


class ProxyServer:
    """A listening proxy: ``await run(task_status=...)`` serves until drained."""

    def __init__(self, config: Config) -> None:
        self.config = config
        server = config.server
        self.engine = Engine()
        #: Made live now (not in ``run``), so that a bad value is found before binding.
        self.snapshot = build_snapshot(config)
        self.state = ServerState(
            self.engine,
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            keepalive_timeout=server.keepalive_timeout,
            max_header_size=server.max_header_size,
            protocol_factory=server_factory(server.http),
            websocket=WebSocketSettings(
                max_message_size=server.ws_max_message_size,
                idle_timeout=server.ws_idle_timeout or None,
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
            server = self.config.server
            self._listeners = await trio.open_tcp_listeners(server.port, host=server.host)
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
                await self.engine.activate(self.snapshot)
                if server.admin is not None:
                    admin = await root.start(
                        serve_admin,
                        AdminApp(self.engine),
                        server.admin.host,
                        server.admin.port,
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
                        server.grace,
                    )
                    self.state.drain()
                    handlers.cancel_scope.deadline = trio.current_time() + server.grace
                root.cancel_scope.cancel()
        finally:
            for listener in listeners:
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
