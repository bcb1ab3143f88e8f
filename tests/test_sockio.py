"""RawSocket on real connected sockets: trio's cancellation rule, backpressure, fairness.

The rule that matters to the relay: a call that raises ``Cancelled`` did nothing, and a
call that moved bytes returns normally. Broken, a request body's last bytes could be
sent and reported cancelled, and the exchange would end with the request taken for
unfinished (the connection closed under a client that did nothing wrong).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from trioproxy.sockio import YIELD_EVERY, RawSocket

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def _cancel(scope: trio.CancelScope) -> None:
    scope.cancel()


def _drain(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("attempt", range(40))  # trio shuffles the order of a batch
async def test_a_send_cancelled_as_it_yields_either_did_nothing_or_returns(
    pair: tuple[socket.socket, socket.socket], attempt: int
) -> None:
    a, b = pair
    raw = RawSocket(a)
    raw._unyielded = YIELD_EVERY - 1  # this call yields after its system call
    scope = trio.CancelScope()
    returned = False

    async def sender() -> None:
        nonlocal returned
        with scope:
            await raw.send_all(b"last bytes")
            returned = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(_cancel, scope)
    assert returned == (_drain(b) == b"last bytes")


@pytest.mark.parametrize("attempt", range(40))
async def test_a_receive_cancelled_as_it_yields_either_took_nothing_or_returns_it(
    pair: tuple[socket.socket, socket.socket], attempt: int
) -> None:
    a, b = pair
    b.send(b"event")
    raw = RawSocket(a)
    raw._unyielded = YIELD_EVERY - 1
    scope = trio.CancelScope()
    got: list[bytes] = []

    async def receiver() -> None:
        with scope:
            got.append(await raw.receive(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        nursery.start_soon(_cancel, scope)
    left = _drain(a)
    assert (got, left) in (([b"event"], b""), ([], b"event"))


async def test_send_all_waits_for_room_and_delivers_every_byte_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Far more than the socket buffers hold: the writer waits for the reader."""
    a, b = pair
    data = bytes(range(256)) * 40_000  # ~10 MB
    received = bytearray()

    async def reader() -> None:
        while len(received) < len(data):
            await trio.sleep(0.001)  # a slow reader
            received.extend(_drain(b))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await RawSocket(a).send_all(data)
    assert bytes(received) == data


async def test_a_busy_socket_does_not_starve_other_tasks(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    raw = RawSocket(b)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        for _ in range(10 * YIELD_EVERY):
            a.send(b"x")
            assert await raw.receive(10) == b"x"  # never has to wait
        nursery.cancel_scope.cancel()
    assert ticks >= 5  # about one per YIELD_EVERY calls; none if it never yielded


async def test_under_is_none_for_anything_but_a_plain_socket_stream() -> None:
    left, _right = trio.testing.memory_stream_pair()
    assert RawSocket.under(left) is None
    sock = trio.socket.socket()
    try:
        assert RawSocket.under(trio.SocketStream(sock)) is not None
    finally:
        sock.close()
