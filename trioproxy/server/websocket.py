"""WebSocket upgrades: the handshake on both sides, then the tunnel between them.

The proxy ends the WebSocket protocol on each of its sides (RFC 6455 §1.3,
§4): it answers the client's opening handshake with its own key and opens its
own WebSocket to the upstream, then relays frames between the two. It reads
every frame header (and the payloads of text and close frames), which buys
what a byte pipe cannot give: limits on message size, close codes that say
which side did what, and one place to enforce RFC 6455 against both peers;
payloads otherwise pass as they came.

Opening (deferred negotiation)::

    client ── GET, Upgrade: websocket ─► proxy
                                          │ balancer.pick() → target
                                          │ connect (502 / 504 on failure)
                                          ├── GET, Upgrade, the client's subprotocols,
                                          │   cookies, auth..., X-Forwarded-*, Via ─► upstream
                                          │ ◄── 101 with its chosen subprotocol
    client ◄── 101, that subprotocol ─────┘     (or 403 + body: relayed as plain HTTP)

Nothing is offered or accepted in ``Sec-WebSocket-Extensions`` on either
side, so frames carry plain payloads and the proxy may re-fragment them
(RFC 6455 §5.4: an intermediary may change fragmentation when no extension is
negotiated).

The tunnel itself is in :mod:`trioproxy.server.ws_tunnel`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import attrs
import trio
from wsproto.utilities import generate_accept_token

from trioproxy.balance.group import LiveGroup
from trioproxy.balance.target import Target
from trioproxy.engine import Engine, ExchangeLog
from trioproxy.errors import (
    ClientDisconnected,
    NoHealthyUpstream,
    ProxyError,
    UpstreamBrokenMidBody,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from trioproxy.http.headers import (
    client_response_headers,
    get_all,
    get_first,
    has_token,
    new_request_id,
    reason_phrase,
    request_id_from,
    upstream_request_headers,
    via_entry,
)
from trioproxy.http.protocol import Headers, RequestHead, ResponseHead, ServerProtocol
from trioproxy.server.ws_tunnel import (
    CLOSE_REPLY_TIMEOUT,
    CLOSE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    Tunnel,
)
from trioproxy.snapshot import Route
from trioproxy.upstream.origin import UpstreamURL
from trioproxy.upstream.pool import UpstreamPool
from trioproxy.upstream.websocket import (
    HANDSHAKE_FIELDS,
    Accepted,
    Refused,
    UpstreamWebSocket,
    connect_upstream_websocket,
)

log = logging.getLogger("trioproxy.websocket")


# --- the client's opening handshake ------------------------------------------------------


class BadWebSocketRequest(ProxyError):
    """An upgrade request that is not a valid opening handshake (RFC 6455 §4.2.1)."""

    status = 400
    reason = "invalid WebSocket handshake"


class WebSocketVersionNotSupported(ProxyError):
    """RFC 6455 §4.2.2: answer 426 naming the version we speak."""

    status = 426
    reason = "only WebSocket version 13 is supported"
    headers = ((b"sec-websocket-version", b"13"),)


def is_websocket_upgrade(head: RequestHead) -> bool:
    """Whether the request asks for a WebSocket (RFC 6455 §4.1 items 1, 5 and 6).

    Only a bodiless HTTP/1.1 GET with ``Upgrade: websocket`` and ``Connection:
    upgrade`` qualifies; anything else carrying an ``Upgrade`` is served as
    plain HTTP, the upgrade ignored (RFC 9110 §7.8 lets a server do so).
    """
    headers = head.headers
    return (
        head.method == b"GET"
        and head.http_version == b"1.1"
        and has_token(headers, b"upgrade", b"websocket")
        and has_token(headers, b"connection", b"upgrade")
        and get_first(headers, b"transfer-encoding") is None
        and get_first(headers, b"content-length") in (None, b"0")
    )


@attrs.frozen
class ClientHandshake:
    key: bytes
    subprotocols: list[str]


def parse_client_handshake(head: RequestHead) -> ClientHandshake:
    """The client's key and offered subprotocols.

    Raises:
        WebSocketVersionNotSupported: ``Sec-WebSocket-Version`` is not 13.
        BadWebSocketRequest: no valid ``Sec-WebSocket-Key``, or a subprotocol
            that is not ASCII.
    """
    if get_all(head.headers, b"sec-websocket-version") != [b"13"]:
        raise WebSocketVersionNotSupported("Sec-WebSocket-Version is not 13")
    keys = get_all(head.headers, b"sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise BadWebSocketRequest("missing or invalid Sec-WebSocket-Key")
    subprotocols: list[str] = []
    for value in get_all(head.headers, b"sec-websocket-protocol"):
        # Tokens, compared case-sensitively (RFC 6455 §4.1 item 10): not lowercased.
        for part in value.split(b","):
            token = part.strip(b" \t")
            if not token:
                continue
            if not token.isascii():
                raise BadWebSocketRequest("Sec-WebSocket-Protocol is not ASCII")
            subprotocols.append(token.decode("ascii"))
    return ClientHandshake(keys[0], subprotocols)


def _valid_key(key: bytes) -> bool:
    """A base64-encoded 16-byte value (RFC 6455 §4.1 item 7)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


