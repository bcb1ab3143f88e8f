"""One HTTP/1.1 connection to an upstream: a stream plus a client-role protocol.

This is the I/O boundary for the upstream side: ``OSError``, trio's stream
errors and ``ssl`` errors become :mod:`trioproxy.errors` here and nowhere else.
"""

from __future__ import annotations

import errno
import select
import ssl
from collections.abc import Awaitable, Callable

import trio

from trioproxy.errors import (
    LocalResourcesExhausted,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamTimeout,
)
from trioproxy.http.h11_impl import H11Client
from trioproxy.http.protocol import NEED_DATA, ClientProtocol, Event, _Sentinel
from trioproxy.sockets import CAPACITY_ERRNOS, FastSocketStream, receive_ready, socket_of
from trioproxy.upstream.origin import Origin

READ_SIZE = 65536
#: Reads grow (doubling) up to this while they come back full: a large body
#: moves in fewer, bigger reads (measured: +30 % MiB/s for 128 KiB over 64 KiB),
#: while small messages never pay for a big buffer. 256 KiB: ~5 % less CPU per
#: MiB again under hypercorn, whose cost is per body message, since a body read
#: is no longer copied by the parser (bench/README.rst, "ASGI downloads"); 512 KiB
#: and more: the allocator hands such buffers back to the kernel, and page faults
#: eat the gain.
MAX_READ_SIZE = 262144
#: A write to the client that takes longer than this makes the reads of the rest
#: of the exchange stay at ``READ_SIZE``: a client that does not keep up holds one
#: read of the proxy's memory while it catches up, and the smallest one will do.
SLOW_CLIENT_WRITE = 0.005

#: Opens the byte stream to an origin (TLS is layered on top by the caller).
Connector = Callable[[Origin], Awaitable[trio.abc.Stream]]


async def tcp_connector(origin: Origin) -> trio.abc.Stream:
    return FastSocketStream.adopt(await trio.open_tcp_stream(origin.host, origin.port))


