"""The one proxy path, shared by every front end.

``Engine.handle`` takes a request head and a :class:`Downstream` (the front
end's side of the exchange: the request body source and the response sink)
and relays one exchange to an upstream::

    request head ─► balancer.pick() ─► pool.connection(origin)
                                         │
             ┌── send request head, pump request body, then watch the client
    nursery ─┤
             └── read response head ─► client, pump response body ─► client

Either side ending badly cancels the other. The upstream connection is marked
clean (and so goes back to the pool) only if the request was sent whole and the
response was read to its end without anything being cancelled.

Errors before the response head reached the client propagate as
:class:`~trioproxy.errors.ProxyError` for the front end to answer with their
status; after that, an upstream failure is
:class:`~trioproxy.errors.UpstreamBrokenMidBody` and the front end aborts the
client connection, so a truncated body is never taken for a whole one.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Protocol

import attrs
import trio

from trioproxy.balance.balancer import Balancer
from trioproxy.errors import (
    ProxyError,
    UpstreamBrokenMidBody,
    UpstreamClosed,
    UpstreamError,
    UpstreamTimeout,
)
from trioproxy.http.headers import (
    client_response_headers,
    get_first,
    new_request_id,
    request_id_from,
    upstream_request_headers,
)
from trioproxy.http.protocol import Body, EndOfMessage, RequestHead, ResponseHead
from trioproxy.upstream.connection import UpstreamConnection
from trioproxy.upstream.pool import UpstreamPool

log = logging.getLogger("trioproxy.engine")

_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}

_VIA = {b"1.1": b"1.1 trioproxy", b"1.0": b"1.0 trioproxy"}


def _via(http_version: bytes) -> bytes:
    """Our Via entry: the protocol version we received, then our name (RFC 9110 §7.6.3)."""
    return _VIA.get(http_version) or b"%b trioproxy" % http_version


IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Downstream(Protocol):
    """The front end's half of one exchange."""

    client_addr: str
    scheme: str

    def request_has_body(self) -> bool: ...

    async def receive_body(self) -> bytes:
        """The next chunk of the request body; ``b""`` once it ended.

        Raises:
            ClientDisconnected, ClientTimeout, ProtocolError, BodyTooLarge.
        """

    async def wait_disconnect(self) -> None:
        """Return only by raising ClientDisconnected when the client goes away."""

    async def send_head(self, head: ResponseHead) -> None: ...

    async def send_body(self, data: bytes) -> None: ...

    async def send_end(self) -> None: ...


@attrs.define
class ExchangeLog:
    """What happened, for the access log."""

    request_id: bytes = b""
    upstream: str = "-"
    status: int = 0
    bytes_out: int = 0


@attrs.define
class _RequestSide:
    client_error: ProxyError | None = None
    sent: bool = False
    upstream_write_failed: bool = False
    body_started: bool = False


@attrs.define
class Engine:
    balancer: Balancer
    pool: UpstreamPool
    read_timeout: float = 300.0
    preserve_host: bool = False

    async def handle(
        self, request: RequestHead, downstream: Downstream, record: ExchangeLog
    ) -> None:
        """Relay one exchange; see the module docstring for what it raises."""
        record.request_id = request_id_from(request.headers) or new_request_id()

        target = self.balancer.pick()
        record.upstream = target.text
        upstream_request = RequestHead(
            method=request.method,
            target=target.upstream_target(request.target),
            headers=upstream_request_headers(
                request.headers,
                client_addr=downstream.client_addr,
                scheme=downstream.scheme,
                upstream_host=target.origin.host_header,
                preserve_host=self.preserve_host,
                request_id=record.request_id,
                via=_via(request.http_version),
            ),
            http_version=b"1.1",
        )
        has_body = downstream.request_has_body()
        if has_body and get_first(upstream_request.headers, b"content-length") is None:
            upstream_request.headers.append((b"transfer-encoding", b"chunked"))

        fresh = False
        while True:
            async with self.pool.connection(target.origin, fresh=fresh) as conn:
                try:
                    await self._exchange(conn, upstream_request, downstream, record)
                    return
                except UpstreamClosed:
                    # A keep-alive connection the server closed just as we picked
                    # it: the request was never processed. Try once more on a new
                    # connection, where that is safe (RFC 9112 §9.3.1).
                    if not (conn.reused and not fresh and not has_body):
                        raise
                    if request.method not in IDEMPOTENT:
                        raise
            fresh = True

    async def _exchange(
        self,
        conn: UpstreamConnection,
        request: RequestHead,
        downstream: Downstream,
        record: ExchangeLog,
    ) -> None:
        side = _RequestSide()
        error: ProxyError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                self._send_request, conn, request, downstream, side, nursery.cancel_scope
            )
            try:
                await self._relay_response(conn, downstream, record)
            except ProxyError as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if side.client_error is not None:
            raise side.client_error
        if error is not None:
            raise error
        conn.clean = side.sent

    async def _send_request(
        self,
        conn: UpstreamConnection,
        request: RequestHead,
        downstream: Downstream,
        side: _RequestSide,
        cancel_scope: trio.CancelScope,
    ) -> None:
        """Send the request, then watch for the client leaving. Never raises.

        A client-side failure is recorded and cancels the exchange; an upstream
        write failure only stops the sending: the response side then learns what
        the upstream did (it may well have answered, e.g. 413, before closing).
        """
        protocol = conn.protocol
        try:
            await conn.send_mapped(protocol.send_head(request))
            # Read the body source to its end even when the request has no
            # body: that is how the front end learns the request is complete.
            while data := await downstream.receive_body():
                side.body_started = True
                await conn.send_mapped(protocol.send_body(data))
            await conn.send_mapped(protocol.send_end())
            side.sent = True
            await downstream.wait_disconnect()
        except UpstreamError:
            side.upstream_write_failed = True
        except ProxyError as exc:
            side.client_error = exc
            cancel_scope.cancel()

    async def _relay_response(
        self, conn: UpstreamConnection, downstream: Downstream, record: ExchangeLog
    ) -> None:
        event = await conn.next_event(self.read_timeout)
        if not isinstance(event, ResponseHead):
            raise UpstreamClosed(f"{conn.origin}: expected a response head, got {event!r}")
        record.status = event.status_code
        headers = event.headers
        if get_first(headers, b"transfer-encoding") is not None:
            # RFC 9112 §6.3 item 3: Transfer-Encoding overrides Content-Length,
            # and a proxy must remove the latter before forwarding.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        await downstream.send_head(
            ResponseHead(
                status_code=event.status_code,
                headers=client_response_headers(
                    headers, request_id=record.request_id, via=_via(event.http_version)
                ),
                reason=event.reason or _PHRASES.get(event.status_code, b""),
            )
        )
        try:
            while True:
                event = await conn.next_event(self.read_timeout)
                if type(event) is Body:
                    record.bytes_out += len(event.data)
                    await downstream.send_body(event.data)
                elif type(event) is EndOfMessage:
                    break
                else:
                    raise UpstreamClosed(f"{conn.origin}: unexpected {event!r} in body")
        except (UpstreamError, UpstreamTimeout) as exc:
            raise UpstreamBrokenMidBody(f"{conn.origin}: {exc.detail}") from None
        await downstream.send_end()