# --- the balancer, as the tunnel uses it ----------------------------------------------


class Balancing:
    """A group's balancer and retry rules, as a tunnel uses them.

    The tunnel picks like the engine (``exclude`` for retries), reports the
    outcome of its handshake to the balancer (breaker and passive health), and
    counts an open tunnel in the target's ``inflight`` and ``tunnels`` for
    ``least_connections``. Connect failures are retried on other targets
    within the group's ``retry.max_attempts`` and retry budget.
    """

    def __init__(self, group: LiveGroup) -> None:
        self._group = group
        self._balancer = group.balancer
        group.budget.record_request(trio.current_time())

    def pick(self, head: RequestHead, *, exclude: Sequence[Target] = ()) -> Target:
        """A target not in ``exclude`` (NoHealthyUpstream if none is left)."""
        return self._balancer.pick(head, now=trio.current_time(), exclude=exclude)

    def may_retry(self, *, attempts: int) -> bool:
        """Whether a connect failure may be tried again on another target."""
        if attempts >= self._group.retry.max_attempts:
            return False
        budget = self._group.budget
        now = trio.current_time()
        if not budget.can_retry(now):
            return False
        budget.record_retry(now)
        return True

    @property
    def pool(self) -> UpstreamPool:
        return self._group.pool

    @staticmethod
    def url(target: Target) -> UpstreamURL:
        return target.url

    def track(self, target: Target, *, tunnel: bool = False) -> AbstractContextManager[None]:
        """Count a handshake (``tunnel=False``) or an open tunnel on ``target``."""
        return self._balancer.track(target, tunnel=tunnel)

    def report(self, target: Target, outcome: str, latency: float | None = None) -> None:
        """``outcome``: ``success``, ``failure`` (connect error, timeout, 5xx) or ``cancelled``."""
        now = trio.current_time()
        if outcome == "success":
            self._balancer.on_success(target, now, latency=latency)
        elif outcome == "failure":
            self._balancer.on_failure(target, now)
        else:
            self._balancer.on_cancelled(target, now)


# --- the upgrade ------------------------------------------------------------------------


class WebSocketDownstream(Protocol):
    """What the tunnel needs of the client connection (``ClientConnection``)."""

    client_addr: str
    scheme: str

    @property
    def stream(self) -> trio.abc.Stream: ...

    @property
    def protocol(self) -> ServerProtocol: ...

    async def receive_body(self) -> bytes: ...

    async def wait_disconnect(self) -> None: ...

    async def send_head(self, head: ResponseHead) -> None: ...

    async def send_body(self, data: bytes) -> None: ...

    async def send_end(self) -> None: ...


