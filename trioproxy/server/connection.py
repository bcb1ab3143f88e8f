"""One client connection: the HTTP/1.1 server loop around the engine.

For each request on a keep-alive connection::

    read head (header timeout; keep-alive timeout while idle)
      ├─ refuse what a reverse proxy must not pass (absolute-form, CONNECT)
      ├─ engine.handle(head, self)   ← this object is the engine's Downstream
      └─ answer a ProxyError with its status, or abort if the response started

The connection closes after a response when the client or the upstream asked
for it, when the request body was not read to its end, or while draining. When
an error is answered before the request was read whole, the close is graceful
(RFC 9112 §9.6): shut our side, read and discard a bounded amount, then close,
so that the client reads the response instead of a reset.

Resource handling: ``serve`` owns the stream and closes it on every path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from trioproxy.config.model import ServerSettings
from trioproxy.engine import Engine
from trioproxy.errors import (
    BodyTooLarge,
    ClientDisconnected,
    ClientTimeout,
    ProtocolError,
    ProxyError,
    RelayError,
    UpstreamBrokenMidBody,
)
from trioproxy.front import FrontExchange
from trioproxy.http.answers import Answer, admission_error, error_answer, framed
from trioproxy.http.h11_impl import H11Server
from trioproxy.http.parsers import server_factory
from trioproxy.http.protocol import (
    NEED_DATA,
    PAUSED,
    Body,
    ConnectionClosed,
    EndOfMessage,
    RequestHead,
    ResponseHead,
    ServerProtocol,
)
from trioproxy.relay_hub import ClientSink
from trioproxy.server.websocket import WebSocketSettings, is_websocket_upgrade, serve_websocket
from trioproxy.sockets import FastSocketStream, receive_ready, socket_of

log = logging.getLogger("trioproxy.server")

READ_SIZE = 65536
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 2.0


class ServerState:
    """What every connection of one listener shares: settings and the drain switch."""

    def __init__(
        self,
        engine: Engine,
        *,
        header_timeout: float = 10.0,
        body_timeout: float = 60.0,
        keepalive_timeout: float = 75.0,
        max_header_size: int = 65536,
        scheme: str = "http",
        protocol_factory: Callable[[int], ServerProtocol] = H11Server,
        websocket: WebSocketSettings | None = None,
    ) -> None:
        self.engine = engine
        self.websocket = websocket or WebSocketSettings()
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_header_size = max_header_size
        self.scheme = scheme
        self.protocol_factory = protocol_factory
        self.draining = False
        self._idle: set[ClientConnection] = set()
        self.open_connections = 0
        #: ``[server] metrics_path``: the metrics are served there too (None: not).
        self.metrics_path: bytes | None = None

    def configure(self, server: ServerSettings) -> None:
        """Take a reloaded ``[server]`` table's settings (connections read them as
        they go; the listening address is not among them)."""
        self.header_timeout = server.header_timeout
        self.body_timeout = server.body_timeout
        self.keepalive_timeout = server.keepalive_timeout
        self.max_header_size = server.max_header_size
        self.protocol_factory = server_factory(server.http)
        self.websocket = WebSocketSettings(
            max_message_size=server.ws_max_message_size,
            idle_timeout=server.ws_idle_timeout or None,
        )
        path = server.metrics_path
        self.metrics_path = path.encode() if path is not None else None

    def drain(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their response."""
        self.draining = True
        for connection in self._idle:
            connection._waiting.cancel()


