"""FastSocketStream on real TCP sockets over 127.0.0.1.

trio's own stream conformance checks run first (send/receive, half-close,
cancellation, closing while another task waits, conflicting calls); then what
the proxy relies on besides: large writes that must wait, and fairness when
the peer is always ready.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.lowlevel
import trio.testing

from trioproxy import sockets
from trioproxy.sockets import YIELD_EVERY, FastSocketStream


async def tcp_pair() -> tuple[FastSocketStream, FastSocketStream]:
    """Two connected streams over a real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    for sock in (client, accepted):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return FastSocketStream(client), FastSocketStream(accepted)


async def test_passes_trios_stream_conformance_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a yield on every call (trio's rule, which the proxy relaxes for speed),
    the stream passes trio's checks for half-closeable streams."""
    monkeypatch.setattr(sockets, "YIELD_EVERY", 1)
    await trio.testing.check_half_closeable_stream(tcp_pair, None)


async def test_large_writes_wait_for_a_slow_reader_and_arrive_byte_exact() -> None:
    left, right = await tcp_pair()
    payload = bytes(range(256)) * 32768  # 8 MiB, more than the socket buffers hold
    received = bytearray()

    async def read_slowly() -> None:
        while len(received) < len(payload):
            received.extend(await right.receive_some(16384))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        await left.send_all(payload)
    assert received == payload
    await left.aclose()
    await right.aclose()


async def test_a_busy_stream_does_not_starve_other_tasks() -> None:
    """A reader whose data is always there still lets other tasks run."""
    left, right = await tcp_pair()
    await left.send_all(b"y" * 100_000)
    await trio.testing.wait_all_tasks_blocked()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        reads = 0
        while reads < 50 * YIELD_EVERY:
            assert await right.receive_some(10)
            reads += 1
        nursery.cancel_scope.cancel()
    # Every YIELD_EVERY reads that did not wait, the reader yields once.
    assert ticks >= 40
    await left.aclose()
    await right.aclose()


async def test_a_reset_peer_is_a_broken_stream() -> None:
    left, right = await tcp_pair()
    linger_zero = struct.pack("ii", 1, 0)
    right.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
    await right.aclose()  # linger 0: RST
    with pytest.raises(trio.BrokenResourceError):
        await left.receive_some(100)
    await left.aclose()


async def test_adopt_takes_over_a_trio_socket_stream() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        client = FastSocketStream.adopt(await trio.open_tcp_stream("127.0.0.1", port))
        server = FastSocketStream.adopt(await listeners[0].accept())
        # trio set TCP_NODELAY; the adopted socket keeps it.
        assert client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await client.send_all(b"ping")
        assert await server.receive_some(10) == b"ping"
        await client.aclose()
        assert await server.receive_some(10) == b""
        await server.aclose()


async def test_ready_acceptor_takes_a_queued_burst_at_once_then_says_none() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        acceptor = sockets.ReadyAcceptor(listeners[0])
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        try:
            # The kernel has queued all five: they come out in one synchronous run.
            accepted = []
            while (stream := acceptor.accept_nowait()) is not None:
                accepted.append(stream)
            assert len(accepted) == 5
            for index, (client, server) in enumerate(zip(clients, accepted, strict=True)):
                # trio's socket options, as on a stream from trio.SocketListener.accept.
                assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                client.sendall(b"ping %d" % index)
                assert await server.receive_some(10) == b"ping %d" % index
                await server.send_all(b"pong")
                assert client.recv(10) == b"pong"
                await server.aclose()
        finally:
            for client in clients:
                client.close()
            acceptor.close()
        # The acceptor's descriptor was its own: the listener still accepts.
        with socket.create_connection(("127.0.0.1", port)):
            server = FastSocketStream.adopt(await listeners[0].accept())
            await server.aclose()
    # With both closed, nothing listens on the port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port)).close()


async def test_receive_nowait_takes_what_is_there_without_waiting() -> None:
    left, right = await tcp_pair()
    assert right.receive_nowait(100) is None  # nothing sent yet
    await left.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(right.socket)
    assert right.receive_nowait(100) == b"GET / HTTP/1.1\r\n\r\n"
    await left.send_eof()
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(right.socket)
    assert right.receive_nowait(100) == b""  # the peer's EOF
    await left.aclose()
    await right.aclose()


# trio's rule that matters to the relay: a call that raises Cancelled did nothing,
# and a call that moved bytes returns normally. Broken, a request body's last bytes
# could be sent and reported cancelled, and a keep-alive connection closed under a
# client that did nothing wrong. trio shuffles the order of a batch: repeat.


@pytest.mark.parametrize("attempt", range(40))
async def test_a_send_cancelled_as_it_yields_either_did_nothing_or_returns(
    monkeypatch: pytest.MonkeyPatch, attempt: int
) -> None:
    left, right = await tcp_pair()
    monkeypatch.setattr(sockets, "_unyielded", YIELD_EVERY - 1)  # this call yields after
    scope = trio.CancelScope()
    returned = False

    async def sender() -> None:
        nonlocal returned
        with scope:
            await left.send_all(b"last bytes")
            returned = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(_cancel, scope)
    await left.send_eof()
    received = b""
    while data := await right.receive_some(100):
        received += data
    assert returned == (received == b"last bytes")
    await left.aclose()
    await right.aclose()


@pytest.mark.parametrize("attempt", range(40))
async def test_a_receive_cancelled_as_it_yields_either_took_nothing_or_returns_it(
    monkeypatch: pytest.MonkeyPatch, attempt: int
) -> None:
    left, right = await tcp_pair()
    await left.send_all(b"event")
    await left.send_eof()
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(right.socket)
    monkeypatch.setattr(sockets, "_unyielded", YIELD_EVERY - 1)
    scope = trio.CancelScope()
    got: list[bytes] = []

    async def receiver() -> None:
        with scope:
            got.append(await right.receive_some(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        nursery.start_soon(_cancel, scope)
    left_over = b""
    while data := await right.receive_some(100):
        left_over += data
    assert (got, left_over) in (([b"event"], b""), ([], b"event"))
    await left.aclose()
    await right.aclose()


async def _cancel(scope: trio.CancelScope) -> None:
    scope.cancel()
