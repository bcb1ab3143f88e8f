"""How an upstream connection sizes its reads (trioproxy/upstream/connection.py).

The connection reads from one end of a ``memory_stream_pair`` wrapped in a recorder of
the ``max_bytes`` of each ``receive_some``; the test writes the response into the other
end. Both client implementations of the parser seam are run.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from memory import ORIGIN, fake_time_ceiling  # noqa: F401  (autouse: fails a hung test fast)
from trio.testing import MockClock

from trioproxy.http.parsers import client_factory
from trioproxy.http.protocol import Body, EndOfMessage, RequestHead, ResponseHead
from trioproxy.upstream.connection import (
    MAX_BODY_READ,
    MAX_READ_SIZE,
    READ_SIZE,
    UpstreamConnection,
)

MiB = 1024 * 1024


class RecordingStream(trio.abc.Stream):
    """A stream that notes the ``max_bytes`` of every read."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.asked: list[int | None] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.asked.append(max_bytes)
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture(params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def connect(parser: str) -> tuple[UpstreamConnection, RecordingStream, trio.abc.Stream]:
    proxy_end, upstream_end = trio.testing.memory_stream_pair()
    recorder = RecordingStream(proxy_end)
    conn = UpstreamConnection(ORIGIN, recorder, client_factory(parser)(65536))
    return conn, recorder, upstream_end


async def get(conn: UpstreamConnection) -> ResponseHead:
    protocol = conn.protocol
    head = RequestHead(b"GET", b"/", [(b"host", b"up.test")])
    await conn.send_mapped(protocol.send_head(head) + protocol.send_end())
    event = await conn.next_event(30)
    assert isinstance(event, ResponseHead)
    return event


async def read_body(conn: UpstreamConnection, left: int) -> list[int]:
    """The body as the engine reads one of known length; returns the chunk sizes."""
    sizes: list[int] = []
    while True:
        event = await conn.next_event(30, left)
        if isinstance(event, EndOfMessage):
            return sizes
        assert isinstance(event, Body)
        sizes.append(len(event.data))
        left -= len(event.data)


async def test_a_body_of_known_length_is_read_in_reads_sized_by_what_is_left(
    parser: str, autojump_clock: MockClock
) -> None:
    conn, recorder, upstream = connect(parser)
    length = 2 * MiB + 12345
    await upstream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % length)
    await upstream.send_all(b"x" * length)
    await get(conn)
    # The head's read is the ramp's first.
    assert recorder.asked == [READ_SIZE]
    recorder.asked.clear()
    sizes = await read_body(conn, length)
    # The first chunk came with the head; then each read asks for what is left of
    # the body, up to MAX_BODY_READ, and gets all of it (all of it is there).
    expected: list[int] = []
    remaining = length - sizes[0]
    while remaining:
        expected.append(min(remaining, MAX_BODY_READ))
        remaining -= expected[-1]
    assert recorder.asked == expected
    assert sizes[1:] == expected


async def test_a_read_sized_for_a_large_body_takes_what_is_there(
    parser: str, autojump_clock: MockClock
) -> None:
    conn, recorder, upstream = connect(parser)
    await upstream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % MiB)
    await get(conn)
    await upstream.send_all(b"0123456789")
    # Asked for up to MAX_BODY_READ, the read returns the 10 bytes there, at once.
    with trio.fail_after(0.001):
        event = await conn.next_event(None, MiB)
    assert isinstance(event, Body)
    assert event.data == b"0123456789"
    assert recorder.asked[-1] == MAX_BODY_READ


async def test_a_body_of_unknown_length_is_read_as_the_ramp_sizes_it(
    parser: str, autojump_clock: MockClock
) -> None:
    conn, recorder, upstream = connect(parser)
    await upstream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    await get(conn)
    recorder.asked.clear()
    chunk = b"y" * (MiB // 2)
    await upstream.send_all(b"%x\r\n%b\r\n0\r\n\r\n" % (len(chunk), chunk))
    await read_body(conn, 0)
    # Full reads double, up to MAX_READ_SIZE, and stay there while they come back full.
    assert recorder.asked[:3] == [READ_SIZE, 2 * READ_SIZE, MAX_READ_SIZE]
    assert set(recorder.asked[2:]) == {MAX_READ_SIZE}


async def test_reads_sized_by_a_body_leave_the_next_head_read_small(
    parser: str, autojump_clock: MockClock
) -> None:
    conn, recorder, upstream = connect(parser)
    length = 3 * MiB
    await upstream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % length)
    await upstream.send_all(b"z" * length)
    await get(conn)
    await read_body(conn, length)
    conn.protocol.start_next_cycle()
    recorder.asked.clear()
    await upstream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
    await get(conn)
    assert recorder.asked == [READ_SIZE]