@attrs.frozen(kw_only=True)
class WebSocketSettings:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: float | None = None


async def serve_websocket(
    head: RequestHead,
    downstream: WebSocketDownstream,
    record: ExchangeLog,
    *,
    route: Route,
    engine: Engine,
    settings: WebSocketSettings,
) -> str | None:
    """Open the upstream WebSocket, accept the client, run the tunnel to its end.

    Returns:
        None when the upstream refused and its answer was relayed as an
        ordinary response (the connection may go on as HTTP); otherwise a
        note for the access log saying how the tunnel ended (the connection
        is done).

    Raises:
        ProxyError: before anything was sent to the client, for the handler to
            answer with its status (400/426 bad handshake, 502 connect error or
            invalid answer, 503 no target, 504 timeout); ClientDisconnected;
            UpstreamBrokenMidBody while relaying a refusal's body.
    """
    # Read to the request's end first (it has no body), so that a refusal
    # leaves the connection usable for the next request.
    if await downstream.receive_body():
        raise BadWebSocketRequest("WebSocket upgrade request with a body")
    handshake = parse_client_handshake(head)
    # Kept when the front end already took it (a CORS route asks before it comes here).
    if not record.request_id:
        record.request_id = request_id_from(head.headers) or new_request_id()
    group = route.group
    assert group is not None, "a respond route is answered by the front end"
    balancing = Balancing(group)
    # The route's path rewrite and header rules, as for any request.
    sent = head
    if route.has_transforms:
        sent = engine.prepare_request(head, route, downstream.client_addr, record)
    target, upstream = await _connect(head, balancing, route, record)
    reported = False
    try:
        url = balancing.url(target)
        fields = upstream_request_headers(
            sent.headers,
            client_addr=downstream.client_addr,
            scheme=downstream.scheme,
            upstream_host=url.origin.host_header,
            preserve_host=group.preserve_host,
            request_id=record.request_id,
            via=via_entry(b"1.1"),
            x_forwarded=route.x_forwarded,
        )
        if route.headers.request:
            fields = route.headers.request.apply(fields, record.values)
        host = get_first(fields, b"host") or url.origin.host_header
        upstream_target = url.upstream_target(sent.target)
        if not (host.isascii() and upstream_target.isascii()):
            raise BadWebSocketRequest("non-ASCII Host or request-target in a WebSocket upgrade")
        started = trio.current_time()
        with balancing.track(target):
            answer = await _upstream_handshake(
                upstream,
                downstream,
                host=host,
                target=upstream_target,
                headers=[field for field in fields if field[0] not in HANDSHAKE_FIELDS],
                subprotocols=handshake.subprotocols,
                read_timeout=route.read_timeout,
            )
        status = answer.status if isinstance(answer, Refused) else 101
        outcome = "failure" if status >= 500 else "success"
        balancing.report(target, outcome, trio.current_time() - started)
        reported = True
        record.status = status
        if isinstance(answer, Refused):
            await _relay_refusal(answer, upstream, downstream, record, route.read_timeout)
            return None
        await _accept_client(downstream, handshake, answer, record)
        early = downstream.protocol.trailing_data()  # frames sent before our 101
        tunnel = Tunnel(
            downstream.stream,
            upstream.stream,
            client_early=early,
            upstream_early=answer.trailing_data,
            max_message_size=settings.max_message_size,
            idle_timeout=settings.idle_timeout,
        )
        with balancing.track(target, tunnel=True):
            note = await tunnel.run()
        record.bytes_out = tunnel.upstream.bytes_in
        return f"websocket: {note}"
    except (UpstreamError, UpstreamTimeout):
        if not reported:
            balancing.report(target, "failure")
        raise
    except BaseException:
        if not reported:
            balancing.report(target, "cancelled")
        raise
    finally:
        await upstream.aclose()


