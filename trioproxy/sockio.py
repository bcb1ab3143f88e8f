"""Socket I/O below trio's stream layer, for the relay's hot path.

``trio.SocketStream.receive_some`` and ``send_all`` make every call a full
checkpoint (the task yields to the scheduler even when the data is there) and
go through a conflict detector and two async context managers around each
system call. On a relay that is most of the cost: measured with
``python -m bench.floor``, a bare relay on ``SocketStream`` costs ~110 µs of
CPU per SSE event and 1.36 ms per MiB downloaded; the same relay making the
system call first and waiting only when it would block costs ~70 µs and
0.70 ms (faster than nginx on 1 MiB bodies, 1.16 ms).

:class:`RawSocket` does the latter on the plain socket under a
``trio.SocketStream``, keeping trio's guarantees where they matter:

* **cancellation**: every call starts with ``checkpoint_if_cancelled`` (cheap
  unless cancelled), and a call that would block waits in trio
  (``wait_readable`` / ``wait_writable``), where it can be cancelled;
* **fairness**: a call that did not block yields anyway once every
  :data:`YIELD_EVERY` calls, so a fast peer cannot starve the other tasks.
  That yield comes after the system call and is shielded, as in trio's own
  socket methods: a call that raises ``Cancelled`` did nothing, and one that
  moved bytes returns them (a cancellation is delivered at the next call);
* **errors**: the socket's ``OSError`` (and trio's ``ClosedResourceError``
  when the socket is closed under a waiting task), as the caller already maps
  them for a ``SocketStream``.

Only one task may receive and one send at a time on a socket, as with
``SocketStream`` (trio raises ``BusyResourceError`` otherwise).
"""

from __future__ import annotations

import socket

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
    wait_writable,
)

#: Calls that did not block, at most, between two yields to the scheduler.
YIELD_EVERY = 16


class RawSocket:
    """The stdlib socket under a ``trio.SocketStream``, read and written directly."""

    __slots__ = ("_sock", "_unyielded")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._unyielded = 0

    @classmethod
    def under(cls, stream: object) -> RawSocket | None:
        """The raw socket of a plain ``trio.SocketStream``; None for TLS or any other
        stream (which keeps its own ``receive_some`` / ``send_all``)."""
        if type(stream) is not trio.SocketStream:
            return None
        sock = getattr(stream.socket, "_sock", None)  # trio's wrapped stdlib socket
        if not isinstance(sock, socket.socket):  # pragma: no cover - trio internals changed
            return None
        return cls(sock)

    async def receive(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` at EOF."""
        await checkpoint_if_cancelled()
        sock = self._sock
        while True:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                await wait_readable(sock)
                self._unyielded = 0
                continue
            self._unyielded += 1
            if self._unyielded >= YIELD_EVERY:
                self._unyielded = 0
                await cancel_shielded_checkpoint()
            return data

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``, waiting for room as needed (backpressure)."""
        await checkpoint_if_cancelled()
        sock = self._sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            self._unyielded += 1
            if self._unyielded >= YIELD_EVERY:
                self._unyielded = 0
                await cancel_shielded_checkpoint()
            return
        view = memoryview(data)[sent:]
        while view:
            await wait_writable(sock)
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass
        self._unyielded = 0
