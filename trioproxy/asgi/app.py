"""The proxy as an ASGI app: ``hypercorn --worker-class trio trioproxy.asgi:app``.

The same engine, routes, transforms, balancing, retries, breakers, admin
endpoints and access log as ``python -m trioproxy``, with hypercorn as the
front end (and so HTTP/2 and TLS to clients from hypercorn's own stack)::

    ASGI server ─► ProxyApp ─► Snapshot.route_for ─► Engine.handle(head, route, AsgiDownstream)
                    │                                 Engine.handle_websocket(..., AsgiWebSocket)
                    └─ lifespan: Engine.run in a nursery, activate(snapshot); shutdown drains

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
import time
from pathlib import Path

import attrs
import trio

from trioproxy.admin import AdminApp, serve_admin
from trioproxy.config.errors import ConfigError
from trioproxy.config.load import ConfigSources, load_config
from trioproxy.config.model import Config
from trioproxy.engine import Engine, ExchangeLog
from trioproxy.errors import (
    ClientDisconnected,
    NoRoute,
    ProxyError,
    UpstreamBrokenMidBody,
)
from trioproxy.http.answers import error_answer, local_answer
from trioproxy.http.headers import new_request_id, request_id_from
from trioproxy.observe import log_output
from trioproxy.snapshot import Snapshot, build_snapshot

from .http import (
    AsgiDownstream,
    access,
    answer_error,
    refuse_connect,
    relay_exchange,
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
    #: Exchanges and tunnels under way (for the drain at shutdown).
    inflight: int = 0
    _idle: trio.Event | None = None
    _loaded: Config | None = None

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
        if not logging.getLogger().handlers:
            log_output.install(
                config.server.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        async with trio.open_nursery() as nursery:
            await self.start(nursery, snapshot)
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            await self.drain(config.server.grace)
            nursery.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    async def start(self, nursery: trio.Nursery, snapshot: Snapshot) -> None:
        """Start the engine service in ``nursery`` and serve ``snapshot`` (the
        lifespan does this; code that runs its own nursery may call it)."""
        await nursery.start(self.engine.run)
        await self.engine.activate(snapshot)
        admin = snapshot.config.server.admin
        if admin is not None:
            addresses = await nursery.start(
                serve_admin, AdminApp(self.engine), admin.host, admin.port
            )
            log.info("admin listening on %s:%d", *addresses[0])

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
        started = time.perf_counter()
        head = request_head(scope)
        record = ExchangeLog()
        snapshot = self.engine.snapshot
        downstream = AsgiDownstream(scope, receive, send)
        note = ""
        self._enter()
        try:
            if snapshot is None:
                raise NotStarted()
            if (refused := refuse_connect(head)) is not None:
                raise refused
            route = snapshot.route_for(head.method, head.target, head.headers)
            if route is None:
                raise NoRoute(head.target.split(b"?", 1)[0].decode("latin-1"))
            record.route = route.name
            if route.group is None or route.cors is not None:
                record.request_id = request_id_from(head.headers) or new_request_id()
                answer = local_answer(
                    head, route, client_addr=downstream.client_addr, request_id=record.request_id
                )
                if answer is not None:
                    record.status = answer.status
                    record.bytes_out = len(answer.body)
                    await downstream.answer(answer)
                    return
            downstream = AsgiDownstream(scope, receive, send, body_limit=route.max_body_size)
            note = await relay_exchange(self.engine, head, route, downstream, record)
        except ClientDisconnected:
            record.status = record.status or 499
            note = "client gone"
        except ProxyError as exc:
            await answer_error(downstream, exc, record)
            note = exc.detail
        finally:
            self._leave()
            access(downstream.client_addr, head, record, started, note)

    # --- WebSocket -----------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        head = request_head(scope)
        record = ExchangeLog()
        snapshot = self.engine.snapshot
        server = snapshot.config.server if snapshot is not None else None
        client = AsgiWebSocket(
            scope,
            receive,
            send,
            max_message_size=server.ws_max_message_size if server is not None else 1 << 24,
            idle_timeout=(server.ws_idle_timeout or None) if server is not None else None,
        )
        note = ""
        self._enter()
        try:
            await client.connect()
            if snapshot is None:
                raise NotStarted()
            route = snapshot.route_for(head.method, head.target, head.headers)
            if route is None:
                raise NoRoute(head.target.split(b"?", 1)[0].decode("latin-1"))
            record.route = route.name
            group = route.group
            if group is None:
                record.request_id = request_id_from(head.headers) or new_request_id()
                answer = local_answer(
                    head, route, client_addr=client.client_addr, request_id=record.request_id
                )
                assert answer is not None
                record.status = answer.status
                await client.refuse(answer, 1008)
                return
            group.enter()
            try:
                subprotocols = [str(p) for p in scope.get("subprotocols") or ()]
                note = (
                    await self.engine.handle_websocket(head, route, client, record, subprotocols)
                    or ""
                )
                record.bytes_out = client.bytes_out
            finally:
                group.leave()
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
            access(client.client_addr, head, record, started, note)


def create_app(config: Config | str | os.PathLike[str] | None = None) -> ProxyApp:
    """An ASGI app serving ``config`` (a Config or a TOML file's path); None reads
    the environment as the CLI does, at lifespan startup."""
    return ProxyApp(config)


#: ``hypercorn --worker-class trio trioproxy.asgi:app``: configured by
#: ``TRIOPROXY_CONFIG``, ``TRIOPROXY_*`` and ``.env``, read at lifespan startup.
app = ProxyApp()
