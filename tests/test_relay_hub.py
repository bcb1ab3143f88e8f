"""StreamHub in-process, over real loopback TCP sockets and both parsers: what the
end-to-end tests cannot provoke. A failure while relaying one stream (even a bug, here a
framing function that raises) ends that stream alone; a cancelled waiter unregisters its
stream before its sockets close; a hub that stops ends the streams it held instead of
leaving their tasks waiting. A sink's meter reads each write's chunks, with the hub's
time, before they are framed.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from trioproxy.errors import UpstreamBrokenMidBody
from trioproxy.http.parsers import client_factory, server_factory
from trioproxy.http.protocol import RequestHead, ResponseHead
from trioproxy.relay_hub import ClientSink, HubStream, StreamHub

pytestmark = [pytest.mark.timeout(20), pytest.mark.parametrize("parser", ["h11", "httptools"])]

GET = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    for sock in (near, far):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    near.setblocking(False)
    far.setblocking(False)
    return near, far


@attrs.define
class Exchange:
    """One proxied stream: the proxy's two sockets and the far ends (upstream, client)."""

    stream: HubStream
    upstream: socket.socket  # the upstream's end
    client: socket.socket  # the client's end
    proxy_sockets: tuple[socket.socket, socket.socket]

    def close(self) -> None:
        for sock in (*self.proxy_sockets, self.upstream, self.client):
            sock.close()


def exchange(
    parser: str,
    *,
    broken_framing: bool = False,
    meter: Callable[[list[bytes], bool, float], list[bytes]] | None = None,
) -> Exchange:
    """A stream whose response head was read and answered: ready for the hub. With
    ``broken_framing``, its framing function raises (as a bug would); ``meter`` goes
    on its sink."""
    up_near, up_far = tcp_pair()
    client_near, client_far = tcp_pair()
    upstream_protocol = client_factory(parser)(65536)
    upstream_protocol.send_head(RequestHead(b"GET", b"/", [(b"host", b"t")]))
    upstream_protocol.send_end()
    upstream_protocol.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert isinstance(upstream_protocol.next_event(), ResponseHead)
    server_protocol = server_factory(parser)(65536)
    server_protocol.receive_data(GET)
    server_protocol.next_event()
    server_protocol.next_event()
    server_protocol.send_head(ResponseHead(200, [(b"transfer-encoding", b"chunked")]))

    def frame(chunks: list[bytes], end: bool) -> bytes:
        if broken_framing:
            raise RuntimeError("a bug in the framing")
        parts = [server_protocol.send_body(chunk) for chunk in chunks]
        if end:
            parts.append(server_protocol.send_end())
        return b"".join(parts)

    sink = ClientSink(client_near, frame, server_protocol.send_failed, meter)
    stream = HubStream(
        up_near, upstream_protocol, sink, origin="test", last_progress=trio.current_time()
    )
    return Exchange(stream, up_far, client_far, (up_near, client_near))


@asynccontextmanager
async def running_hub() -> AsyncIterator[tuple[StreamHub, trio.Nursery]]:
    hub = StreamHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield hub, nursery
        nursery.cancel_scope.cancel()


async def receive_until(sock: socket.socket, needle: bytes) -> bytes:
    received = b""
    while needle not in received:
        await trio.lowlevel.wait_readable(sock)
        data = sock.recv(65536)
        assert data, received
        received += data
    return received


async def test_a_failing_stream_ends_alone(parser: str) -> None:
    good, bad = exchange(parser), exchange(parser, broken_framing=True)
    outcome: dict[str, BaseException | None] = {}
    good_done = trio.Event()

    async def relay(name: str, ex: Exchange) -> None:
        try:
            await hub.relay(ex.stream, 10)
            outcome[name] = None
        except Exception as exc:
            outcome[name] = exc
        if name == "good":
            good_done.set()

    try:
        async with running_hub() as (hub, nursery):
            nursery.start_soon(relay, "good", good)
            nursery.start_soon(relay, "bad", bad)
            await trio.sleep(0.05)
            bad.upstream.send(b"5\r\nhello\r\n")
            good.upstream.send(b"5\r\nhello\r\n")
            assert (await receive_until(good.client, b"hello")) == b"5\r\nhello\r\n"
            await trio.sleep(0.05)
            assert isinstance(outcome.get("bad"), RuntimeError)
            assert hub.running
            good.upstream.send(b"3\r\nbye\r\n0\r\n\r\n")
            assert (await receive_until(good.client, b"0\r\n\r\n")).endswith(b"bye\r\n0\r\n\r\n")
            with trio.fail_after(2):
                await good_done.wait()
            assert outcome["good"] is None
            assert good.stream.body_bytes == 8
            assert hub.streams == 0
    finally:
        good.close()
        bad.close()


async def test_a_cancelled_waiter_unregisters_its_stream(parser: str) -> None:
    first = exchange(parser)
    async with running_hub() as (hub, _):
        with trio.move_on_after(0.1):
            await hub.relay(first.stream, 10)
        assert hub.streams == 0
        first.close()
        # The descriptors are free again and reused: the hub relays the next stream.
        second = exchange(parser)
        try:
            second.upstream.send(b"2\r\nok\r\n0\r\n\r\n")
            with trio.fail_after(2):
                await hub.relay(second.stream, 10)
            assert (await receive_until(second.client, b"0\r\n\r\n")) == b"2\r\nok\r\n0\r\n\r\n"
        finally:
            second.close()


async def test_a_stopping_hub_ends_the_streams_it_held(parser: str) -> None:
    ex = exchange(parser)
    try:
        hub = StreamHub()
        hub_scope = trio.CancelScope()

        async def run_hub(task_status: trio.TaskStatus[None]) -> None:
            with hub_scope:
                await hub.run(task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(run_hub)
            nursery.start_soon(_cancel_later, hub_scope)
            with pytest.raises(UpstreamBrokenMidBody, match="hub stopped"):
                await hub.relay(ex.stream, 10)
        assert not hub.running
    finally:
        ex.close()


async def test_the_meter_reads_each_write_with_the_hub_time_before_framing(parser: str) -> None:
    seen: list[tuple[list[bytes], bool, float]] = []

    def meter(chunks: list[bytes], end: bool, now: float) -> list[bytes]:
        seen.append((list(chunks), end, now))
        return [chunk for chunk in chunks if chunk != b"cut"]  # a meter may cut some out

    ex = exchange(parser, meter=meter)
    try:
        async with running_hub() as (hub, nursery):
            nursery.start_soon(hub.relay, ex.stream, 10)
            await trio.sleep(0.05)
            before = trio.current_time()
            ex.upstream.send(b"5\r\nhello\r\n")
            assert (await receive_until(ex.client, b"hello")) == b"5\r\nhello\r\n"
            ex.upstream.send(b"3\r\ncut\r\n")
            await trio.sleep(0.05)
            ex.upstream.send(b"3\r\nbye\r\n0\r\n\r\n")
            received = await receive_until(ex.client, b"0\r\n\r\n")
            assert received == b"3\r\nbye\r\n0\r\n\r\n"  # "cut" never reached it
            after = trio.current_time()
        assert [(chunks, end) for chunks, end, _ in seen] == [
            ([b"hello"], False),
            ([b"cut"], False),
            ([b"bye"], True),
        ]
        times = [now for _, _, now in seen]
        assert before <= times[0] <= times[1] <= times[2] <= after
    finally:
        ex.close()


async def _cancel_later(scope: trio.CancelScope) -> None:
    await trio.sleep(0.05)
    scope.cancel()
