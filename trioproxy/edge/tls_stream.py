"""A server-side TLS stream on a non-blocking ``ssl.SSLSocket``: OpenSSL reads and
writes the socket itself, in C.

``trio.SSLStream`` drives an ``SSLObject`` over a ``MemoryBIO``: every read is a
``receive_some`` on the transport, a copy into the BIO and a decrypt; every write
an encrypt, a copy out of the BIO and a ``send_all``, each step a Python call with
its own checkpoints. Measured with ``bench`` (``tls-small-64``,
``tls-handshake-16``), that cost trioproxy ~50 µs of CPU per kept-alive request
and ~300 µs per handshake more than nginx pays for the same OpenSSL work. Here a
read is one ``SSLSocket.recv`` and a write one ``SSLSocket.send``: the system
calls happen inside OpenSSL, and trio is asked to wait only when OpenSSL says it
would block (``SSLWantReadError`` → ``wait_readable``, ``SSLWantWriteError`` →
``wait_writable``), as :class:`trioproxy.sockets.FastSocketStream` does for TCP.

Trio's stream contract, kept:

* every call is a cancellation point, and a schedule point (one that completes
  without waiting yields once at its end);
* one task receiving and one sending at a time (``BusyResourceError``); a receive
  and a send may run at once, in two tasks: renegotiation, the one case where a
  read would have to write or a write read, is refused
  (``OP_NO_RENEGOTIATION``), so each direction waits only on its own readiness;
* a ``send_all`` cancelled or failed midway leaves a TLS record half written: the
  stream is broken from then on (``BrokenResourceError``), as ``trio.SSLStream``;
* the peer's ``close_notify``, and an EOF without one, read as ``b""`` (an HTTP
  server frames its messages itself, RFC 9112 §9.8 leaves truncation to the
  framing); a TLS alert or a reset is ``BrokenResourceError``.

``aclose`` sends ``close_notify`` if the socket can take it at once, then closes:
it never waits for the peer's.

Not for the stream hub, which writes plain bytes to a socket's descriptor: its
users check for ``FastSocketStream`` exactly, and this is not one.
"""

from __future__ import annotations

import socket
import ssl

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

__all__ = ["FastTLSStream"]

DEFAULT_RECEIVE_SIZE = 65536


def _broken(exc: BaseException) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(f"TLS connection broken: {exc!r}")


class FastTLSStream(trio.abc.Stream):
    """A TLS connection on a non-blocking ``ssl.SSLSocket`` (see the module docstring).

    Build it with :meth:`wrap` and run :meth:`do_handshake` before using it.
    """

    __slots__ = ("_broken", "_receiving", "_sending", "socket")

    def __init__(self, sock: ssl.SSLSocket) -> None:
        #: The TLS socket (``getpeername``, ``version``...); do not read or write it.
        self.socket = sock
        self._sending = False
        self._receiving = False
        self._broken = False

    @classmethod
    def wrap(cls, sock: socket.socket, context: ssl.SSLContext) -> FastTLSStream:
        """Take over ``sock`` (non-blocking, connected; it must not be used afterwards)
        for the server side of a TLS connection."""
        sock.setblocking(False)
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return cls(tls)

    def _check(self) -> None:
        if self._broken:
            raise trio.BrokenResourceError("TLS stream broken by an earlier failure")
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("this stream was already closed")

    async def do_handshake(self) -> None:
        """Run the server side of the handshake.

        Raises:
            trio.BrokenResourceError: it failed (``__cause__``: the ``ssl.SSLError``
                or ``OSError``).
        """
        self._check()
        await checkpoint_if_cancelled()
        sock = self.socket
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await wait_readable(sock)
            except ssl.SSLWantWriteError:
                await wait_writable(sock)
            except (ssl.SSLError, OSError) as exc:
                self._broken = True
                raise _broken(exc) from exc

    def selected_alpn_protocol(self) -> str | None:
        return self.socket.selected_alpn_protocol()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        self._check()
        await checkpoint_if_cancelled()
        sock = self.socket
        waited = False
        self._receiving = True
        try:
            while True:
                try:
                    data = sock.recv(size)
                except ssl.SSLWantReadError:
                    waited = True
                    await wait_readable(sock)
                    continue
                except ssl.SSLWantWriteError:  # pragma: no cover (renegotiation is off)
                    waited = True
                    await wait_writable(sock)
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                except (ssl.SSLError, OSError) as exc:
                    if sock.fileno() == -1:
                        raise trio.ClosedResourceError("stream closed while receiving") from exc
                    self._broken = True
                    raise _broken(exc) from exc
                break
        finally:
            self._receiving = False
        if not waited:
            await cancel_shielded_checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check()
        await checkpoint_if_cancelled()
        sock = self.socket
        waited = False
        self._sending = True
        try:
            with memoryview(data) as view:
                sent, size = 0, len(view)
                while sent < size:
                    try:
                        # Without partial writes, OpenSSL takes it all or, after
                        # SSLWantWriteError, must be called again with the same bytes.
                        sent += sock.send(view[sent:])
                    except ssl.SSLWantWriteError:
                        waited = True
                        await wait_writable(sock)
                    except ssl.SSLWantReadError:  # pragma: no cover (renegotiation is off)
                        waited = True
                        await wait_readable(sock)
                    except (ssl.SSLError, OSError) as exc:
                        if sock.fileno() == -1:
                            raise trio.ClosedResourceError("stream closed while sending") from exc
                        raise _broken(exc) from exc
        except BaseException:
            # A record may be half written: nothing else can go after it.
            self._broken = True
            raise
        finally:
            self._sending = False
        if not waited:
            await cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check()
        self._sending = True
        try:
            await wait_writable(self.socket)
        finally:
            self._sending = False

    async def aclose(self) -> None:
        sock = self.socket
        if sock.fileno() != -1:
            if not self._broken:
                try:
                    # close_notify, if the socket takes it now (never waits).
                    sock.unwrap()
                except (ssl.SSLError, OSError, ValueError):
                    pass
            if sock.fileno() != -1:
                notify_closing(sock)
                sock.close()
        await trio.lowlevel.checkpoint()