async def _connect(
    head: RequestHead, balancing: Balancing, route: Route, record: ExchangeLog
) -> tuple[Target, UpstreamWebSocket]:
    """A target and a connection to it; a target that refuses the connection is
    left for another one, as the engine does: the upstream never saw the request.

    Raises:
        NoHealthyUpstream: no target to try.
        UpstreamConnectError, UpstreamConnectTimeout: the last target tried failed.
    """
    tried: list[Target] = []
    error: ProxyError | None = None
    while True:
        try:
            target = balancing.pick(head, exclude=tried)
        except NoHealthyUpstream:
            if error is None:
                raise
            raise error from None  # nothing else to try: the connect error stands
        tried.append(target)
        url = balancing.url(target)
        record.upstream = url.text
        try:
            return target, await connect_upstream_websocket(
                url.origin, balancing.pool, connect_timeout=route.connect_timeout
            )
        except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
            balancing.report(target, "failure")
            if not balancing.may_retry(attempts=len(tried)):
                raise
            log.info("WebSocket upgrade to %s failed, trying another: %s", url.text, exc.detail)
            error = exc
        except BaseException:
            balancing.report(target, "cancelled")
            raise


async def _upstream_handshake(
    upstream: UpstreamWebSocket,
    downstream: WebSocketDownstream,
    **handshake: Any,
) -> Accepted | Refused:
    """The upstream's handshake, cancelled if the client leaves meanwhile."""
    answer: Accepted | Refused | None = None
    error: ProxyError | None = None
    client_gone = False

    async def watch_client(cancel_scope: trio.CancelScope) -> None:
        nonlocal client_gone
        try:
            await downstream.wait_disconnect()
        except ClientDisconnected:
            client_gone = True
            cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_client, nursery.cancel_scope)
        try:
            answer = await upstream.handshake(**handshake)
        except ProxyError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    if client_gone:
        raise ClientDisconnected("client left during the upstream WebSocket handshake")
    if error is not None:
        raise error
    assert answer is not None
    return answer


async def _relay_refusal(
    answer: Refused,
    upstream: UpstreamWebSocket,
    downstream: WebSocketDownstream,
    record: ExchangeLog,
    read_timeout: float,
) -> None:
    """The upstream's non-101 answer, relayed as the response to the client's request."""
    headers = answer.headers
    if get_first(headers, b"transfer-encoding") is not None:
        # RFC 9112 §6.3 item 3, as for any response.
        headers = [field for field in headers if field[0] != b"content-length"]
    await downstream.send_head(
        ResponseHead(
            answer.status,
            client_response_headers(headers, request_id=record.request_id, via=via_entry(b"1.1")),
            reason_phrase(answer.status),
        )
    )
    if answer.has_body:
        try:
            while data := await upstream.receive_refusal_body(read_timeout):
                record.bytes_out += len(data)
                await downstream.send_body(data)
        except (UpstreamError, UpstreamTimeout) as exc:
            raise UpstreamBrokenMidBody(exc.detail) from None
    await downstream.send_end()


async def _accept_client(
    downstream: WebSocketDownstream,
    handshake: ClientHandshake,
    answer: Accepted,
    record: ExchangeLog,
) -> None:
    """The client's ``101``, with the upstream's subprotocol and other fields."""
    headers: Headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", generate_accept_token(handshake.key)),
    ]
    if answer.subprotocol is not None:
        headers.append((b"sec-websocket-protocol", answer.subprotocol.encode("ascii")))
    passed = [field for field in answer.headers if field[0] not in HANDSHAKE_FIELDS]
    headers += client_response_headers(passed, request_id=record.request_id, via=via_entry(b"1.1"))
    data = downstream.protocol.send_informational(
        ResponseHead(101, headers, b"Switching Protocols")
    )
    try:
        await downstream.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise ClientDisconnected(repr(exc)) from None


__all__ = [
    "CLOSE_REPLY_TIMEOUT",
    "CLOSE_TIMEOUT",
    "Balancing",
    "Tunnel",
    "WebSocketSettings",
    "is_websocket_upgrade",
    "serve_websocket",
]
