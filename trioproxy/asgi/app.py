"""The proxy as an ASGI app: ``hypercorn --worker-class trio trioproxy.asgi:app``.

The same engine, routes, transforms, balancing, retries, breakers, edge rules
(client identity, access rules, API keys, rate limits, in-flight caps),
metrics, LLM meter, admin endpoints and access log as ``python -m trioproxy``,
with hypercorn as the front end (and so HTTP/2 and TLS to clients from
hypercorn's own stack). The steps around the engine are the standalone
server's, in ``trioproxy.front``; this module only writes their answers as
ASGI messages::

    ASGI server ─► ProxyApp ─► FrontExchange ─► Engine.handle(head, route, AsgiDownstream)
                    │          (trioproxy.front) Engine.handle_websocket(..., AsgiWebSocket)
                    └─ lifespan: Engine.run and the Redis store (EdgeService) in a
                       nursery, the Observer, activate(snapshot); shutdown drains

``app`` reads its configuration as the CLI does, at lifespan startup:
``TRIOPROXY_CONFIG`` (the TOML file), the ``TRIOPROXY_*`` variables and
``.env`` in the working directory. ``create_app(config)`` takes a
:class:`~trioproxy.config.Config` or the path of a TOML file instead.

The engine runs only between lifespan startup and shutdown: a request that
comes without them (a server run with lifespan off) gets 503. hypercorn's trio
worker is required: the engine is trio code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs
import trio

from trioproxy.admin import AdminApp, serve_admin
from trioproxy.config.errors import ConfigError
from trioproxy.config.load import ConfigSources, load_config
from trioproxy.config.model import Config, ServerSettings
from trioproxy.edge.limits import EdgeService
from trioproxy.engine import Engine
from trioproxy.errors import ClientDisconnected, ProxyError, UpstreamBrokenMidBody
from trioproxy.front import FrontExchange
from trioproxy.http.answers import error_answer
from trioproxy.observe import access, log_output
from trioproxy.observe.observer import Observer
from trioproxy.snapshot import Snapshot, build_snapshot

from .http import (
    AsgiDownstream,
    ResponseAborted,
    answer_error,
    refuse_connect,
    relay,
    request_head,
)
from .types import Receive, Scope, Send
from .websocket import INTERNAL_ERROR, AsgiWebSocket

log = logging.getLogger("trioproxy.asgi")

#: The close code (before accept, where the server cannot send an HTTP answer) for
#: each status the proxy answers a WebSocket handshake with itself.
_CLOSE_CODES = {503: 1013, 502: 1014, 504: 1014}


class NotStarted(ProxyError):
    """A request came before lifespan startup (or after shutdown)."""

    status = 503
    reason = "proxy not started (the ASGI server must run the lifespan)"
    headers = ((b"retry-after", b"1"),)


def load_environment_config(cwd: str | None = None) -> Config:
    """The configuration as ``python -m trioproxy`` with no flags reads it:
    ``TRIOPROXY_CONFIG``, the ``TRIOPROXY_*`` variables and ``./.env``.

    Raises:
        ConfigError: one line per problem.
    """
    return load_config(ConfigSources(environ=dict(os.environ), cwd=cwd or os.getcwd()))


@attrs.define(eq=False)
class ProxyApp:
    """The ASGI 3 application; see the module docstring.

    Args:
        config: a Config, the path of a TOML file, or None to read the
            environment (``TRIOPROXY_CONFIG``, ``TRIOPROXY_*``, ``.env``) at
            lifespan startup.
    """

    config: Config | str | os.PathLike[str] | None = None
    engine: Engine = attrs.Factory(lambda: Engine(use_hub=False))
    #: Runs the Redis store of rate limits, if the config has one.
    edge: EdgeService = attrs.Factory(EdgeService)
    #: Exchanges and tunnels under way (for the drain at shutdown).
    inflight: int = 0
    _idle: trio.Event | None = None
    _loaded: Config | None = None
    #: ``[server] metrics_path``, taken at start (None: not served).
    _metrics_path: bytes | None = None

    # --- ASGI ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # --- lifespan ------------------------------------------------------------------

    def load(self) -> Config:
        """The configuration this app serves (read once).

        Raises:
            ConfigError.
        """
        if self._loaded is None:
            config = self.config
            if config is None:
                self._loaded = load_environment_config()
            elif isinstance(config, Config):
                self._loaded = config
            else:
                path = Path(config)
                self._loaded = load_config(
                    ConfigSources(config_file=str(path), environ=dict(os.environ), cwd=os.getcwd())
                )
        return self._loaded

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        try:
            config = self.load()
            snapshot = build_snapshot(config)
        except ConfigError as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        try:
            install_logging(config.server)
        except OSError as exc:
            why = f"access_log: cannot open {config.server.access_log!r}: {exc.strerror}"
            await send({"type": "lifespan.startup.failed", "message": why})
            return
        failed = ""
        async with trio.open_nursery() as nursery:
            try:
                await self.start(nursery, snapshot)
            except OSError as exc:
                # The admin listener's address is taken: fail the startup rather
                # than let the server go on without the lifespan, where every
                # request gets 503 (a second hypercorn worker on a fixed admin port).
                failed = f"cannot start the admin listener: {exc}"
            else:
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                await self.drain(config.server.grace)
            nursery.cancel_scope.cancel()
        if failed:
            await send({"type": "lifespan.startup.failed", "message": failed})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def start(self, nursery: trio.Nursery, snapshot: Snapshot) -> None:
        """Start the engine service in ``nursery`` and serve ``snapshot`` (the
        lifespan does this; code that runs its own nursery may call it).

        As ``python -m trioproxy`` does: the engine's observer (metrics and the LLM
        meter, unless ``[server] metrics = false``), the rate limits' Redis store
        (``[server] redis``), ``[server] metrics_path`` and the admin listener.

        Raises:
            OSError: the admin listener cannot listen on its address.
        """
        server = snapshot.config.server
        engine = self.engine
        if server.metrics and engine.observer is None:
            observer = engine.observer = Observer(server)
            # No trioproxy_open_connections{listener} sample: the ASGI server owns
            # the connections and does not tell the app about them (a scope is a
            # request, an HTTP/2 connection carries many), so any count made here
            # would be of something else.
            observer.bind(lambda: engine.snapshot, lambda: engine.current_time(), dict)
        path = server.metrics_path
        self._metrics_path = path.encode() if path is not None else None
        await nursery.start(engine.run)
        await nursery.start(self.edge.run)
        await self.edge.activate(snapshot.edge)
        await engine.activate(snapshot)
        admin = server.admin
        if admin is not None:
            addresses = await nursery.start(serve_admin, AdminApp(engine), admin.host, admin.port)
            host, port = addresses[0]
            log.info("admin listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the exchanges and tunnels under way."""
        with trio.move_on_after(grace):
            while self.inflight:
                self._idle = trio.Event()
                await self._idle.wait()

    def _enter(self) -> None:
        self.inflight += 1

    def _leave(self) -> None:
        self.inflight -= 1
        if not self.inflight and self._idle is not None:
            self._idle.set()

    # --- HTTP ----------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = request_head(scope)
        downstream = AsgiDownstream(scope, receive, send)
        downstream.note_framing(head)
        exchange = FrontExchange(
            self.engine, head, peer=downstream.client_addr, scheme=downstream.scheme
        )
        record = exchange.record
        note = ""
        self._enter()
        try:
            if self.engine.snapshot is None:
                raise NotStarted()
            if (refused := refuse_connect(head)) is not None:
                raise refused
            answer = exchange.admit(self._metrics_path)
            downstream.body_limit = exchange.body_limit
            if answer is None:
                # Before any upstream is picked: a refused request reaches none.
                await exchange.admit_limits(trio.current_time())
                answer = exchange.own_answer(trio.current_time())
            if answer is not None:
                while await downstream.receive_body():
                    pass  # the request's body is read and dropped: it goes nowhere
                record.status = answer.status
                await downstream.answer(answer)
                record.bytes_out = len(answer.body)
            else:
                with exchange.upstream() as route:
                    note = await relay(self.engine, exchange.request, route, downstream, record)
        except ClientDisconnected:
            record.status = record.status or 499
            note = "client gone"
        except ProxyError as exc:
            await answer_error(downstream, exc, record)
            note = exc.detail
        except ResponseAborted:
            note = "aborted"  # as the standalone server logs a body cut short
            raise
        finally:
            self._leave()
            exchange.release()
            exchange.end(note, bytes_in=downstream.received)

    # --- WebSocket -----------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = request_head(scope)
        snapshot = self.engine.snapshot
        server = snapshot.config.server if snapshot is not None else None
        client = AsgiWebSocket(
            scope,
            receive,
            send,
            max_message_size=server.ws_max_message_size if server is not None else 1 << 24,
            idle_timeout=(server.ws_idle_timeout or None) if server is not None else None,
        )
        exchange = FrontExchange(self.engine, head, peer=client.client_addr, scheme=client.scheme)
        record = exchange.record
        note = ""
        self._enter()
        try:
            await client.connect()
            if snapshot is None:
                raise NotStarted()
            answer = exchange.admit(self._metrics_path)
            if answer is None:
                await exchange.admit_limits(trio.current_time())
                answer = exchange.own_answer(trio.current_time())
            if answer is not None:
                record.status = answer.status
                await client.refuse(answer, 1008)
                return
            with exchange.upstream(tunnel=True) as route:
                subprotocols = [str(p) for p in scope.get("subprotocols") or ()]
                note = (
                    await self.engine.handle_websocket(
                        exchange.request, route, client, record, subprotocols
                    )
                    or ""
                )
                record.bytes_out = client.bytes_out
        except ClientDisconnected:
            record.status = record.status or 499
            note = "client gone"
        except UpstreamBrokenMidBody as exc:
            note = exc.detail  # a refusal's body broke off: the server ends the response
        except ProxyError as exc:
            record.status = exc.status
            note = exc.detail
            if not client.answered:
                answer = error_answer(exc, request_id=record.request_id)
                await client.refuse(answer, _CLOSE_CODES.get(exc.status, 1008))
            elif client.accepted:
                await client.close(INTERNAL_ERROR, exc.reason)
        finally:
            self._leave()
            exchange.release()
            exchange.end(note)