class UpstreamConnection:
    """A connected upstream socket and the parser state that goes with it.

    Resource handling: the pool that opened it closes it. ``clean`` is set by
    the engine only once an exchange finished whole (request sent, response
    read to its end, nothing cancelled); anything else makes the pool close it.
    """

    __slots__ = (
        "_max_read",
        "_read_size",
        "clean",
        "exchanges",
        "idle_since",
        "origin",
        "protocol",
        "received",
        "stream",
    )

    def __init__(self, origin: Origin, stream: trio.abc.Stream, protocol: ClientProtocol) -> None:
        self.origin = origin
        self.stream = stream
        self.protocol = protocol
        self.clean = False
        self.exchanges = 0
        self.idle_since = 0.0
        self.received = 0  # bytes received in the current exchange
        self._read_size = READ_SIZE
        self._max_read = MAX_READ_SIZE

    @property
    def reused(self) -> bool:
        return self.exchanges > 0

    async def send_mapped(self, data: bytes) -> None:
        """Send ``data``; the stream's errors become ``UpstreamClosed``.

        Any failure, cancellation included, is recorded first (``send_failed``): the
        connection is not reusable after a write that may have been cut short.
        """
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except BaseException as exc:
            self.protocol.send_failed()
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                raise UpstreamClosed(f"writing to {self.origin}: {exc!r}") from None
            raise

    async def next_event(self, read_timeout: float | None) -> Event:
        """The next response event, reading with an idle timeout between reads.

        ``read_timeout=None`` leaves the timing to a cancel scope of the caller's
        (one scope instead of two nested ones on the hot path).

        Raises:
            UpstreamTimeout: nothing arrived for ``read_timeout`` seconds.
            UpstreamClosed: the connection closed or reset before a response head.
            UpstreamProtocolError: the bytes are not a valid HTTP/1.1 response.
        """
        protocol = self.protocol
        while True:
            event = protocol.next_event()
            if event is NEED_DATA:
                if read_timeout is None:
                    await self._receive_into(protocol)
                    continue
                with trio.move_on_after(read_timeout):
                    await self._receive_into(protocol)
                    continue
                raise UpstreamTimeout(f"{self.origin}: no data for {read_timeout} s")
            return event  # type: ignore[return-value]

    def next_event_nowait(self) -> Event | _Sentinel:
        """The next response event from what the socket holds now; ``NEED_DATA``
        if that is not enough. No waiting and no checkpoint.

        Raises:
            UpstreamClosed, UpstreamProtocolError: as :meth:`next_event`.
        """
        protocol = self.protocol
        event = protocol.next_event()
        if event is NEED_DATA:
            try:
                data = receive_ready(self.stream, self._read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamClosed(f"reading from {self.origin}: {exc!r}") from None
            if data is not None:
                self._took(data, protocol)
                event = protocol.next_event()
        return event

    async def _receive_into(self, protocol: ClientProtocol) -> None:
        try:
            data = await self.stream.receive_some(self._read_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamClosed(f"reading from {self.origin}: {exc!r}") from None
        self._took(data, protocol)

    def start_exchange(self) -> None:
        """A new exchange on this connection: counts and read sizes start afresh."""
        self.clean = False
        self.received = 0
        self._max_read = MAX_READ_SIZE

    def client_is_slow(self) -> None:
        """The client took longer than ``SLOW_CLIENT_WRITE`` for a write: the reads
        of the rest of this exchange stay at ``READ_SIZE``."""
        self._read_size = self._max_read = READ_SIZE

    def _took(self, data: bytes | bytearray, protocol: ClientProtocol) -> None:
        size = self._read_size
        if len(data) == size:
            if size < self._max_read:
                self._read_size = size * 2
        elif size > READ_SIZE:
            self._read_size = READ_SIZE
        if not data and not self.received:
            raise UpstreamClosed(f"{self.origin} closed the connection")
        self.received += len(data)
        protocol.receive_data(data)

    def looks_alive(self) -> bool:
        """Whether an idle connection can be reused: nothing to read means no EOF yet.

        An idle HTTP/1.1 connection has nothing to say; if its socket is
        readable the server closed it (or sent garbage), so it is not reused.
        """
        sock = socket_of(self.stream)
        if sock is None:  # pragma: no cover
            return True
        try:
            fd = sock.fileno()
        except OSError:  # pragma: no cover
            return False
        if fd < 0:
            return False
        if not hasattr(select, "poll"):  # Windows
            readable, _, errored = select.select([fd], [], [fd], 0)
            return not (readable or errored)
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


#: Errors of ``socket()``/``connect()`` that say this process, not the upstream, ran
#: out: descriptors, memory, buffers, or free local ports (``EADDRNOTAVAIL``).
_LOCAL_EXHAUSTION = CAPACITY_ERRNOS | {errno.EADDRNOTAVAIL}


def _local_exhaustion(exc: BaseException) -> OSError | None:
    """The ``OSError`` in ``exc`` that is a local exhaustion, if any.

    ``trio.open_tcp_stream`` raises ``OSError("all attempts ... failed")`` from a group
    of the attempts' own errors; a plain connector raises the ``OSError`` itself.
    """
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _LOCAL_EXHAUSTION:
            return error
        if isinstance(error, BaseExceptionGroup):
            todo.extend(error.exceptions)
        if error.__cause__ is not None:
            todo.append(error.__cause__)
    return None


async def open_connection(
    origin: Origin,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None,
    max_head_size: int,
    connector: Connector | None = None,
    protocol_factory: Callable[[int], ClientProtocol] = H11Client,
) -> UpstreamConnection:
    """Connect (and, for https, handshake) within ``connect_timeout``.

    Raises:
        UpstreamConnectTimeout: the connection or handshake took too long.
        UpstreamConnectError: refused, unreachable, name not resolved, TLS failed.
    """
    if connector is None:
        connector = tcp_connector
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(connect_timeout):
            tcp = await connector(origin)
            stream = tcp
            if origin.tls:
                assert ssl_context is not None
                tls = trio.SSLStream(
                    tcp, ssl_context, server_hostname=origin.host, https_compatible=True
                )
                stream = tls
                await tls.do_handshake()
    except trio.TooSlowError:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise UpstreamConnectTimeout(f"{origin}: connect took over {connect_timeout} s") from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if (local := _local_exhaustion(exc)) is not None:
            raise LocalResourcesExhausted(
                f"connecting to {origin}: {local.strerror} (this process's limit)"
            ) from None
        # trio wraps a failed TLS handshake; the ssl error says why.
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
        raise UpstreamConnectError(f"{origin}: {cause or exc!r}") from None
    except BaseException:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    return UpstreamConnection(origin, stream, protocol_factory(max_head_size))
