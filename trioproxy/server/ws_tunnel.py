"""The WebSocket tunnel: two wsproto connections, one task per direction.

The tunnel runs one task per direction in one nursery. A task reads from its
side, feeds that side's wsproto connection and writes each event to the other
side before it reads again, so a slow reader slows the writer down through
the TCP windows and the proxy holds at most one read (64 KiB) and one frame
per direction: there is no queue to grow.

* Data frames are forwarded as they arrive: a message is never reassembled;
  what of it came in one read goes on as one frame (a large frame is split,
  a run of tiny fragments is joined), in one write; text stays UTF-8-checked
  (wsproto decodes it incrementally, and a message that is not UTF-8 fails
  with 1007, as an endpoint must).
* Ping and pong frames pass through with their payloads: a client's ping is
  answered by the upstream, so it measures the whole path, and the
  upstream's pings reach the client. Neither is answered by the proxy.
* A message over ``max_message_size`` fails with 1009 (RFC 6455 §7.4.1);
  its first part may have reached the other side already.
* The idle timeout (off by default) ends a tunnel in which no byte arrived
  from either side for that long.

Closing. A close frame is forwarded with its code and reason, and the other
side's answer is forwarded back, so both peers see the close handshake of
the other (RFC 6455 §5.5.1, §7). When it cannot be so, the proxy closes each
side itself; 1005 and 1006 are never sent (§7.4.1), and a side that closed
first is always answered with its own code:

==========================================  =========================  ==========================
what happened                               client gets                upstream gets
==========================================  =========================  ==========================
client sent a close frame                   the upstream's answer      that close
upstream sent a close frame                 that close                 the client's answer
client connection ended, no close frame     —                          1001 client went away
upstream connection ended, no close frame   1001 upstream went away    —
client broke RFC 6455 (bad frame, UTF-8)    then 1002 / 1007           first 1001 client error
upstream broke RFC 6455                     first 1011 upstream error  then 1002 / 1007
client message over the limit               then 1009                  first 1001
upstream message over the limit             first 1011                 then 1009
no byte either way for the idle timeout     1001 idle timeout          1001 idle timeout
proxy shutting down (after the grace)       1001 going away            1001 going away
close answer not back in ``CLOSE_TIMEOUT``  its own code               —
==========================================  =========================  ==========================

A side that broke the rules is read no more; the other side is told first,
and what it still sends (say, the echo of the last good message) goes on to
the culprit until its close answer, which is what the two would have seen
connected directly; then the culprit gets its code and, its frames being
unreadable, the end of our side of the TCP connection (RFC 6455 §7.1.7).

After closing a side itself the proxy waits up to ``CLOSE_REPLY_TIMEOUT`` for
that side's answer, so that its close frame is read before the TCP connection
ends. All of that cleanup is shielded: on shutdown the handler nursery's
deadline cancels the tunnel, which then sends its 1001s and returns.

Conformance: Autobahn|Testsuite's fuzzing client (cases 1-7 and 9: framing,
pings, reserved bits and opcodes, fragmentation, UTF-8, close handshake,
limits) passes all 300 cases through the proxy as it does against the
upstream directly (tests/e2e/test_websocket.py, opt-in).
"""

from __future__ import annotations

import logging
import math
from typing import Final

import attrs
import trio
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

log = logging.getLogger("trioproxy.websocket")

READ_SIZE: Final = 65536
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: How long a forwarded close frame may wait for the other side's answer.
CLOSE_TIMEOUT = 5.0
#: How long the proxy waits for the answer to a close frame of its own.
CLOSE_REPLY_TIMEOUT = 1.0

_CloseFrame = tuple[int, str]


# --- the tunnel -------------------------------------------------------------------------


class _Gone(Exception):
    """A write to ``side`` failed: its connection is gone."""

    def __init__(self, side: _Side) -> None:
        self.side = side


_RELAYING = (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING)
_ANSWERABLE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