def install_logging(server: ServerSettings) -> None:
    """The log as ``python -m trioproxy`` writes it: to stderr without blocking,
    unless the embedding process set up logging already; the access log in
    ``log_format`` (text or JSON), to ``access_log`` if set.

    Raises:
        OSError: the access log file cannot be opened for appending.
    """
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ours = not logging.getLogger().handlers and not logging.getLogger("trioproxy").handlers
    if ours:
        # The proxy's own loggers only: the server's (hypercorn.error...) have
        # handlers of their own, and through the root they were written twice.
        log_output.install(server.log_level, fmt, logger="trioproxy")
    access.set_format(server.log_format)
    if (ours or server.access_log is not None) and not logging.getLogger(
        "trioproxy.access"
    ).handlers:
        log_output.install_access(server.access_log, server.log_format, fmt)


def create_app(config: Config | str | os.PathLike[str] | None = None) -> ProxyApp:
    """An ASGI app serving ``config`` (a Config or a TOML file's path); None reads
    the environment as the CLI does, at lifespan startup."""
    return ProxyApp(config)


#: ``hypercorn --worker-class trio trioproxy.asgi:app``: configured by
#: ``TRIOPROXY_CONFIG``, ``TRIOPROXY_*`` and ``.env``, read at lifespan startup.
app = ProxyApp()
