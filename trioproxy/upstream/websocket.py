"""Opening a WebSocket to an upstream: connect, then the client's opening handshake.

The proxy ends the WebSocket protocol on both of its sides (RFC 6455 §1.3: the
handshake is hop-by-hop; a ``Sec-WebSocket-Key`` answers for one connection
only), so it opens its own WebSocket to the upstream *before* it answers the
client: the client's subprotocols are offered, the upstream picks, and only
then is the client accepted, with the upstream's choice (deferred
negotiation). An upstream that refuses answers with an ordinary HTTP response,
which the caller relays to the client as such.

The connection is opened as the pool opens its own (same connector, connect
timeout, TLS context and error mapping: :func:`open_connection`) but is not
taken from the pool nor counted by it: a tunnel lives for minutes or hours
and would starve the pool's per-origin cap. The handshake is wsproto's
sans-I/O :class:`~wsproto.handshake.H11Handshake`; nothing is offered in
``Sec-WebSocket-Extensions``, so no extension (permessage-deflate) is
negotiated and frames carry plain payloads (RFC 6455 §9).

Resource handling: whoever calls :func:`connect_upstream_websocket` closes
what it returns (``aclose``); :func:`open_upstream_websocket` does so at the
end of its block.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Event, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from trioproxy.errors import UpstreamClosed, UpstreamProtocolError, UpstreamTimeout
from trioproxy.http.protocol import Headers
from trioproxy.upstream.connection import open_connection
from trioproxy.upstream.origin import Origin
from trioproxy.upstream.pool import UpstreamPool

READ_SIZE = 65536
_BLANK_LINE = re.compile(b"\n\r?\n")

#: Request fields the handshake writes itself; the client's are not forwarded.
HANDSHAKE_FIELDS = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"sec-websocket-accept",
    }
)


@attrs.frozen
class Accepted:
    """The upstream switched protocols (``101``)."""

    #: The subprotocol it chose among those offered, if any.
    subprotocol: str | None
    #: The other fields of its ``101`` (``Set-Cookie``...), names lowercased.
    headers: Headers
    #: What followed the ``101`` in the same read (the first frames).
    trailing_data: bytes


@attrs.frozen
class Refused:
    """The upstream answered the handshake with an ordinary response."""

    status: int
    headers: Headers
    has_body: bool


class UpstreamWebSocket:
    """One connection to an upstream, during and after the opening handshake."""

    def __init__(self, origin: Origin, stream: trio.abc.Stream) -> None:
        self.origin = origin
        self.stream = stream
        self._handshake = H11Handshake(ConnectionType.CLIENT)
        self._events: deque[Event] = deque()
        self._eof = False
        #: What was read before the answer's head was complete, for what follows it.
        self._head_bytes: bytearray | None = bytearray()

    async def handshake(
        self,
        *,
        host: bytes,
        target: bytes,
        headers: Headers,
        subprotocols: list[str],
        read_timeout: float,
    ) -> Accepted | Refused:
        """Send the upgrade request and read the upstream's answer head.

        Args:
            host: the ``Host`` value (ASCII).
            target: the request-target (origin-form, ASCII).
            headers: further request fields, none of :data:`HANDSHAKE_FIELDS`.
            subprotocols: offered in ``Sec-WebSocket-Protocol``, in order.
            read_timeout: how long to wait for each read of the answer.

        Raises:
            UpstreamTimeout: no answer within ``read_timeout``.
            UpstreamClosed: the connection closed or reset before an answer.
            UpstreamProtocolError: the answer is not HTTP, or a ``101`` that
                does not complete the handshake (wrong accept key, a
                subprotocol or extension that was not offered).
        """
        request = Request(
            host=host.decode("ascii"),
            target=target.decode("ascii"),
            subprotocols=subprotocols,
            extra_headers=headers,
        )
        await self._send(self._handshake.send(request))
        while True:
            event = await self._next_event(read_timeout, before_head=True)
            if isinstance(event, AcceptConnection):
                return Accepted(event.subprotocol, list(event.extra_headers), self._after_head())
            if isinstance(event, RejectConnection):
                if event.status_code < 200:
                    raise UpstreamProtocolError(
                        f"{self.origin}: {event.status_code} in answer to a WebSocket handshake"
                    )
                self._head_bytes = None  # a body may follow: not kept
                return Refused(event.status_code, list(event.headers), event.has_body)

    def _after_head(self) -> bytes:
        """The bytes that followed the ``101``'s head (the tunnel's first frames).

        The ``101`` is the first and only response on this connection, so its
        head ends at the first blank line, found as h11 finds it (LF or CRLF).
        """
        assert self._head_bytes is not None
        match = _BLANK_LINE.search(self._head_bytes)
        assert match is not None, "wsproto accepted a head without its end"
        after = bytes(self._head_bytes[match.end() :])
        self._head_bytes = None
        return after

    async def receive_refusal_body(self, read_timeout: float) -> bytes:
        """The next chunk of a refusal's body; ``b""`` at its end.

        Raises:
            UpstreamTimeout, UpstreamClosed, UpstreamProtocolError: as ``handshake``.
        """
        while True:
            event = await self._next_event(read_timeout, before_head=False)
            if isinstance(event, RejectData):
                if event.data:
                    if event.body_finished:  # pragma: no cover  (wsproto ends with b"")
                        self._events.appendleft(RejectData(b"", body_finished=True))
                    return bytes(event.data)
                if event.body_finished:
                    return b""

    async def _next_event(self, read_timeout: float, *, before_head: bool) -> Event:
        while not self._events:
            data: bytes | bytearray = b""
            with trio.move_on_after(read_timeout):
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise UpstreamClosed(f"reading from {self.origin}: {exc!r}") from None
                if not data:
                    if before_head or self._eof:
                        raise UpstreamClosed(f"{self.origin} closed the connection")
                    # The end of a body delimited by the connection closing (RFC 9112 §6.3).
                    self._eof = True
                if self._head_bytes is not None:
                    self._head_bytes += data
                try:
                    self._handshake.receive_data(bytes(data) or None)
                except RemoteProtocolError as exc:
                    raise UpstreamProtocolError(f"{self.origin}: {exc}") from None
                self._events.extend(self._handshake.events())
                continue
            raise UpstreamTimeout(f"{self.origin}: no data for {read_timeout} s")
        return self._events.popleft()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamClosed(f"writing to {self.origin}: {exc!r}") from None


async def connect_upstream_websocket(
    origin: Origin, pool: UpstreamPool, *, connect_timeout: float | None = None
) -> UpstreamWebSocket:
    """Connect to ``origin`` with ``pool``'s settings (connector, timeout, TLS);
    ``connect_timeout``, if given, instead of the pool's.

    Resource handling: the caller closes the result with ``aclose``.

    Raises:
        UpstreamConnectError, UpstreamConnectTimeout: as for a pooled connection.
    """
    conn = await open_connection(
        origin,
        connect_timeout=connect_timeout or pool.connect_timeout,
        ssl_context=pool.ssl_context,
        max_head_size=pool.max_head_size,
        connector=pool.connector,
        protocol_factory=pool.protocol_factory,
    )
    return UpstreamWebSocket(origin, conn.stream)


@asynccontextmanager
async def open_upstream_websocket(
    origin: Origin, pool: UpstreamPool
) -> AsyncIterator[UpstreamWebSocket]:
    """:func:`connect_upstream_websocket`, closed when the block ends."""
    upstream = await connect_upstream_websocket(origin, pool)
    try:
        yield upstream
    finally:
        await upstream.aclose()