class _Side:
    """One peer of the tunnel: its stream and its wsproto connection."""

    __slots__ = (
        "broken",
        "bytes_in",
        "eof",
        "message_size",
        "messages_in",
        "name",
        "out",
        "owed_close",
        "parser_failed",
        "pump_scope",
        "reading",
        "received_close",
        "stream",
        "ws",
    )

    def __init__(self, name: str, stream: trio.abc.Stream, ws: Connection) -> None:
        self.name = name
        self.stream = stream
        self.ws = ws
        self.eof = False  # nothing more will be read
        self.broken = False  # nothing more can be written (a write failed or was cut)
        self.parser_failed = False  # wsproto refused its bytes: its frames are not read
        self.received_close: _CloseFrame | None = None
        #: It broke the protocol or a limit: the close it gets once the other side answered.
        self.owed_close: _CloseFrame | None = None
        self.message_size = 0  # bytes of the message being received so far
        self.messages_in = 0
        self.bytes_in = 0
        self.pump_scope: trio.CancelScope | None = None  # the task reading this side
        self.out: list[bytes] = []  # framed, not yet written
        self.reading = False  # that task waits for bytes (and writes nothing)

    async def receive(self) -> bytes | bytearray:
        """The next bytes; ``b""`` once the peer closed or reset the connection."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True
            data = b""
        if not data:
            self.eof = True
        return data

    def queue(self, event: Event) -> None:
        """Frame ``event`` for the next ``flush`` (wsproto's state moves now)."""
        self.out.append(self.ws.send(event))

    def queue_close(self, frame: _CloseFrame) -> None:
        self.queue(CloseConnection(code=frame[0], reason=frame[1]))

    async def flush(self) -> None:
        """Write what was queued, in one write.

        Raises:
            _Gone: the peer's connection is gone.
        """
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        # Until the write completes: one cut short (cancelled) leaves half a
        # frame on the wire, after which nothing else may be sent.
        self.broken = True
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _Gone(self) from None
        self.broken = False

    async def send_close(self, frame: _CloseFrame) -> None:
        self.queue_close(frame)
        await self.flush()


@attrs.frozen
class _Ending:
    note: str
    to_client: _CloseFrame = (CloseReason.GOING_AWAY, "going away")
    to_upstream: _CloseFrame = (CloseReason.GOING_AWAY, "going away")


_SHUTDOWN: Final = _Ending("proxy shutting down")
_IDLE: Final = _Ending(
    "idle timeout",
    to_client=(CloseReason.GOING_AWAY, "idle timeout"),
    to_upstream=(CloseReason.GOING_AWAY, "idle timeout"),
)
_CLOSE_TIMED_OUT: Final = _Ending("close handshake timed out")


class Tunnel:
    """Relays one WebSocket between a client and an upstream (see the module docstring).

    Resource handling: the streams belong to the caller, who closes them after
    ``run`` returns; ``run`` sends what close frames are owed first.
    """

    def __init__(
        self,
        client_stream: trio.abc.Stream,
        client_ws: Connection,
        upstream_stream: trio.abc.Stream,
        upstream_ws: Connection,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float | None = None,
    ) -> None:
        self.client = _Side("client", client_stream, client_ws)
        self.upstream = _Side("upstream", upstream_stream, upstream_ws)
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.ending: _Ending | None = None
        self._relay_scope = trio.CancelScope()
        self._idle_scope = trio.CancelScope()
        self._first_close: str | None = None
        #: Set when a side broke the protocol or a limit: how the tunnel will end.
        self._failure: _Ending | None = None

    async def run(self) -> str:
        """Relay until the tunnel ends; return how it ended, for the log."""
        try:
            with self._idle_scope:
                self._touch()
                with self._relay_scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, self.client, self.upstream)
                        nursery.start_soon(self._pump, self.upstream, self.client)
                if self._relay_scope.cancelled_caught and self.ending is None:
                    self.ending = self._failure or _CLOSE_TIMED_OUT
            if self._idle_scope.cancelled_caught and self.ending is None:
                self.ending = _IDLE
        finally:
            # Also when cancelled from outside (shutdown): the peers are told.
            ending = self.ending or _SHUTDOWN
            with trio.CancelScope(shield=True):
                await self._finish(ending)
        return ending.note

    # -- relaying ------------------------------------------------------------------------

    def _touch(self) -> None:
        if self.idle_timeout is not None:
            self._idle_scope.deadline = trio.current_time() + self.idle_timeout

    def _end(self, ending: _Ending) -> None:
        """Stop relaying: reads stop now; a write under way may finish, briefly.

        Cutting a write short would leave half a frame on the wire and nothing
        more could be sent on that side, not even the close frame it is owed
        (or the last one of a close handshake, being written as it ends).
        """
        if self.ending is None:
            self.ending = self._failure or ending
        for side in (self.client, self.upstream):
            if side.reading and side.pump_scope is not None:
                side.pump_scope.cancel()
        deadline = trio.current_time() + CLOSE_REPLY_TIMEOUT
        if self._relay_scope.deadline > deadline:
            self._relay_scope.deadline = deadline

    def _closing(self) -> None:
        """A close is under way: the answer has CLOSE_TIMEOUT; idle time no longer counts."""
        if math.isinf(self._relay_scope.deadline):
            self._relay_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        self._idle_scope.deadline = math.inf

    async def _pump(self, src: _Side, dst: _Side) -> None:
        with trio.CancelScope() as src.pump_scope:
            try:
                await self._relay(src, dst)
            except _Gone as exc:
                self._end(self._went_away(exc.side))

    async def _relay(self, src: _Side, dst: _Side) -> None:
        """Forward ``src``'s events to ``dst`` until ``src`` has nothing more to say."""
        # What arrived with the handshake (trailing data) comes first.
        await self._forward_events(src, dst)
        while self.ending is None and src.owed_close is None:
            src.reading = True
            try:
                data = await src.receive()
            finally:
                src.reading = False
            if not data:
                if src.ws.state in _RELAYING:  # no close frame came first
                    self._end(self._went_away(src))
                return  # after its close frame: the other direction finishes
            self._touch()
            src.bytes_in += len(data)
            if src.ws.state not in _RELAYING:
                continue  # after its close frame, the rest is ignored (RFC 6455 §1.4)
            src.ws.receive_data(bytes(data))
            await self._forward_events(src, dst)

    async def _forward_events(self, src: _Side, dst: _Side) -> None:
        """Forward what ``src`` said in the bytes fed last, in one write to ``dst``.

        One write per read keeps memory to one read's worth, and the pieces
        of one message that arrived together go as one frame: a message sent
        in many tiny fragments costs the proxy one frame per read, not one
        per fragment.
        """
        message: list[str | bytes | bytearray] = []  # pieces of a message not yet queued
        kind: type[TextMessage] | type[BytesMessage] = BytesMessage
        for event in src.ws.events():
            if self.ending is not None or src.owed_close is not None:
                break
            if isinstance(event, (TextMessage, BytesMessage)):
                if not self._admit(event, src):
                    message.clear()  # over the limit: dst was sent a close instead
                    break
                if dst.ws.state is not ConnectionState.OPEN:
                    continue  # dst sent its close frame: no more data (RFC 6455 §5.5.1)
                message.append(event.data)
                kind = type(event)
                if event.message_finished:
                    _queue_data(dst, kind, message, finished=True)
                continue
            _queue_data(dst, kind, message, finished=False)
            if isinstance(event, CloseConnection):
                self._forward_close(event, src, dst)
            elif isinstance(event, (Ping, Pong)) and dst.ws.state is ConnectionState.OPEN:
                dst.queue(type(event)(payload=event.payload))
        _queue_data(dst, kind, message, finished=False)
        await dst.flush()

    def _admit(self, event: TextMessage | BytesMessage, src: _Side) -> bool:
        """Count a piece of ``src``'s message; False (and fail src) past the limit."""
        data = event.data
        if isinstance(data, str):
            # str.isascii() is O(1): the UTF-8 length is only counted when it differs.
            size = len(data) if data.isascii() else len(data.encode("utf-8"))
        else:
            size = len(data)
        src.message_size += size
        if src.message_size > self.max_message_size:
            self._fail(src, (CloseReason.MESSAGE_TOO_BIG, "message too big"))
            return False
        if event.message_finished:
            src.message_size = 0
            src.messages_in += 1
        return True

    def _forward_close(self, event: CloseConnection, src: _Side, dst: _Side) -> None:
        if src.ws.state in _RELAYING:
            # Not a close frame: wsproto refused src's bytes (RFC 6455 §7.1.7).
            src.parser_failed = True
            self._fail(src, (event.code, event.reason or ""))
            return
        src.received_close = (event.code, event.reason or "")
        if self._first_close is None:
            self._first_close = f"closed by {src.name}: {event.code} {event.reason or ''}"
        if dst.ws.state in _ANSWERABLE:
            # A side that broke the rules gets its own code, now that src answered.
            dst.queue_close(dst.owed_close or src.received_close)
        if self._failure is not None or (
            src.ws.state is ConnectionState.CLOSED and dst.ws.state is ConnectionState.CLOSED
        ):
            self._end(_Ending(self._first_close.rstrip()))
            return
        self._closing()

    def _fail(self, culprit: _Side, frame: _CloseFrame) -> None:
        """``culprit`` broke the protocol or a limit (RFC 6455 §7.1.7, §7.4.1).

        Nothing more is read from it. The other side is told first and what
        it still sends goes on to the culprit until its close answer, as if
        the two had been connected directly (an echo of the culprit's last
        good message still reaches it); then the culprit gets ``frame``.
        """
        culprit.owed_close = frame
        what = "message over the limit" if frame[0] == 1009 else f"broke the protocol ({frame[0]})"
        if culprit is self.client:
            other = self.upstream
            to_other: _CloseFrame = (
                CloseReason.GOING_AWAY,
                f"client {_SHORT.get(frame[0], 'error')}",
            )
            self._failure = _Ending(f"client {what}", to_client=frame, to_upstream=to_other)
        else:
            other = self.client
            to_other = (CloseReason.INTERNAL_ERROR, f"upstream {_SHORT.get(frame[0], 'error')}")
            self._failure = _Ending(f"upstream {what}", to_client=to_other, to_upstream=frame)
        if culprit.ws.state is not ConnectionState.OPEN or other.ws.state is not (
            ConnectionState.OPEN
        ):
            # A close handshake was already under way: nothing to wait for.
            self._end(self._failure)
            return
        other.queue_close(to_other)  # written by the culprit's task, the other's writer
        self._closing()

    # -- endings -------------------------------------------------------------------------

    def _went_away(self, side: _Side) -> _Ending:
        if side is self.client:
            return _Ending("client went away", to_upstream=(1001, "client went away"))
        return _Ending("upstream went away", to_client=(1001, "upstream went away"))

    async def _finish(self, ending: _Ending) -> None:
        """Send each side the close frame it is owed, then wait a little for answers."""
        with trio.move_on_after(CLOSE_REPLY_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close, self.client, ending.to_client)
                nursery.start_soon(self._close, self.upstream, ending.to_upstream)

    async def _close(self, side: _Side, frame: _CloseFrame) -> None:
        state = side.ws.state
        if side.broken or (side.eof and state in _RELAYING):
            return  # gone, or cut mid-frame: only the TCP close is left
        if state is ConnectionState.REMOTE_CLOSING and side.received_close is not None:
            frame = side.received_close  # its own close is answered with its code
        elif side.owed_close is not None:
            frame = side.owed_close
        if state in _ANSWERABLE:
            try:
                await side.send_close(frame)
            except _Gone:
                return
        if side.eof:
            return
        if side.parser_failed:
            # Its frames cannot be read, so no answer will be: end our side
            # of the connection (RFC 6455 §7.1.7) and drain to the peer's end,
            # so that closing does not reset the connection under our frame.
            if isinstance(side.stream, trio.abc.HalfCloseableStream):
                try:
                    await side.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
            while await side.receive():
                pass
            return
        if side.ws.state is not ConnectionState.LOCAL_CLOSING:
            return
        # Its answer to our close, so that our frame is read before the
        # connection closes: closing a socket with unread data sends a reset.
        while data := await side.receive():
            side.ws.receive_data(bytes(data))
            if any(isinstance(event, CloseConnection) for event in side.ws.events()):
                return


_SHORT: Final = {1009: "message too big", 1007: "sent invalid UTF-8"}


def _queue_data(
    dst: _Side,
    kind: type[TextMessage] | type[BytesMessage],
    pieces: list[str | bytes | bytearray],
    *,
    finished: bool,
) -> None:
    """Queue the pieces of a message gathered so far as one frame (and forget them)."""
    if not pieces and not finished:
        return
    if kind is TextMessage:
        text = "".join(pieces)  # type: ignore[arg-type]
        pieces.clear()
        if text or finished:  # an empty piece (a partial UTF-8 sequence held back) says nothing
            dst.queue(TextMessage(data=text, message_finished=finished))
    else:
        data = b"".join(pieces)  # type: ignore[arg-type]
        pieces.clear()
        if data or finished:
            dst.queue(BytesMessage(data=data, message_finished=finished))
