"""WebSocket over ASGI: the engine's :class:`~trioproxy.engine.WebSocketDownstream`
as ASGI messages.

The engine opens the upstream WebSocket first (pick, retry, headers, path
rewrite: ``Engine.handle_websocket``) with the client's subprotocols, and only
then is the client accepted, with the upstream's choice (``websocket.accept``
with ``subprotocol``: deferred negotiation). An upstream that refuses (say 403
with a body) is relayed as that HTTP response with the ``websocket.http.response``
extension when the server offers it (hypercorn does); otherwise the client is
closed before accept, which the server answers with 403.

Once accepted, messages are relayed, one task per direction. The server ends
the client's WebSocket and hands over whole messages, so on this side the
proxy relays messages, not frames: the upstream's side is a wsproto connection
whose fragments are joined into one ``websocket.send``. The limits are the
standalone tunnel's: an upstream message over ``max_message_size`` gets 1009
upstream and 1011 to the client, a client message over it 1009 to the client and
1001 upstream; with ``idle_timeout``, no message either way for that long closes
both with 1001. Pings are answered by each side's own endpoint (hypercorn answers
the client's).

Close codes. An upstream's close code and reason reach the client as they came
(``websocket.close``). The client's close code reaches the upstream as far as
the server reports it in ``websocket.disconnect``. hypercorn (0.18) loses it:
it answers the client's close frame itself and reports 1006 (abnormal
closure), whatever code the client sent, and 1006 may not be sent (RFC 6455
§7.4.1), so the upstream then gets 1001 (going away), as when a client's
connection ends without a close frame. A server that reports the code
(uvicorn does) gets it passed on.
"""

from __future__ import annotations

import logging

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from trioproxy.errors import ClientDisconnected
from trioproxy.http.answers import Answer, framed
from trioproxy.http.protocol import Headers, ResponseHead
from trioproxy.server.ws_tunnel import CLOSE_REPLY_TIMEOUT, DEFAULT_MAX_MESSAGE_SIZE
from trioproxy.upstream.websocket import UpstreamWebSocket

from .types import Receive, Scope, Send

log = logging.getLogger("trioproxy.asgi")

READ_SIZE = 65536
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
MESSAGE_TOO_BIG = 1009
#: Codes that describe a close but may not be sent in a close frame (RFC 6455 §7.4.1).
_LOCAL_ONLY = frozenset({1005, 1006, 1015})
#: The close code before accept; hypercorn and uvicorn answer it with HTTP 403.
CLOSE_BEFORE_ACCEPT = 1008

