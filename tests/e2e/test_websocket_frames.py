"""The tunnel's frame relay through the real ``python -m trioproxy``, frame by frame.

A raw client writes the frames by hand (masked with keys of its own, cut where the test
says) to the proxy on 127.0.0.1; the upstream is a trio-websocket echo server, which
validates what reaches it as any server would, and records how its side closed.
"""

from __future__ import annotations

import os
import struct

import pytest
import trio
import trio_websocket
from e2e.test_websocket import NO_HEALTH, RawClient, Seen, ws_server
from fixtures import run_proxy
from frames import frame
from wsproto.events import BytesMessage, CloseConnection, Pong, TextMessage

pytestmark = pytest.mark.timeout(30)


async def echo_of(client: RawClient) -> bytes | str:
    """The next whole message the client gets."""
    parts: list[bytes | bytearray | str] = []
    while True:
        event = await client.event()
        assert isinstance(event, (BytesMessage, TextMessage)), event
        parts.append(event.data)
        if event.message_finished:
            if isinstance(event, TextMessage):
                return "".join(parts)  # type: ignore[arg-type]
            return b"".join(parts)  # type: ignore[arg-type]


async def close_normally(client: RawClient) -> None:
    """The client's close frame, the upstream's answer through the proxy, the end."""
    await client.stream.send_all(frame(0x8, struct.pack("!H", 1000)))
    event = await client.event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1000
    assert await client.stream.receive_some(65536) == b""
    await client.stream.aclose()


async def test_a_1_mib_frame_written_in_odd_pieces_comes_back_intact(
    nursery: trio.Nursery,
) -> None:
    payload = os.urandom(1024 * 1024)
    server, _ = await ws_server(nursery)
    async with run_proxy("--upstream", server, NO_HEALTH) as proxy:
        client = await RawClient.open(proxy)
        data = frame(0x2, payload)
        with trio.fail_after(20):
            for i in range(0, len(data), 4093):  # pieces of the frame land mid-key
                await client.stream.send_all(data[i : i + 4093])
            assert await echo_of(client) == payload
            # And a second message after it, in the same tunnel.
            await client.stream.send_all(frame(0x2, payload[:1000], key=os.urandom(4)))
            assert await echo_of(client) == payload[:1000]
            await close_normally(client)


async def test_fragments_with_a_ping_between_arrive_as_one_message(nursery: trio.Nursery) -> None:
    text = "fragmented héllo ✓ across frames"
    raw = text.encode()
    cut = raw.index("é".encode()) + 1  # inside the two bytes of "é"
    server, _ = await ws_server(nursery)
    async with run_proxy("--upstream", server, NO_HEALTH) as proxy:
        client = await RawClient.open(proxy)
        with trio.fail_after(10):
            await client.stream.send_all(frame(0x1, raw[:cut], fin=False))
            await client.stream.send_all(frame(0x9, b"between", key=os.urandom(4)))
            await client.stream.send_all(frame(0x0, raw[cut:-3], fin=False, key=os.urandom(4)))
            await client.stream.send_all(frame(0x0, raw[-3:], key=os.urandom(4)))
            pong = await client.event()
            assert pong == Pong(payload=b"between")  # the upstream's answer to the ping
            assert await echo_of(client) == text
            await close_normally(client)


async def test_a_fragmented_message_over_the_limit_is_1009_on_both_sides(
    nursery: trio.Nursery,
) -> None:
    server, seen = await ws_server(nursery)
    args = ("--upstream", server, NO_HEALTH, "--ws-max-message-size", "64k")
    async with run_proxy(*args) as proxy:
        client = await RawClient.open(proxy)
        with trio.fail_after(10):
            # 3 x 25,000 bytes: each frame is small, the message is not.
            await client.stream.send_all(frame(0x2, b"a" * 25_000, fin=False))
            await client.stream.send_all(frame(0x0, b"b" * 25_000, fin=False))
            await client.stream.send_all(frame(0x0, b"c" * 25_000))
            event = await client.event()
            await seen[0].done.wait()
    assert isinstance(event, CloseConnection)
    assert (event.code, event.reason) == (1009, "message too big")
    assert seen[0].closed is not None
    assert seen[0].closed[:2] == (1001, "client message too big")


@pytest.mark.parametrize(
    ("frames", "code", "told_upstream"),
    [
        (frame(0x1, b"hi", rsv=0x40), 1002, "client error"),
        (frame(0x3, b"hi"), 1002, "client error"),
        (frame(0x1, b"hi", key=None), 1002, "client error"),
        (frame(0x9, b"p" * 126), 1002, "client error"),
        (frame(0x0, b"no message started"), 1002, "client error"),
        (frame(0x1, b"\xe2\x82", fin=False) + frame(0x0, b"!"), 1007, "client sent invalid UTF-8"),
        (frame(0x8, struct.pack("!H", 1005)), 1002, "client error"),
    ],
    ids=[
        "reserved-bit",
        "unknown-opcode",
        "unmasked",
        "ping-over-125",
        "orphan-continuation",
        "invalid-utf8",
        "close-1005",
    ],
)
async def test_a_client_breaking_rfc_6455_gets_its_code_and_the_upstream_1001(
    nursery: trio.Nursery, frames: bytes, code: int, told_upstream: str
) -> None:
    server, seen = await ws_server(nursery)
    async with run_proxy("--upstream", server, NO_HEALTH) as proxy:
        client = await RawClient.open(proxy)
        with trio.fail_after(10):
            await client.stream.send_all(frame(0x1, b"fine so far"))
            assert await echo_of(client) == "fine so far"
            await client.stream.send_all(frames)
            event = await client.event()
            await seen[0].done.wait()
            # Then the proxy ends the connection: the client's frames cannot be read.
            assert await client.stream.receive_some(65536) == b""
    assert isinstance(event, CloseConnection)
    assert event.code == code
    assert seen[0].closed is not None
    assert seen[0].closed[:2] == (1001, told_upstream)


async def test_close_codes_cross_both_ways_frame_by_frame(nursery: trio.Nursery) -> None:
    async def close_with_4321(request: trio_websocket.WebSocketRequest, seen: Seen) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.aclose(code=4321, reason="upstream done")
        assert ws.closed is not None  # the client's answer, as the upstream got it
        seen.closed = (ws.closed.code, ws.closed.reason, trio.current_time())

    server, seen = await ws_server(nursery, close_with_4321)
    async with run_proxy("--upstream", server, NO_HEALTH) as proxy:
        client = await RawClient.open(proxy)
        with trio.fail_after(10):
            await client.stream.send_all(frame(0x1, b"close please"))
            event = await client.event()
            assert isinstance(event, CloseConnection)
            assert (event.code, event.reason) == (4321, "upstream done")
            # The client answers with a code of its own, masked with a key of its own.
            answer = struct.pack("!H", 4322) + b"ok"
            await client.stream.send_all(frame(0x8, answer, key=os.urandom(4)))
            assert await client.stream.receive_some(65536) == b""
            await seen[0].done.wait()
    assert seen[0].closed is not None
    assert seen[0].closed[:2] == (4322, "ok")
