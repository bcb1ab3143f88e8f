"""``proxy_pass`` and ``proxy_pass_websocket`` for Starlette/FastAPI endpoints under trio.

The signatures are fastapi-reverse-proxy 0.4.0's, so a port changes only the
import::

    from trioproxy.asgi import HealthChecker, LoadBalancer, proxy_pass, proxy_pass_websocket

    @app.get("/api/{rest:path}")
    async def api(request: Request) -> Response:
        return await proxy_pass(request, "http://127.0.0.1:9000")   # or a LoadBalancer

The exchange itself runs on trioproxy's engine (``Engine.handle``), as it does
behind ``python -m trioproxy``: the header rules (hop-by-hop fields and those
``Connection`` names removed, ``X-Forwarded-*`` extended, ``Via``,
``X-Request-ID``), repeated ``Set-Cookie`` kept, streaming both ways with
backpressure, retries on another target where safe, and the same failure
answers: 502 when the upstream refuses or breaks, 504 when it does not answer
within ``timeout``, 503 with ``Retry-After`` when no target is healthy.

What differs from fastapi-reverse-proxy:

* ``proxy_pass`` returns a response whose exchange runs when the server calls it,
  in the endpoint's own task: the upstream is asked then (a failure is the
  error response, not an ``HTTPException`` raised by ``proxy_pass``);
* no ``httpx`` client: every helper call of a trio run shares one
  :class:`~trioproxy.upstream.pool.UpstreamPool`, and a connection goes back to
  it only when its response was read to the end (a client that leaves closes
  it); nothing is kept between clients but connections: no cookie jar
  (GHSA-7vwr-g6pm-9hc8);
* a WebSocket whose upstream refuses gets the upstream's HTTP answer where the
  server offers ``websocket.http.response`` (hypercorn does), else a close
  before accept (HTTP 403 from the server); a connect failure, timeout or no
  healthy target likewise gets 502, 504 or 503 (without the extension: a close
  with 1014, 1014 or 1013).
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketState

from trioproxy.balance.balancer import Balancer
from trioproxy.balance.group import LiveGroup, make_ssl_context
from trioproxy.balance.health import HealthService
from trioproxy.balance.health_rules import HealthSettings
from trioproxy.balance.retry import RetryBudget, RetryPolicy
from trioproxy.balance.strategies import RoundRobin
from trioproxy.balance.target import Target, TargetSpec
from trioproxy.config.model import HeaderRules, RouteSettings, UpstreamGroup, UpstreamTLS
from trioproxy.engine import Engine, ExchangeLog
from trioproxy.errors import ClientDisconnected, ProxyError
from trioproxy.http.answers import error_answer
from trioproxy.http.headers import new_request_id, request_id_from
from trioproxy.http.parsers import client_factory
from trioproxy.http.protocol import Headers, RequestHead
from trioproxy.http.transforms import compile_header_rules
from trioproxy.snapshot import Route
from trioproxy.upstream.origin import UpstreamURL
from trioproxy.upstream.pool import UpstreamPool

from .http import AsgiDownstream, access, relay_exchange, scope_headers
from .types import Receive, Scope, Send
from .websocket import INTERNAL_ERROR, AsgiWebSocket

if TYPE_CHECKING:
    from trioproxy.balance.library import LoadBalancer

#: Attempts per request: the first and up to two retries on other targets.
_ATTEMPTS = 3
_REPLAY_LIMIT = 1 << 20
_ROUTES_KEPT = 256
_CLOSE_CODES = {503: 1013, 502: 1014, 504: 1014}


@attrs.define(eq=False)
class _Helpers:
    """What the helper calls of one trio run share: an engine, one pool, and a
    live group per upstream URL and per LoadBalancer."""

    engine: Engine = attrs.Factory(lambda: Engine(use_hub=False))
    pool: UpstreamPool = attrs.Factory(
        lambda: UpstreamPool(
            ssl_context=make_ssl_context(UpstreamTLS()),
            # The parser ``python -m trioproxy`` and the app use by default.
            protocol_factory=client_factory("auto"),
        )
    )
    by_url: dict[str, LiveGroup] = attrs.Factory(dict)
    by_balancer: weakref.WeakKeyDictionary[LoadBalancer, LiveGroup] = attrs.Factory(
        weakref.WeakKeyDictionary
    )
    #: The routes calls asked for, by (group, timeout, override_host): most apps ask
    #: for a few, on every request (making one compiles its header rules).
    routes: dict[tuple[LiveGroup, float, str | None], Route] = attrs.Factory(dict)

    def route(self, group: LiveGroup, timeout: float, override_host: str | None) -> Route:
        key = (group, timeout, override_host)
        route = self.routes.get(key)
        if route is None:
            if len(self.routes) >= _ROUTES_KEPT:  # (say, an override_host per client)
                self.routes.clear()
            route = self.routes[key] = _route(group, timeout, override_host)
        return route

    def group(self, upstream: str | LoadBalancer) -> LiveGroup:
        if isinstance(upstream, str):
            group = self.by_url.get(upstream)
            if group is None:
                spec = TargetSpec(url=UpstreamURL.parse(upstream))
                group = self.by_url[upstream] = self._group(
                    upstream, Balancer([Target(spec)], strategy=RoundRobin())
                )
            return group
        group = self.by_balancer.get(upstream)
        if group is None:
            group = self.by_balancer[upstream] = self._group(
                f"LoadBalancer-{id(upstream):x}", upstream.balancer
            )
        return group

    def _group(self, name: str, balancer: Balancer) -> LiveGroup:
        """A group over ``balancer`` on the shared pool. Its health is the caller's
        (a HealthChecker probes a LoadBalancer's targets): none is run here."""
        settings = UpstreamGroup(
            name=name,
            servers=tuple(target.spec for target in balancer.targets),
            health=HealthSettings(enabled=False),
        )
        return LiveGroup(
            settings=settings,
            balancer=balancer,
            pool=self.pool,
            health=HealthService(balancer.targets, settings.health),
            retry=RetryPolicy(max_attempts=_ATTEMPTS, replay_limit=_REPLAY_LIMIT),
            budget=RetryBudget(ratio=settings.retry.budget),
        )


_HELPERS: trio.lowlevel.RunVar[_Helpers] = trio.lowlevel.RunVar("trioproxy_asgi_helpers")


def _helpers() -> _Helpers:
    """This trio run's shared state (a pool's sockets belong to one run)."""
    try:
        return _HELPERS.get()
    except LookupError:
        helpers = _Helpers()
        _HELPERS.set(helpers)
        return helpers


async def aclose_pool() -> None:
    """Close the idle upstream connections the helpers keep (say, at the end of a
    lifespan); they are opened again as needed."""
    await _helpers().pool.aclose()


class Proxy:
    """fastapi-reverse-proxy's lifespan helper: ``async with Proxy(app): yield``.

    There is no client to create here (the helpers share the engine's pool); on
    exit the pool's idle connections are closed.
    """

    def __init__(self, app: object = None) -> None:
        self.app = app

    async def close(self) -> None:
        await aclose_pool()

    async def __aenter__(self) -> Proxy:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# --- the request as it goes upstream ------------------------------------------------------


def _fields(mapping: Mapping[str, str]) -> Headers:
    return [
        (str(k).lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in mapping.items()
    ]


def _upstream_head(
    scope: Scope,
    *,
    path: str | None,
    forward_query: bool,
    additional_headers: Mapping[str, str] | None,
    override_headers: Mapping[str, str] | None,
    method: str | None = None,
) -> RequestHead:
    """The request head the engine sends on: the client's (raw path, query and
    header fields as they came) unless the arguments say otherwise."""
    if path is None:
        target = bytes(scope.get("raw_path") or scope["path"].encode("utf-8"))
    else:
        target = path.encode("utf-8")
    query = bytes(scope.get("query_string", b""))
    if forward_query and query:
        target += (b"&" if b"?" in target else b"?") + query
    headers = scope_headers(scope) if override_headers is None else _fields(override_headers)
    if additional_headers:
        extra = _fields(additional_headers)
        names = {name for name, _ in extra}
        headers = [field for field in headers if field[0] not in names] + extra
    if override_headers is not None and not any(n == b"host" for n, _ in headers):
        # The Host the client used, for X-Forwarded-Host (the upstream gets its own).
        headers += [(n, v) for n, v in scope_headers(scope) if n == b"host"][:1]
    return RequestHead(
        method=(method or scope.get("method", "GET")).upper().encode("ascii"),
        target=target,
        headers=headers,
        http_version=str(scope.get("http_version", "1.1")).encode("ascii"),
    )


def _route(group: LiveGroup, timeout: float, override_host: str | None) -> Route:
    """A catch-all route to ``group`` with the call's timeout; ``override_host`` as a
    request header rule (applied after the proxy set the upstream's own Host)."""
    settings = RouteSettings(name="proxy_pass", upstream=group.name)
    if override_host is None:
        return Route(
            settings, group, read_timeout=timeout, connect_timeout=timeout, max_body_size=None
        )
    escaped = override_host.replace("{", "{{").replace("}", "}}")
    rules = compile_header_rules(HeaderRules(request_set=(("host", escaped),)), "override_host")
    return Route(
        settings,
        group,
        read_timeout=timeout,
        connect_timeout=timeout,
        max_body_size=None,
        headers=rules,
    )


def _body_bytes(body: bytes | str | list[Any] | dict[str, Any]) -> tuple[bytes, bool]:
    """The body to send, and whether it is JSON made here."""
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode(), True
    if isinstance(body, str):
        return body.encode(), False
    return bytes(body), False


def _with_body(head: RequestHead, body: bytes, is_json: bool) -> RequestHead:
    headers = [
        field for field in head.headers if field[0] not in (b"content-length", b"transfer-encoding")
    ]
    if is_json and not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    return RequestHead(head.method, head.target, headers, head.http_version)


class _ReplacedBody(AsgiDownstream):
    """The client's side, with the request body given instead of read (the
    client's own body messages are left to ``wait_disconnect``, which skips them)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        super().__init__(scope, receive, send)
        self._body: bytes | None = body

    async def read_framing(self, head: RequestHead) -> None:
        pass

    def request_has_body(self) -> bool:
        return True

    async def receive_body(self) -> bytes:
        body, self._body = self._body, None
        return body or b""


# --- HTTP ------------------------------------------------------------------------------


class ProxyResponse(Response):
    """The response ``proxy_pass`` returns: the upstream's, streamed. The exchange
    runs when the server calls it (``await response(scope, receive, send)``)."""

    def __init__(
        self,
        head: RequestHead,
        route: Route,
        body: bytes | None,
        engine: Engine,
    ) -> None:
        super().__init__(status_code=200)
        self._head = head
        self._route = route
        self._body = body
        self._engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        downstream = (
            AsgiDownstream(scope, receive, send)
            if self._body is None
            else _ReplacedBody(scope, receive, send, self._body)
        )
        record = ExchangeLog(route="proxy_pass")
        note = ""
        try:
            note = await relay_exchange(self._engine, self._head, self._route, downstream, record)
        finally:
            self.status_code = record.status
            access(downstream.client_addr, self._head, record, started, note)


async def proxy_pass(
    request: Request,
    upstream: str | LoadBalancer,
    path: str | None = None,
    timeout: float = 60.0,  # noqa: ASYNC109  (fastapi-reverse-proxy's signature)
    forward_query: bool = True,
    additional_headers: Mapping[str, str] | None = None,
    override_headers: Mapping[str, str] | None = None,
    override_body: bytes | str | list[Any] | dict[str, Any] | None = None,
    method: str | None = None,
    override_host: str | None = None,
) -> Response:
    """Relay ``request`` to ``upstream`` and return the upstream's response, streamed.

    Args:
        request: the Starlette/FastAPI request.
        upstream: a base URL (``"http://10.0.0.1:9000"``, optionally with a path
            prefix) or a :class:`~trioproxy.LoadBalancer`.
        path: the path to request instead of the client's (``raw_path``).
        timeout: seconds allowed to connect, and between two reads of the upstream.
        forward_query: append the client's query string (byte for byte).
        additional_headers: fields to set on top of the client's (replacing
            those of the same name).
        override_headers: fields to send instead of the client's.
        override_body: a body to send instead of the client's: bytes, str, or a
            dict or list sent as JSON (with ``Content-Type: application/json``
            unless one is given).
        method: the method to use instead of the client's.
        override_host: the ``Host`` to send instead of the upstream's own.

    Returns:
        A response that runs the exchange when the server sends it.
    """
    helpers = _helpers()
    head = _upstream_head(
        request.scope,
        path=path,
        forward_query=forward_query,
        additional_headers=additional_headers,
        override_headers=override_headers,
        method=method,
    )
    body: bytes | None = None
    if override_body is not None:
        body, is_json = _body_bytes(override_body)
        head = _with_body(head, body, is_json)
    elif (cached := getattr(request, "_body", None)) is not None:
        # The endpoint (or FastAPI) read the body already: send what it read.
        body = bytes(cached)
        head = _with_body(head, body, False)
    route = helpers.route(helpers.group(upstream), timeout, override_host)
    return ProxyResponse(head, route, body, helpers.engine)


# --- WebSocket ---------------------------------------------------------------------------


async def proxy_pass_websocket(
    websocket: WebSocket,
    upstream: str | LoadBalancer,
    path: str | None = None,
    subprotocols: list[str] | None = None,
    forward_query: bool = True,
    additional_headers: Mapping[str, str] | None = None,
    override_headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109  (fastapi-reverse-proxy's signature)
) -> None:
    """Open a WebSocket to ``upstream`` for ``websocket``, accept the client with
    the upstream's subprotocol, and relay messages both ways until either side
    closes (close codes pass both ways as far as the server reports them).

    Args:
        websocket: the Starlette/FastAPI WebSocket, not accepted yet.
        upstream: a base URL (``http://``/``https://``, or ``ws://``/``wss://``)
            or a :class:`~trioproxy.LoadBalancer`.
        path: the path to open instead of the client's.
        subprotocols: offered to the upstream instead of the client's.
        forward_query: append the client's query string.
        additional_headers: fields to set on top of the client's.
        override_headers: fields to send instead of the client's.
        timeout: seconds allowed to connect and for the upstream's handshake answer.
    """
    helpers = _helpers()
    if isinstance(upstream, str):
        upstream = _http_url(upstream)
    scope = websocket.scope
    head = _upstream_head(
        scope,
        path=path,
        forward_query=forward_query,
        additional_headers=additional_headers,
        override_headers=override_headers,
        method="GET",
    )
    head = RequestHead(head.method, head.target, head.headers, b"1.1")
    client = AsgiWebSocket(scope, websocket.receive, websocket.send)
    record = ExchangeLog(route="proxy_pass_websocket")
    started = time.perf_counter()
    note = ""
    try:
        if websocket.client_state == WebSocketState.CONNECTING:
            await client.connect()
        group = helpers.group(upstream)
        route = helpers.route(group, timeout, None)
        offered = subprotocols if subprotocols is not None else list(scope.get("subprotocols", []))
        group.enter()
        try:
            note = await helpers.engine.handle_websocket(head, route, client, record, offered) or ""
        finally:
            group.leave()
    except ClientDisconnected:
        record.status = record.status or 499
        note = "client gone"
    except ProxyError as exc:
        record.status = exc.status
        note = exc.detail
        if not record.request_id:
            record.request_id = request_id_from(head.headers) or new_request_id()
        if not client.answered:
            answer = error_answer(exc, request_id=record.request_id)
            await client.refuse(answer, _CLOSE_CODES.get(exc.status, 1008))
        elif client.accepted:
            await client.close(INTERNAL_ERROR, exc.reason)
    finally:
        access(client.client_addr, head, record, started, note)


def _http_url(url: str) -> str:
    """``ws://``/``wss://`` as the ``http://``/``https://`` they are opened with."""
    if url.startswith("ws://"):
        return "http://" + url[len("ws://") :]
    if url.startswith("wss://"):
        return "https://" + url[len("wss://") :]
    return url


__all__ = [
    "Proxy",
    "ProxyResponse",
    "aclose_pool",
    "proxy_pass",
    "proxy_pass_websocket",
]