_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class AsgiWebSocket:
    """One WebSocket's client side over ASGI (the engine's ``WebSocketDownstream``).

    Call :meth:`connect` first (it takes ``websocket.connect``).
    """

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float | None = None,
    ) -> None:
        client = scope.get("client")
        self.client_addr = str(client[0]) if client else "unknown"
        self.scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
        self._receive = receive
        self._send = send
        self._max = max_message_size
        self._idle_timeout = idle_timeout
        self.http_response = "websocket.http.response" in (scope.get("extensions") or {})
        #: ``websocket.accept`` was sent.
        self.accepted = False
        #: The client was answered (accepted, refused or closed).
        self.answered = False
        self.bytes_out = 0

    async def connect(self) -> None:
        """Take the ``websocket.connect`` message.

        Raises:
            ClientDisconnected: the client left first.
        """
        message = await self._receive()
        if message["type"] != "websocket.connect":
            raise ClientDisconnected(f"{message['type']} before websocket.connect")

    # --- WebSocketDownstream ---------------------------------------------------------

    async def wait_disconnect(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                raise ClientDisconnected("websocket.disconnect during the upstream handshake")

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        """The upstream's refusal, as an HTTP response where the server can send one,
        else a close before accept (403 from the server)."""
        if head is not None:
            self.answered = True
            if not self.http_response:
                log.info("upstream refused a WebSocket with %d: closing", head.status_code)
                await self._send({"type": "websocket.close", "code": CLOSE_BEFORE_ACCEPT})
                return
            await self._send(
                {
                    "type": "websocket.http.response.start",
                    "status": head.status_code,
                    "headers": head.headers,
                }
            )
        if not self.http_response:
            return
        body = b"".join(chunks)
        if body or end:
            await self._send(
                {"type": "websocket.http.response.body", "body": body, "more_body": not end}
            )

    async def accept(self, subprotocol: str | None, headers: Headers) -> None:
        self.answered = self.accepted = True
        await self._send(
            {"type": "websocket.accept", "subprotocol": subprotocol, "headers": headers}
        )

    async def relay(self, upstream: UpstreamWebSocket, early: bytes) -> str:
        relay = _MessageRelay(self._receive, self._send, upstream, self._max, self._idle_timeout)
        try:
            return await relay.run(early)
        finally:
            self.bytes_out = relay.bytes_out

    # --- the front end's own answers -------------------------------------------------

    async def refuse(self, answer: Answer, close_code: int) -> None:
        """Answer a handshake the proxy turns down itself (an error, a ``respond``
        route): as an HTTP response where the server can send one, else a close
        with ``close_code`` before accept."""
        self.answered = True
        if self.http_response:
            head = framed(answer, close=False)
            await self._send(
                {"type": "websocket.http.response.start", "status": answer.status, "headers": head}
            )
            await self._send({"type": "websocket.http.response.body", "body": answer.body})
        else:
            await self._send({"type": "websocket.close", "code": close_code})

    async def close(self, code: int, reason: str = "") -> None:
        """Close an accepted WebSocket (the proxy's own close)."""
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


class _MessageRelay:
    """Messages both ways between the ASGI client and the upstream's frames."""

    def __init__(
        self,
        receive: Receive,
        send: Send,
        upstream: UpstreamWebSocket,
        limit: int,
        idle_timeout: float | None = None,
    ) -> None:
        self._idle_timeout = idle_timeout
        #: trio time of the last message either way (for the idle timeout).
        self._last = trio.current_time()
        self._receive = receive
        self._send = send
        self._upstream = upstream
        self._ws = Connection(ConnectionType.CLIENT)
        self._limit = limit
        self._client_closed = False
        self._upstream_done = False
        self.note = ""
        self.bytes_out = 0

    async def run(self, early: bytes) -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._client_to_upstream, nursery.cancel_scope)
            if self._idle_timeout:
                nursery.start_soon(self._watch_idle, self._idle_timeout, nursery.cancel_scope)
            await self._upstream_to_client(early)
            if self._client_closed:
                nursery.cancel_scope.cancel()
            else:
                # The upstream ended it: the client's own disconnect follows; don't
                # wait for it longer than a close reply may take.
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_REPLY_TIMEOUT
        return self.note

    async def _upstream_write(self, event: Event) -> None:
        if self._ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        data = self._ws.send(event)
        try:
            await self._upstream.stream.send_all(data)
        except _IO_ERRORS:
            self._upstream_done = True

    async def _client_send(self, message: dict[str, object]) -> None:
        if self._client_closed:
            return
        try:
            await self._send(message)
        except _IO_ERRORS:
            self._client_closed = True

    async def _client_to_upstream(self, stop: trio.CancelScope) -> None:
        while True:
            try:
                message = await self._receive()
            except _IO_ERRORS:
                message = {"type": "websocket.disconnect", "code": 1006}
            kind = message["type"]
            self._last = trio.current_time()
            if kind == "websocket.receive":
                text = message.get("text")
                event: TextMessage | BytesMessage
                if text is not None:
                    event = TextMessage(data=text)
                    # A str of n characters is at most 4n bytes of UTF-8.
                    size = len(text.encode("utf-8")) if len(text) * 4 > self._limit else 0
                else:
                    event = BytesMessage(data=bytes(message.get("bytes") or b""))
                    size = len(event.data)
                if size > self._limit:
                    # As the standalone tunnel: 1009 to the client, 1001 upstream.
                    await self._too_big_from_client()
                    stop.cancel()
                    return
                await self._upstream_write(event)
            elif kind == "websocket.disconnect":
                self._client_closed = True
                code = int(message.get("code", 1000))
                reason = str(message.get("reason") or "")
                if code in _LOCAL_ONLY:
                    code, reason = GOING_AWAY, "client went away"
                if not self.note:
                    self.note = f"client closed {message.get('code', 1000)}"
                await self._upstream_write(CloseConnection(code=code, reason=reason))
                if not self._upstream_done:
                    # The upstream's reply is read by the other task (which then
                    # ends the relay); it is not waited for longer than this.
                    await trio.sleep(CLOSE_REPLY_TIMEOUT)
                stop.cancel()
                return

    async def _watch_idle(self, idle: float, stop: trio.CancelScope) -> None:
        """No message either way for ``idle`` seconds: both sides get 1001, as in the
        standalone tunnel. It wakes once per ``idle`` period, not per message."""
        # The deadline trails the last message; it moves without waking this task.
        while (wait := self._last + idle - trio.current_time()) > 0:  # noqa: ASYNC110
            await trio.sleep(wait)
        self.note = self.note or "idle timeout"
        await self._upstream_write(CloseConnection(GOING_AWAY, "idle timeout"))
        await self._client_send(
            {"type": "websocket.close", "code": GOING_AWAY, "reason": "idle timeout"}
        )
        self._client_closed = True
        if not self._upstream_done:
            await trio.sleep(CLOSE_REPLY_TIMEOUT)
        stop.cancel()

    async def _too_big_from_client(self) -> None:
        await self._upstream_write(CloseConnection(GOING_AWAY, "client message too big"))
        await self._client_send(
            {"type": "websocket.close", "code": MESSAGE_TOO_BIG, "reason": "message too big"}
        )
        self._client_closed = True
        self.note = self.note or "client message over the limit"
        if not self._upstream_done:
            await trio.sleep(CLOSE_REPLY_TIMEOUT)  # for the upstream's close reply

    async def _upstream_to_client(self, early: bytes) -> None:
        ws = self._ws
        stream = self._upstream.stream
        parts: list[bytes | str] = []
        size = 0
        if early:
            ws.receive_data(early)
        try:
            while True:
                for event in ws.events():
                    if isinstance(event, Message):
                        size += len(event.data)
                        if size > self._limit:
                            await self._upstream_write(
                                CloseConnection(MESSAGE_TOO_BIG, "message too big")
                            )
                            await self._client_send(
                                {
                                    "type": "websocket.close",
                                    "code": INTERNAL_ERROR,
                                    "reason": "upstream message too big",
                                }
                            )
                            self.note = self.note or "upstream message over the limit"
                            return
                        parts.append(event.data)
                        self._last = trio.current_time()
                        if event.message_finished:
                            self.bytes_out += size
                            if isinstance(event, TextMessage):
                                text = "".join(p for p in parts if isinstance(p, str))
                                await self._client_send({"type": "websocket.send", "text": text})
                            else:
                                whole = b"".join(p for p in parts if isinstance(p, bytes))
                                await self._client_send({"type": "websocket.send", "bytes": whole})
                            parts, size = [], 0
                    elif isinstance(event, Ping):
                        await self._upstream_write(event.response())
                    elif isinstance(event, CloseConnection):
                        if ws.state is ConnectionState.REMOTE_CLOSING:
                            # The upstream closed first: answer it, tell the client.
                            await self._upstream_write(event.response())
                            code = event.code if event.code not in _LOCAL_ONLY else 1000
                            await self._client_send(
                                {
                                    "type": "websocket.close",
                                    "code": code,
                                    "reason": event.reason or "",
                                }
                            )
                            self.note = self.note or f"upstream closed {event.code}"
                        self._upstream_done = True
                        return
                if self._upstream_done:
                    break
                try:
                    received = await stream.receive_some(READ_SIZE)
                except _IO_ERRORS:
                    received = b""
                if not received:
                    break
                ws.receive_data(bytes(received))
        except RemoteProtocolError as exc:
            log.info("upstream WebSocket broke RFC 6455: %s", exc)
            await self._client_send(
                {"type": "websocket.close", "code": INTERNAL_ERROR, "reason": "upstream error"}
            )
            self.note = self.note or "upstream protocol error"
            self._upstream_done = True
            return
        # The upstream's connection ended without a close frame.
        self._upstream_done = True
        if not self._client_closed:
            await self._client_send(
                {"type": "websocket.close", "code": GOING_AWAY, "reason": "upstream went away"}
            )
            self.note = self.note or "upstream went away"
