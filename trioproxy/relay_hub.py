"""One task that relays the rest of many response bodies: the stream hub.

Why. A streamed response (server-sent events, NDJSON) relayed by its own task
costs, per event, a trip through trio's run loop: the task's coroutine chain
is resumed, the upstream read, the client written, a second read fails with
``EAGAIN`` and ``wait_readable`` re-arms trio's one-shot epoll registration
(an ``epoll_ctl``). Measured on the bench's fan-out of 1000 streams
(``python -m bench.floor sse``), a bare relay built that way costs 40-65 µs of
CPU per event and a burst of 1000 events takes 40-75 ms to pass; the same bare
relay with one task relaying every stream (``--target relay-hub``) costs ~26 µs
and passes the burst in ~5 ms, as nginx does.

How. :class:`StreamHub` owns an ``epoll`` of its own, created and closed in its
task (:meth:`StreamHub.run`), and waits for it with ``wait_readable`` on its
descriptor. Registrations are level-triggered and kept while nothing changes:

* an upstream socket is registered for ``EPOLLIN`` from hand-over to the end
  of its body; on each readiness the hub reads once, parses with the
  exchange's own client protocol (``receive_data``/``next_event``: the parser
  seam, so h11 and httptools alike), frames what it got with the client
  side's framing function (:class:`ClientSink`) and writes it;
* when the client takes less than the whole write, the rest is kept, the
  upstream socket is unregistered (no more reading: backpressure, so memory
  stays bounded by one read) and the client socket registered for
  ``EPOLLOUT`` until the rest is written.

Busy streams thus cost two system calls per event and no ``epoll_ctl``. The hub
handles up to :data:`YIELD_EVERY` events before it yields to the other tasks.

Lifetimes. A stream is handed over by the exchange's task (:meth:`StreamHub.relay`),
which then waits for it to end and raises what ended it. The hub never closes a
socket: whoever opened it does, after ``relay`` returned or raised, and
``relay`` always unregisters the stream first, in a ``finally`` (so also when
the waiting task is cancelled: client gone, drain, grace expiry). A stream's
failure (client reset, upstream reset, a parse error, even a bug in the hub)
ends that stream only, with the typed error the per-task path raises.

Timeouts. The hub stamps each stream with the time of its last progress (bytes
read from the upstream or taken by the client). The waiting task sleeps until
``last progress + read_timeout``, once per period, with no deadline moved per
event; when it wakes and nothing moved for ``read_timeout``, the stream is cut:
:class:`~trioproxy.errors.ClientDisconnected` if the client held back a write
(as nginx's ``send_timeout``), :class:`~trioproxy.errors.UpstreamBrokenMidBody`
if the upstream was silent.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable

import attrs
import trio

from trioproxy.errors import ClientDisconnected, ProxyError, UpstreamBrokenMidBody
from trioproxy.http.protocol import NEED_DATA, PAUSED, Body, ClientProtocol, EndOfMessage

log = logging.getLogger("trioproxy.hub")

#: Events handled before the hub yields to the other tasks.
YIELD_EVERY = 64
#: The most events one ``epoll.poll`` returns.
MAX_EVENTS = 256
READ_SIZE = 65536

# Read at import only where they exist: the package imports on every platform
# (macOS, Windows); the hub itself runs only where ``supported()`` says so.
_IN: int = getattr(select, "EPOLLIN", 0x001)
_OUT: int = getattr(select, "EPOLLOUT", 0x004)


def supported() -> bool:
    """Whether this platform can run the stream hub (it needs ``select.epoll``)."""
    return hasattr(select, "epoll")


@attrs.frozen
class ClientSink:
    """The client side of an exchange, as the hub writes to it.

    Attributes:
        sock: the client's plain TCP socket (the hub only writes to it).
        frame: the bytes to write for body ``chunks`` and, if the flag is set, the
            end of the message (the server protocol's framing; no I/O).
        failed: tells the server protocol that a write was cut short.
        meter: reads the body ``chunks`` of each write before they are framed, with
            the end flag and the hub's time (that of the ``epoll`` poll that found
            them), and returns the chunks to frame: the same list unless it cuts
            something out (the LLM meter). None: nothing reads them.
    """

    sock: socket.socket
    frame: Callable[[list[bytes], bool], bytes]
    failed: Callable[[], None]
    meter: Callable[[list[bytes], bool, float], list[bytes]] | None = None


class HubStream:
    """One response body being relayed by the hub, and what became of it."""

    __slots__ = (
        "body_bytes",
        "done",
        "ended",
        "error",
        "finished",
        "last_progress",
        "origin",
        "pending",
        "protocol",
        "reading",
        "sink",
        "upstream",
    )

    def __init__(
        self,
        upstream: socket.socket,
        protocol: ClientProtocol,
        sink: ClientSink,
        *,
        origin: str,
        last_progress: float,
    ) -> None:
        self.upstream = upstream
        self.protocol = protocol
        self.sink = sink
        self.origin = origin
        #: Body bytes received from the upstream (for the access log).
        self.body_bytes = 0
        #: trio time of the last bytes read from the upstream or taken by the client.
        self.last_progress = last_progress
        #: Framed bytes the client did not take yet.
        self.pending = b""
        #: The upstream socket is registered for reading.
        self.reading = False
        #: The body's end was read (it is done once ``pending`` is written too).
        self.ended = False
        self.finished = False
        self.error: BaseException | None = None
        self.done = trio.Event()


class StreamHub:
    """Relays the rest of many response bodies in one task; see the module docstring.

    ``await nursery.start(hub.run)`` starts it; :meth:`relay` hands a stream over.
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._readers: dict[int, HubStream] = {}  # upstream fd → stream
        self._writers: dict[int, HubStream] = {}  # client fd → stream with pending bytes
        self._now = 0.0

    @property
    def running(self) -> bool:
        """The hub takes streams (its task runs)."""
        return self._epoll is not None

    @property
    def streams(self) -> int:
        """Streams being relayed now (one reading or writing registration each)."""
        return len(self._readers) + len(self._writers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay the streams handed over, until cancelled.

        Should the loop itself fail (a bug), it logs the error, ends every stream it
        held with that error and returns: the exchanges then relay on their own
        tasks (``running`` is false), and the server goes on.
        """
        epoll = select.epoll()
        self._epoll = epoll
        try:
            task_status.started()
            await self._loop(epoll)
        except Exception:
            log.exception("the stream hub failed; streams relay on their own tasks")
        finally:
            self._fail_all()
            self._epoll = None
            epoll.close()

    async def _loop(self, epoll: select.epoll) -> None:
        readers = self._readers
        writers = self._writers
        fd = epoll.fileno()
        handled = 0
        while True:
            await trio.lowlevel.wait_readable(fd)
            while events := epoll.poll(0, MAX_EVENTS):
                self._now = trio.current_time()
                for event_fd, _ in events:
                    # No task runs within this loop: a stream found here is live.
                    if (stream := readers.get(event_fd)) is not None:
                        self._guarded(self._on_readable, stream)
                    elif (stream := writers.get(event_fd)) is not None:
                        self._guarded(self._on_writable, stream)
                handled += len(events)
                if handled >= YIELD_EVERY:
                    handled = 0
                    await trio.lowlevel.checkpoint()
            handled = 0

    async def relay(self, stream: HubStream, read_timeout: float) -> None:
        """Relay ``stream``'s body to its end; return once the client took all of it.

        The caller keeps owning both sockets and closes them afterwards; the stream
        is unregistered before this returns or raises, cancellation included.

        Raises:
            UpstreamBrokenMidBody: the upstream closed, reset, sent bytes that are not
                HTTP, or was silent for ``read_timeout``.
            ClientDisconnected: the client reset or closed, or took no byte of a write
                for ``read_timeout``.
            RuntimeError: the hub is not running.
        """
        if self._epoll is None:
            raise RuntimeError("the stream hub is not running")
        self._resume_reading(stream)
        try:
            while not stream.finished:
                deadline = stream.last_progress + read_timeout
                if trio.current_time() >= deadline:
                    if stream.pending:
                        error: ProxyError = ClientDisconnected(
                            f"the client took no data for {read_timeout} s"
                        )
                    else:
                        error = UpstreamBrokenMidBody(
                            f"{stream.origin}: no data for {read_timeout} s"
                        )
                    self._finish(stream, error)
                    break
                with trio.move_on_at(deadline):
                    await stream.done.wait()
        finally:
            self.detach(stream)
        if (failure := stream.error) is not None:
            stream.error = None
            try:
                raise failure
            finally:
                del failure

    def detach(self, stream: HubStream) -> None:
        """Unregister ``stream`` at once (no I/O, no checkpoint; idempotent).

        Before its sockets close: the hub never sees it again. A write cut short is
        reported to the client side's protocol.
        """
        if not stream.finished:
            stream.finished = True
            if stream.pending or not stream.ended:
                stream.sink.failed()
        self._stop_reading(stream)
        self._stop_writing(stream)

    # --- registrations -------------------------------------------------------------

    def _resume_reading(self, stream: HubStream) -> None:
        epoll = self._epoll
        if epoll is None or stream.reading:
            return
        fd = stream.upstream.fileno()
        epoll.register(fd, _IN)
        self._readers[fd] = stream
        stream.reading = True

    def _stop_reading(self, stream: HubStream) -> None:
        if not stream.reading:
            return
        stream.reading = False
        fd = stream.upstream.fileno()
        self._readers.pop(fd, None)
        self._unregister(fd)

    def _stop_writing(self, stream: HubStream) -> None:
        fd = stream.sink.sock.fileno()
        if self._writers.get(fd) is stream:
            del self._writers[fd]
            self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        if self._epoll is None or fd < 0:
            return  # the epoll is closed, or so is the socket (which left the epoll)
        try:
            self._epoll.unregister(fd)
        except FileNotFoundError:  # pragma: no cover  (not registered: nothing to undo)
            pass

    # --- the relay -------------------------------------------------------------------

    def _guarded(self, handler: Callable[[HubStream], None], stream: HubStream) -> None:
        """Run ``handler``; whatever it raises ends that stream only."""
        try:
            handler(stream)
        except Exception as exc:
            if not isinstance(exc, ProxyError):
                log.exception("stream hub: relaying from %s failed", stream.origin)
            self._finish(stream, exc)

    def _on_readable(self, stream: HubStream) -> None:
        try:
            data = stream.upstream.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            raise UpstreamBrokenMidBody(f"reading from {stream.origin}: {exc!r}") from None
        stream.last_progress = self._now
        protocol = stream.protocol
        protocol.receive_data(data)
        chunks: list[bytes] = []
        end = False
        try:
            while True:
                event = protocol.next_event()
                if type(event) is Body:
                    stream.body_bytes += len(event.data)
                    chunks.append(event.data)
                elif type(event) is EndOfMessage:
                    end = True
                    break
                elif event is NEED_DATA or event is PAUSED:
                    break
                else:
                    raise UpstreamBrokenMidBody(f"{stream.origin}: unexpected {event!r} in body")
        except UpstreamBrokenMidBody:
            raise
        except ProxyError as exc:  # the upstream's bytes are not HTTP
            raise UpstreamBrokenMidBody(f"{stream.origin}: {exc.detail}") from None
        if not data and not end:
            raise UpstreamBrokenMidBody(f"{stream.origin} closed the connection mid-body")
        if end:
            stream.ended = True
            self._stop_reading(stream)
        if chunks or end:
            sink = stream.sink
            if sink.meter is not None:
                chunks = sink.meter(chunks, end, self._now)
            out = sink.frame(chunks, end)
            if out:
                self._write(stream, out)
                if stream.pending:
                    return
        if end:
            self._finish(stream, None)

    def _write(self, stream: HubStream, data: bytes) -> None:
        """Write ``data`` to the client; keep what it did not take, and hold the upstream."""
        sock = stream.sink.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise ClientDisconnected(repr(exc)) from None
        if sent:
            stream.last_progress = self._now
        if sent < len(data):
            assert self._epoll is not None
            stream.pending = data[sent:]
            self._stop_reading(stream)
            fd = sock.fileno()
            self._epoll.register(fd, _OUT)
            self._writers[fd] = stream

    def _on_writable(self, stream: HubStream) -> None:
        sock = stream.sink.sock
        try:
            sent = sock.send(stream.pending)
        except BlockingIOError:
            return
        except OSError as exc:
            raise ClientDisconnected(repr(exc)) from None
        stream.last_progress = self._now
        stream.pending = stream.pending[sent:]
        if stream.pending:
            return
        self._stop_writing(stream)
        if stream.ended:
            self._finish(stream, None)
        else:
            self._resume_reading(stream)

    def _finish(self, stream: HubStream, error: BaseException | None) -> None:
        if stream.finished:
            return
        if error is not None:
            # Raised again by the stream's task. Its traceback and context hold the
            # hub's frames, which hold the stream: a reference cycle per failed stream
            # (left to the cyclic GC, with its sockets) unless they are dropped here.
            error.__traceback__ = None
            error.__context__ = None
            stream.error = error
            stream.sink.failed()
        stream.finished = True
        self._stop_reading(stream)
        self._stop_writing(stream)
        stream.done.set()

    def _fail_all(self) -> None:
        """End every stream held, the hub stopping: their tasks raise
        ``UpstreamBrokenMidBody`` (the client connection is aborted)."""
        for stream in {*self._readers.values(), *self._writers.values()}:
            self._finish(stream, UpstreamBrokenMidBody(f"{stream.origin}: the stream hub stopped"))
        self._readers.clear()
        self._writers.clear()
