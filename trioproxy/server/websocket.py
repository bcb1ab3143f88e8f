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
from typing import Protocol

import attrs
import trio
from wsproto.utilities import generate_accept_token

from trioproxy.engine import Engine, ExchangeLog
from trioproxy.errors import BadWebSocketRequest, ClientDisconnected, ProxyError
from trioproxy.http.headers import (
    get_all,
    get_first,
    has_token,
)
from trioproxy.http.protocol import Headers, RequestHead, ResponseHead, ServerProtocol
from trioproxy.server.ws_tunnel import (
    CLOSE_REPLY_TIMEOUT,
    CLOSE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    Tunnel,
)
from trioproxy.snapshot import Route
from trioproxy.upstream.websocket import (
    UpstreamWebSocket,
)

log = logging.getLogger("trioproxy.websocket")


# --- the client's opening handshake ------------------------------------------------------


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


# --- the upgrade ------------------------------------------------------------------------


class ClientWebSocketConnection(Protocol):
    """What the tunnel needs of the client connection (``ClientConnection``)."""

    client_addr: str
    scheme: str

    @property
    def stream(self) -> trio.abc.Stream: ...

    @property
    def protocol(self) -> ServerProtocol: ...

    async def receive_body(self) -> bytes: ...

    async def wait_disconnect(self) -> None: ...

    async def send_parts(
        self, head: ResponseHead | None, chunks: list[bytes], end: bool
    ) -> None: ...


@attrs.frozen(kw_only=True)
class WebSocketSettings:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: float | None = None


class _FrameDownstream:
    """The client connection as the engine's :class:`WebSocketDownstream`: our
    ``101`` written on its HTTP/1.1 connection, then the frame tunnel on its stream."""

    def __init__(
        self,
        connection: ClientWebSocketConnection,
        handshake: ClientHandshake,
        settings: WebSocketSettings,
    ) -> None:
        self._connection = connection
        self._handshake = handshake
        self._settings = settings
        self.client_addr = connection.client_addr
        self.scheme = connection.scheme
        self.bytes_out = 0

    async def wait_disconnect(self) -> None:
        await self._connection.wait_disconnect()

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        await self._connection.send_parts(head, chunks, end)

    async def accept(self, subprotocol: str | None, headers: Headers) -> None:
        """The client's ``101``, with the upstream's subprotocol and other fields."""
        fields: Headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(self._handshake.key)),
        ]
        if subprotocol is not None:
            fields.append((b"sec-websocket-protocol", subprotocol.encode("ascii")))
        connection = self._connection
        data = connection.protocol.send_informational(
            ResponseHead(101, fields + headers, b"Switching Protocols")
        )
        try:
            await connection.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientDisconnected(repr(exc)) from None

    async def relay(self, upstream: UpstreamWebSocket, early: bytes) -> str:
        connection = self._connection
        tunnel = Tunnel(
            connection.stream,
            upstream.stream,
            client_early=connection.protocol.trailing_data(),  # frames sent before our 101
            upstream_early=early,
            max_message_size=self._settings.max_message_size,
            idle_timeout=self._settings.idle_timeout,
        )
        try:
            return await tunnel.run()
        finally:
            self.bytes_out = tunnel.upstream.bytes_in


async def serve_websocket(
    head: RequestHead,
    downstream: ClientWebSocketConnection,
    record: ExchangeLog,
    *,
    route: Route,
    engine: Engine,
    settings: WebSocketSettings,
) -> str | None:
    """Check the client's handshake, then let the engine open the upstream WebSocket
    (pick, retry, headers, transforms: ``Engine.handle_websocket``), accept the
    client and run the tunnel to its end.

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
    frames = _FrameDownstream(downstream, handshake, settings)
    try:
        return await engine.handle_websocket(head, route, frames, record, handshake.subprotocols)
    finally:
        if frames.bytes_out:
            record.bytes_out = frames.bytes_out


__all__ = [
    "CLOSE_REPLY_TIMEOUT",
    "CLOSE_TIMEOUT",
    "BadWebSocketRequest",
    "Tunnel",
    "WebSocketSettings",
    "is_websocket_upgrade",
    "serve_websocket",
]
