"""The WebSocket tunnel: a frame relay, one task per direction.

The tunnel runs one task per direction in one nursery. A task reads from its
side, reads the frame headers in those bytes (:mod:`~trioproxy.server.ws_frames`)
and writes what they hold to the other side before it reads again, so a slow
reader slows the writer down through the TCP windows and the proxy holds at
most one read (64 KiB) per direction: there is no queue to grow.

* Data frames are forwarded as they arrive, byte for byte when a read holds
  them whole (a client's masked frames go to the upstream with the client's
  key): a message is never reassembled; what of it came in one read goes on
  as one frame (a frame split across reads goes in pieces, a run of tiny
  fragments is joined), in one write; text stays UTF-8-checked (incrementally,
  and a message that is not UTF-8 fails with 1007, as an endpoint must).
* Ping and pong frames pass through as they came: a client's ping is
  answered by the upstream, so it measures the whole path, and the
  upstream's pings reach the client. Neither is answered by the proxy.
* A message over ``max_message_size`` fails with 1009 (RFC 6455 §7.4.1) as
  soon as a frame header says so; its first frames may have reached the
  other side already.
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
import os
from typing import Final

import attrs
import trio

from trioproxy.server.ws_frames import (
    MESSAGE_TOO_BIG,
    Close,
    CloseState,
    FrameReader,
    after_receiving_close,
    after_sending_close,
    close_frame,
)
from trioproxy.sockets import FastSocketStream

log = logging.getLogger("trioproxy.websocket")

READ_SIZE: Final = 65536
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: How long a forwarded close frame may wait for the other side's answer.
CLOSE_TIMEOUT = 5.0
#: How long the proxy waits for the answer to a close frame of its own.
CLOSE_REPLY_TIMEOUT = 1.0

_CloseFrame = tuple[int, str]
GOING_AWAY: Final = 1001
INTERNAL_ERROR: Final = 1011


# --- the tunnel -------------------------------------------------------------------------


class _Gone(Exception):
    """A write to ``side`` failed: its connection is gone."""

    def __init__(self, side: _Side) -> None:
        self.side = side


_RELAYING = (CloseState.OPEN, CloseState.LOCAL_CLOSING)
_ANSWERABLE = (CloseState.OPEN, CloseState.REMOTE_CLOSING)


class _Side:
    """One peer of the tunnel: its stream, its frame reader and its closing state."""

    __slots__ = (
        "broken",
        "bytes_in",
        "drained",
        "early",
        "eof",
        "fd",
        "is_client",
        "name",
        "out",
        "owed_close",
        "pump_scope",
        "reader",
        "reading",
        "received_close",
        "state",
        "stream",
    )

    def __init__(
        self, name: str, stream: trio.abc.Stream, early: bytes, *, max_message_size: int
    ) -> None:
        self.name = name
        self.stream = stream
        # A plain TCP connection is read and written through its descriptor
        # (see ``_read``); -1 for other streams (TLS, memory).
        plain = stream if isinstance(stream, (FastSocketStream, trio.SocketStream)) else None
        self.fd = plain.socket.fileno() if plain is not None else -1
        self.drained = True  # the last read emptied the socket's buffer
        self.is_client = name == "client"
        # A client's frames are masked; ours to the upstream must be (RFC 6455 §5.3).
        self.reader = FrameReader(masked=self.is_client, max_message_size=max_message_size)
        self.early = early  # bytes that came with the handshake, read first
        self.state = CloseState.OPEN
        self.eof = False  # nothing more will be read
        self.broken = False  # nothing more can be written (a write failed or was cut)
        self.received_close: _CloseFrame | None = None
        #: It broke the protocol or a limit: the close it gets once the other side answered.
        self.owed_close: _CloseFrame | None = None
        self.bytes_in = 0
        self.pump_scope: trio.CancelScope | None = None  # the task reading this side
        self.out: list[bytes] = []  # framed, not yet written
        self.reading = False  # that task waits for bytes (and writes nothing)

    async def receive(self) -> bytes | bytearray:
        """The next bytes; ``b""`` once the peer closed or reset the connection."""
        data: bytes | bytearray
        try:
            if self.fd >= 0:
                data = await self._read()
            else:
                data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True
            data = b""
        if not data:
            self.eof = True
        return data

    async def _read(self) -> bytes:
        """``receive_some`` on the socket's descriptor, as trio's ``FdStream`` reads a pipe.

        For a small frame, ``SocketStream`` and the trio socket under it (a
        conflict detector, error translation and two checkpoints, each a
        context manager) cost as much as the syscalls. Only this side's pump
        reads it; OSError is the caller's to catch.
        """
        if self.drained:
            # It had nothing more last time: wait rather than fail a read first.
            await trio.lowlevel.wait_readable(self.fd)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                continue
            self.drained = len(data) < READ_SIZE
            return data

    async def _write(self, data: bytes) -> None:
        """``send_all`` on the socket's descriptor (one task at a time writes a side)."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)

    @property
    def parser_failed(self) -> bool:
        """It broke RFC 6455: its frames are not read any more."""
        return self.reader.error is not None

    def received(self, close: Close) -> None:
        self.state = after_receiving_close(self.state)
        self.received_close = (close.code, close.reason)

    def queue_close(self, frame: _CloseFrame) -> None:
        """A close frame for the next ``flush`` (the state moves now)."""
        self.state = after_sending_close(self.state)
        self.out.append(close_frame(frame[0], frame[1], masked=not self.is_client))

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
            if self.fd >= 0:
                await self._write(data)
            else:
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
    to_client: _CloseFrame = (GOING_AWAY, "going away")
    to_upstream: _CloseFrame = (GOING_AWAY, "going away")


