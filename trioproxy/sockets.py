"""A TCP stream that visits the scheduler only when it must wait.

``trio.SocketStream`` makes every successful ``send``/``recv`` a full
checkpoint: after the syscall it yields to the scheduler, so a proxied
request, with its four socket operations, takes six trips through trio's run
loop where two (waiting for the client, waiting for the upstream) are needed.
Profiled under load those trips, with the stream's context managers, cost more
CPU than the syscalls themselves.

:class:`FastSocketStream` keeps trio's contract where it matters:

* every call is a cancellation point (``checkpoint_if_cancelled`` first);
* a call that cannot complete waits with ``wait_readable``/``wait_writable``,
  which are schedule points and cancellation points;
* a call that completes at once still yields every :data:`YIELD_EVERY` such
  calls in a row, so a connection whose peers are always ready cannot starve
  the others;
* errors are trio's stream errors (``BrokenResourceError``, ``ClosedResourceError``,
  ``BusyResourceError`` for two tasks sending or receiving at once).

It owns a stdlib socket taken over from a ``trio.SocketStream`` (see
:meth:`FastSocketStream.adopt`), which keeps the options trio set on it
(``TCP_NODELAY``).
"""

from __future__ import annotations

import errno
import os
import socket

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

from trioproxy.edge.tls_stream import FastTLSStream

#: Calls that complete without waiting before one yields anyway.
YIELD_EVERY = 16
DEFAULT_RECEIVE_SIZE = 65536

_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})

# Calls completed in a row, across all streams, since the last one that waited
# or yielded. Tasks that wait reset it; a task that never waits meets the limit.
# The count is kept inline in each call (not in a helper coroutine: awaiting one
# per call cost more than the count itself).
_unyielded = 0


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream. See the module docstring."""

    __slots__ = ("_receiving", "_sending", "_shut_wr", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        #: The stdlib socket (``getpeername``, ``fileno``); do not read or write it.
        self.socket = sock
        self._sending = False
        self._receiving = False
        self._shut_wr = False

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> FastSocketStream:
        """Take over the socket of ``stream``, which must not be used afterwards."""
        return cls(socket.socket(fileno=stream.socket.detach()))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        global _unyielded
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if max_bytes is None:
            size = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        else:
            size = max_bytes
        await checkpoint_if_cancelled()
        sock = self.socket
        try:
            data = sock.recv(size)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from exc
        else:
            _unyielded += 1
            if _unyielded >= YIELD_EVERY:
                _unyielded = 0
                await cancel_shielded_checkpoint()
            return data
        self._receiving = True
        try:
            while True:
                await wait_readable(sock)
                _unyielded = 0
                try:
                    return sock.recv(size)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _stream_error(exc) from exc
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What the socket holds now, without waiting; ``None`` if nothing yet.

        Not a checkpoint: the caller's next await is. ``b""`` is the peer's EOF.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        try:
            return self.socket.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        global _unyielded
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._shut_wr:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        await checkpoint_if_cancelled()
        sock = self.socket
        size = len(data)
        try:
            sent = sock.send(data) if size else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _stream_error(exc) from exc
        if sent == size:
            if size == 0 and sock.fileno() == -1:
                raise trio.ClosedResourceError("socket was already closed")
            _unyielded += 1
            if _unyielded >= YIELD_EVERY:
                _unyielded = 0
                await cancel_shielded_checkpoint()
            return
        self._sending = True
        try:
            with memoryview(data) as view:
                while sent < size:
                    await wait_writable(sock)
                    _unyielded = 0
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise _stream_error(exc) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError
        self._sending = True
        try:
            await wait_writable(self.socket)
        except OSError as exc:
            raise _stream_error(exc) from exc
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await checkpoint()
        if self._shut_wr:
            return
        self._shut_wr = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def aclose(self) -> None:
        sock = self.socket
        if sock.fileno() != -1:
            # Wakes any task waiting on it with ClosedResourceError.
            notify_closing(sock)
            sock.close()
        await checkpoint()


#: Connections accepted without a trip through the run loop, after one that waited.
ACCEPT_BATCH = 128

# Errors of accept(2) that concern only the connection being accepted (as trio's).
_ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: What ``accept``/``socket``/``connect`` fail with when this process or the system is
#: out of descriptors, memory or buffers: the proxy's own limit, not a peer's fault.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class ReadyAcceptor:
    """Takes the connections already queued on a listening socket, without waiting.

    ``trio.SocketListener.accept`` yields to the scheduler after every connection,
    so a burst of N new clients is taken one per run-loop pass: under load the
    last one waits N passes (hundreds of ms at 64 connections) before its first
    request is read. After an ``accept`` that waited, :meth:`accept_nowait` takes
    the rest of the burst in the same pass.

    It owns a duplicate of the listening descriptor (the same socket in the
    kernel), closed by :meth:`close`; close it before the listener, so that
    closing the listener stops the kernel queueing connections.
    """

    __slots__ = ("_sock",)

    def __init__(self, listener: trio.SocketListener) -> None:
        self._sock = socket.socket(fileno=os.dup(listener.socket.fileno()))

    def accept_nowait(self) -> FastSocketStream | None:
        """A queued connection as a stream with trio's options, or ``None`` if none.

        Raises ``OSError`` as ``accept`` does (``EMFILE`` and the like).
        """
        while True:
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno in _ACCEPT_SKIP_ERRNOS:
                    continue
                raise
            try:
                # What trio.SocketStream sets on a TCP socket.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
                if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 2**14)
            except OSError:
                # Reset before we got to it: the handler sees the broken socket.
                pass
            return FastSocketStream(sock)

    def close(self) -> None:
        self._sock.close()


def receive_ready(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """What ``stream`` holds now, without waiting: ``FastSocketStream.receive_nowait``
    for a ``FastSocketStream``, ``None`` for any other stream (TLS, memory), whose
    caller then waits as usual."""
    if type(stream) is not FastSocketStream:
        return None
    return stream.receive_nowait(max_bytes)


def socket_of(stream: trio.abc.Stream) -> socket.socket | trio.socket.SocketType | None:
    """The socket under ``stream`` (through TLS), or None for other streams."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, (FastSocketStream, trio.SocketStream, FastTLSStream)):
        return stream.socket
    return None