class ClientConnection:
    def __init__(
        self, stream: trio.abc.Stream, state: ServerState, *, head_deadline: float | None = None
    ) -> None:
        """``head_deadline``: when the first request head must be complete, if the header
        timeout began before this object (a TLS handshake counts against it)."""
        self.stream = stream
        self._head_deadline = head_deadline
        self.state = state
        self.protocol: ServerProtocol = state.protocol_factory(state.max_header_size)
        self.client_addr = peer_host(stream)
        self.scheme = state.scheme
        self._response_started = False
        self._body_received = 0
        self._request: RequestHead | None = None
        self._waiting = trio.CancelScope()
        self._in_head = False
        #: The request body limit of the current exchange's route.
        self._body_limit: int | None = None

    # --- the loop -----------------------------------------------------------

    async def serve(self) -> None:
        state = self.state
        state.open_connections += 1
        # One cancel scope for the connection's life instead of one per request:
        # while a head is awaited its deadline is the keep-alive or header
        # timeout, while a request is handled it is lifted.
        waiting = self._waiting
        try:
            with waiting:
                first = True
                while True:
                    head = await self._next_request(first)
                    if head is None:
                        break
                    first = False
                    if not await self._handle(head):
                        break
                    self.protocol.start_next_cycle()
            if waiting.cancel_called and self._in_head:
                # Timed out in the middle of a head (slowloris): say so, then close.
                timeout = ClientTimeout("request head not complete in time")
                await self._answer_error(timeout, close=True)
        finally:
            state._idle.discard(self)
            state.open_connections -= 1
            await trio.aclose_forcefully(self.stream)

    async def _next_request(self, first: bool) -> RequestHead | None:
        """The next request head, or None when the connection should just close.

        The keep-alive timeout runs while the connection is idle; from the first
        byte of a head, the header timeout (against slowloris) runs instead. A
        timeout cancels ``self._waiting``, which ends the connection; ``serve``
        then answers 408 if a head had begun. The deadline is armed only when
        the head is not there yet: a busy keep-alive client has usually sent
        its next request by the time the previous one is answered.
        """
        protocol = self.protocol
        state = self.state
        in_head = self._in_head = protocol.buffered > 0
        if not in_head and state.draining:
            return None
        waiting = self._waiting
        armed = idle = False
        data: bytes | bytearray | None
        if not (first or in_head):
            # Let the other connections run first: under load, by the time this
            # one runs again its client has sent the next request, which is then
            # read without arming a deadline or waiting on the socket.
            await trio.lowlevel.checkpoint()
        try:
            while True:
                try:
                    event = protocol.next_event()
                except ProtocolError as exc:
                    self._in_head = False
                    await self._answer_error(exc, close=True)
                    return None
                if event is NEED_DATA:
                    data = self._receive_ready()
                    if data is None:
                        if not armed:
                            armed = True
                            idle = not (first or in_head)
                            if not in_head:
                                state._idle.add(self)  # drain may close it at once
                            waiting.deadline = trio.current_time() + (
                                state.keepalive_timeout if idle else state.header_timeout
                            )
                            if first and self._head_deadline is not None:
                                waiting.deadline = self._head_deadline
                        data = await self._receive()
                    if data and not in_head:
                        in_head = self._in_head = True
                        if armed:
                            state._idle.discard(self)
                            if idle:
                                waiting.deadline = trio.current_time() + state.header_timeout
                    protocol.receive_data(data)
                    continue
                if type(event) is RequestHead:
                    if armed:
                        waiting.deadline = math.inf
                        if waiting.cancel_called:
                            return None  # complete, but after its deadline: 408
                    self._in_head = False
                    if event.target.startswith(b"/") and event.method != b"CONNECT":
                        return event  # what admission_error passes, in short
                    if (refused := admission_error(event)) is None:
                        return event
                    await self._answer_error(refused, close=True)
                    return None
                if type(event) is ConnectionClosed or event is PAUSED:
                    return None
                raise AssertionError(f"unexpected {event!r} before a request head")
        except ClientDisconnected:
            self._in_head = False
            return None
        finally:
            if armed:
                state._idle.discard(self)

    async def _handle(self, head: RequestHead) -> bool:
        """Run one exchange; True if the connection may serve another request.

        The steps around the engine are ``trioproxy.front``'s; this writes their
        answers and errors on the connection."""
        self._request = head
        self._response_started = False
        self._body_received = 0
        self._body_limit = None
        exchange = FrontExchange(self.state.engine, head, peer=self.client_addr, scheme=self.scheme)
        try:
            answer = exchange.admit(self.state.metrics_path)
            self._body_limit = exchange.body_limit
            if answer is None:
                try:
                    # Before any upstream is picked: a refused request reaches none.
                    await exchange.admit_limits(trio.current_time())
                except ProxyError:
                    if not self.request_has_body():
                        await self.receive_body()  # its end: the connection stays usable
                    raise
                answer = exchange.own_answer(trio.current_time())
            if answer is not None:
                return await self._answer_locally(answer, exchange)
            request = exchange.request
            if not is_websocket_upgrade(request):
                with exchange.upstream() as route:
                    await self.state.engine.handle(request, route, self, exchange.record)
            else:
                with exchange.upstream(tunnel=True) as route:
                    note = await serve_websocket(
                        request,
                        self,
                        exchange.record,
                        route=route,
                        engine=self.state.engine,
                        settings=self.state.websocket,
                    )
                if note:
                    self._end(exchange, note)
                    return False  # the tunnel ended: so did the connection
        except ClientDisconnected:
            record = exchange.record
            record.status = record.status or 499
            self._end(exchange, "client gone")
            return False
        except UpstreamBrokenMidBody as exc:
            log.warning("aborting response to %s: %s", self.client_addr, exc.detail)
            self._end(exchange, "aborted")
            return False
        except ProxyError as exc:
            exchange.record.status = exc.status
            self._end(exchange, exc.detail)
            if self._response_started:
                return False
            close = self.state.draining or not self.protocol.peer_done
            await self._answer_error(exc, close=close, request_id=exchange.record.request_id)
            # The client may have asked to close (Connection: close, HTTP/1.0).
            return not close and self.protocol.reusable
        finally:
            exchange.release()
        self._end(exchange, "")
        if not self.protocol.peer_done:
            # The upstream answered before the request body ended.
            await self._linger()
            return False
        return self.protocol.reusable and not self.state.draining

    # --- Downstream, for the engine --------------------------------------------

    def request_has_body(self) -> bool:
        head = self._request
        assert head is not None
        for name, value in head.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return True
        return False

    async def receive_body(self) -> bytes:
        protocol = self.protocol
        if protocol.peer_done:
            # Asked again (a retry replays a request that has no body).
            return b""
        if self._body_received == 0 and protocol.client_is_waiting_for_100_continue:
            await self._send(protocol.send_informational(ResponseHead(100, [])))
        # Most calls find their event parsed already (a GET's end, the chunks of
        # a read): only a call that must wait pays for a timeout scope.
        event = protocol.next_event()
        while event is NEED_DATA:
            with trio.move_on_after(self.state.body_timeout):
                data = await self._receive()
                if not data:
                    raise ClientDisconnected("EOF in the request body")
                protocol.receive_data(data)
                event = protocol.next_event()
                continue
            raise ClientTimeout(f"no request body data for {self.state.body_timeout} s")
        if type(event) is Body:
            self._body_received += len(event.data)
            limit = self._body_limit
            if limit is not None and self._body_received > limit:
                raise BodyTooLarge(f"body over {limit} bytes")
            return event.data
        if type(event) is EndOfMessage:
            return b""
        if type(event) is ConnectionClosed:
            raise ClientDisconnected("EOF in request body")
        raise AssertionError(f"unexpected {event!r} in a request body")

    async def wait_disconnect(self) -> None:
        """Read ahead (pipelined requests) until the client closes; bounded by the head limit."""
        protocol = self.protocol
        while protocol.buffered < self.state.max_header_size:
            data = await self._receive()
            if not data:
                raise ClientDisconnected("client closed while waiting for the response")
            protocol.receive_data(data)
        await trio.sleep_forever()

    async def send_head(self, head: ResponseHead) -> None:
        await self.send_parts(head, [], False)

    async def send_body(self, data: bytes) -> None:
        await self.send_parts(None, [data], False)

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        """Head (if any), body chunks and end (if ``end``) in one write: one syscall and
        one trio checkpoint for a small response instead of three."""
        parts = []
        if head is not None:
            if self.state.draining:
                head = ResponseHead(
                    head.status_code, [*head.headers, (b"connection", b"close")], head.reason
                )
            parts.append(self.protocol.send_head(head))
            self._response_started = True
        self._frame_into(parts, chunks, end)
        # _send's body, not a call to it: one coroutine fewer per response.
        try:
            await self.stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
        except BaseException as exc:
            self.protocol.send_failed()
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                raise ClientDisconnected(repr(exc)) from None
            raise

    def _frame_into(self, parts: list[bytes], chunks: list[bytes], end: bool) -> None:
        """Append the bytes that carry body ``chunks`` (and the end, if ``end``)."""
        protocol = self.protocol
        for chunk in chunks:
            parts.append(protocol.send_body(chunk))
        if end:
            parts.append(protocol.send_end())

    def frame_body(self, chunks: list[bytes], end: bool) -> bytes:
        """The framing of ``send_parts`` for body chunks, without I/O (for the stream
        hub, which writes it)."""
        parts: list[bytes] = []
        self._frame_into(parts, chunks, end)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def hub_sink(self) -> ClientSink | None:
        """The client socket and framing for the stream hub; None unless the client is
        plain TCP (a ``FastSocketStream``)."""
        stream = self.stream
        if type(stream) is not FastSocketStream:
            return None
        return ClientSink(stream.socket, self.frame_body, self.protocol.send_failed)

    async def send_end(self) -> None:
        await self.send_parts(None, [], True)

    # --- I/O, mapped to our errors -------------------------------------------------

    def _receive_ready(self) -> bytes | None:
        """What the client sent already (no waiting); None if nothing or not a socket."""
        try:
            return receive_ready(self.stream, READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientDisconnected(repr(exc)) from None

    async def _receive(self) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientDisconnected(repr(exc)) from None

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except BaseException as exc:
            self.protocol.send_failed()
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                raise ClientDisconnected(repr(exc)) from None
            raise

    async def _answer_locally(self, answer: Answer, exchange: FrontExchange) -> bool:
        """Send an answer the proxy made (metrics, a handler or ``respond`` route, a
        CORS preflight)."""
        record = exchange.record
        record.status = answer.status
        while await self.receive_body():
            pass  # the request's body is read and dropped: it goes nowhere
        close = self.state.draining
        await self._answer(answer, close=close)
        record.bytes_out = len(answer.body)
        self._end(exchange, "")
        return not close and self.protocol.reusable

    async def _answer_error(self, exc: ProxyError, *, close: bool, request_id: bytes = b"") -> None:
        """A short text response naming the cause; then, if closing, a graceful close."""
        await self._answer(error_answer(exc, request_id=request_id), close=close)

    async def _answer(self, answer: Answer, *, close: bool) -> None:
        """A whole response made by the proxy; then, if closing, a graceful close."""
        status = answer.status
        try:
            head = ResponseHead(status, framed(answer, close=close), answer.reason)
            data = self.protocol.send_head(head)
            if self.protocol.request_method != b"HEAD":
                data += self.protocol.send_body(answer.body)
            data += self.protocol.send_end()
            await self._send(data)
        except ClientDisconnected:
            return
        except RelayError as err:  # the protocol refuses: nothing can be sent in this state
            log.debug("could not send %d to %s: %s", status, self.client_addr, err.detail)
            return
        if close:
            await self._linger()

    async def _linger(self) -> None:
        """Shut our side and discard what the client still sends, within bounds."""
        try:
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                discarded = 0
                while discarded < LINGER_BYTES:
                    data = await self.stream.receive_some(READ_SIZE)
                    if not data:
                        break
                    discarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _end(self, exchange: FrontExchange, note: str) -> None:
        exchange.end(note, bytes_in=self._body_received)


def peer_host(stream: trio.abc.Stream) -> str:
    sock = socket_of(stream)
    if sock is not None:
        try:
            peer = sock.getpeername()
        except OSError:
            return "unknown"
        if isinstance(peer, tuple):
            return str(peer[0])
    return "unknown"