_SHUTDOWN: Final = _Ending("proxy shutting down")
_IDLE: Final = _Ending(
    "idle timeout",
    to_client=(GOING_AWAY, "idle timeout"),
    to_upstream=(GOING_AWAY, "idle timeout"),
)
_CLOSE_TIMED_OUT: Final = _Ending("close handshake timed out")


class Tunnel:
    """Relays one WebSocket between a client and an upstream (see the module docstring).

    Args:
        client_stream, upstream_stream: the two connections, handshakes done.
        client_early, upstream_early: what each sent after its handshake, in
            the same read (relayed first).

    Resource handling: the streams belong to the caller, who closes them after
    ``run`` returns; ``run`` sends what close frames are owed first.
    """

    def __init__(
        self,
        client_stream: trio.abc.Stream,
        upstream_stream: trio.abc.Stream,
        *,
        client_early: bytes = b"",
        upstream_early: bytes = b"",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float | None = None,
    ) -> None:
        limit = max_message_size
        self.client = _Side("client", client_stream, client_early, max_message_size=limit)
        self.upstream = _Side("upstream", upstream_stream, upstream_early, max_message_size=limit)
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
        """Forward ``src``'s frames to ``dst`` until ``src`` has nothing more to say."""
        # What arrived with the handshake (trailing data) comes first.
        if src.early:
            src.bytes_in += len(src.early)
            await self._forward(src.early, src, dst)
        while self.ending is None and src.owed_close is None:
            src.reading = True
            try:
                data = await src.receive()
            finally:
                src.reading = False
            if not data:
                if src.state in _RELAYING:  # no close frame came first
                    self._end(self._went_away(src))
                return  # after its close frame: the other direction finishes
            self._touch()
            src.bytes_in += len(data)
            if src.state not in _RELAYING:
                continue  # after its close frame, the rest is ignored (RFC 6455 §1.4)
            await self._forward(data, src, dst)

    async def _forward(self, data: bytes | bytearray, src: _Side, dst: _Side) -> None:
        """Forward the frames in ``data``, read from ``src``, in one write to ``dst``.

        One write per read keeps memory to one read's worth.
        """
        for item in src.reader.feed(data):
            if self.ending is not None or src.owed_close is not None:
                break
            if isinstance(item, Close):
                self._forward_close(item, src, dst)
            elif dst.state is CloseState.OPEN:
                # Once dst sent its close frame it gets no more data (RFC 6455 §5.5.1).
                dst.out.append(item)
        error = src.reader.error
        if error is not None and self.ending is None and src.owed_close is None:
            # src broke RFC 6455 or the limit (§7.1.7): its frames are read no more.
            self._fail(src, (error.code, error.reason))
        await dst.flush()

    def _forward_close(self, close: Close, src: _Side, dst: _Side) -> None:
        src.received(close)
        if self._first_close is None:
            self._first_close = f"closed by {src.name}: {close.code} {close.reason}"
        if dst.state in _ANSWERABLE:
            # A side that broke the rules gets its own code, now that src answered.
            assert src.received_close is not None
            dst.queue_close(dst.owed_close or src.received_close)
        if self._failure is not None or (
            src.state is CloseState.CLOSED and dst.state is CloseState.CLOSED
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
        what = (
            "message over the limit"
            if frame[0] == MESSAGE_TOO_BIG
            else f"broke the protocol ({frame[0]})"
        )
        if culprit is self.client:
            other = self.upstream
            to_other: _CloseFrame = (GOING_AWAY, f"client {_SHORT.get(frame[0], 'error')}")
            self._failure = _Ending(f"client {what}", to_client=frame, to_upstream=to_other)
        else:
            other = self.client
            to_other = (INTERNAL_ERROR, f"upstream {_SHORT.get(frame[0], 'error')}")
            self._failure = _Ending(f"upstream {what}", to_client=to_other, to_upstream=frame)
        if culprit.state is not CloseState.OPEN or other.state is not CloseState.OPEN:
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
        state = side.state
        if side.broken or (side.eof and state in _RELAYING):
            return  # gone, or cut mid-frame: only the TCP close is left
        if state is CloseState.REMOTE_CLOSING and side.received_close is not None:
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
        if side.state is not CloseState.LOCAL_CLOSING:
            return
        # Its answer to our close, so that our frame is read before the
        # connection closes: closing a socket with unread data sends a reset.
        while data := await side.receive():
            side.reader.feed(data)
            if side.reader.closed or side.parser_failed:
                return


_SHORT: Final = {1009: "message too big", 1007: "sent invalid UTF-8"}
