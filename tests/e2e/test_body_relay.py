"""The response-body relay of the real ``python -m trioproxy``, under both parsers.

What the relay's fast path (reads and writes on the plain socket, a read timeout whose
deadline moves with slack) must never change: every byte arrives, in order, whatever
way the upstream's writes split the chunked framing; events written in a burst all
arrive, each as soon as it was written; a client that pauses gets the whole body; and a
client that takes nothing for the read timeout is cut instead of holding the upstream
connection for ever.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
from e2e.resources import (
    READ_SIZE,
    MiB,
    open_request,
    pattern_digest,
    pattern_upstream,
    receive_body_digest,
    receive_head,
    response_head,
)
from fixtures import run_proxy, serve_tcp_handler

pytestmark = pytest.mark.timeout(60)

PARSERS = pytest.mark.parametrize("parser", ["auto", "h11"])

GET = b"GET /body HTTP/1.1\r\nHost: test\r\n\r\n"
CHUNKED_HEAD = response_head(200, [(b"transfer-encoding", b"chunked")])


async def _read_request(stream: trio.SocketStream) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            return
        data += chunk


async def _read_response(stream: trio.SocketStream) -> tuple[int, bytes, bool]:
    """Status, body and whether it ended properly (h11 checks the client's framing)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/body", headers=[("Host", "test")]))
    status = 0
    body = bytearray()
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            return status, bytes(body), False
        if event is h11.NEED_DATA:
            try:
                client.receive_data(await stream.receive_some(READ_SIZE))
            except trio.BrokenResourceError:
                client.receive_data(b"")
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body), True


async def _fetch_through_proxy(
    nursery: trio.Nursery,
    parser: str,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    within: float,
) -> tuple[int, bytes, bool]:
    """GET through a proxy (``--http parser``) in front of the upstream ``handler``."""
    host, port = await serve_tcp_handler(handler, nursery)
    async with run_proxy("--http", parser, "--upstream", f"http://{host}:{port}") as proxy:
        stream = await open_request(proxy.host, proxy.port, GET)
        try:
            with trio.fail_after(within):
                return await _read_response(stream)
        finally:
            await trio.aclose_forcefully(stream)


async def _download_pattern(
    nursery: trio.Nursery, size: int, *proxy_args: str, within: float, pause: float = 0.0
) -> None:
    """GET ``size`` pattern bytes (Content-Length) through a proxy started with
    ``proxy_args``, taking nothing for ``pause`` seconds after the head; check that every
    byte arrived intact."""
    host, port = await serve_tcp_handler(pattern_upstream(size), nursery)
    async with run_proxy(*proxy_args, "--upstream", f"http://{host}:{port}") as proxy:
        stream = await open_request(proxy.host, proxy.port, GET)
        try:
            with trio.fail_after(within):
                head, first = await receive_head(stream)
                await trio.sleep(pause)
                received, digest = await receive_body_digest(stream, size, first)
        finally:
            await trio.aclose_forcefully(stream)
    assert head.status == 200
    assert received == size
    assert digest == pattern_digest(size)


def _awkward_pieces(payloads: list[bytes]) -> list[bytes]:
    """The chunked encoding of ``payloads`` cut at every awkward place: inside the size,
    between the size and its CRLF, inside each CRLF, inside the data, inside the last
    chunk."""
    pieces: list[bytes] = []
    for data in payloads:
        size = b"%x" % len(data)
        pieces += [size[:1], size[1:] + b"\r", b"\n" + data[:1], data[1:-1], data[-1:] + b"\r"]
        pieces.append(b"\n")
    pieces += [b"0", b"\r", b"\n\r", b"\n"]
    return [piece for piece in pieces if piece]


@PARSERS
async def test_chunked_body_split_at_awkward_boundaries_arrives_byte_exact(
    nursery: trio.Nursery, parser: str
) -> None:
    payloads = [b"a" * 17, bytes(range(256)) * 20, b"data: x\n\n", b"\r\n0\r\n\r\n", b"z" * 4097]

    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(CHUNKED_HEAD)
        for piece in _awkward_pieces(payloads):
            await stream.send_all(piece)
            await trio.sleep(0.003)  # a read of its own on the proxy's side
        await _read_request(stream)  # hold the connection until the proxy lets go

    status, body, complete = await _fetch_through_proxy(nursery, parser, handler, within=20)
    assert status == 200
    assert complete
    assert body == b"".join(payloads)


@PARSERS
async def test_large_chunked_body_of_random_chunk_sizes_is_byte_exact(
    nursery: trio.Nursery, parser: str
) -> None:
    rng = random.Random(3)
    payloads = [rng.randbytes(rng.choice((1, 7, 4096, 65535, 65536, 200_001))) for _ in range(300)]
    expected = hashlib.sha256(b"".join(payloads)).hexdigest()

    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(CHUNKED_HEAD)
        for data in payloads:
            await stream.send_all(b"%x\r\n%b\r\n" % (len(data), data))
        await stream.send_all(b"0\r\n\r\n")
        await _read_request(stream)

    status, body, complete = await _fetch_through_proxy(nursery, parser, handler, within=40)
    assert status == 200
    assert complete
    assert hashlib.sha256(body).hexdigest() == expected


@PARSERS
async def test_large_content_length_body_is_byte_exact(nursery: trio.Nursery, parser: str) -> None:
    size = 64 * MiB + 12345  # not a multiple of any read size
    await _download_pattern(nursery, size, "--http", parser, within=40)


@PARSERS
async def test_a_burst_of_small_events_arrives_whole_and_promptly(
    nursery: trio.Nursery, parser: str
) -> None:
    """Bursts of 200 one-chunk events written back to back, 5 bursts 0.1 s apart: every
    event arrives, in order, the last of a burst within 100 ms of its write."""
    bursts, per_burst = 5, 200

    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(CHUNKED_HEAD)
        seq = 0
        for _ in range(bursts):
            for _ in range(per_burst):
                seq += 1
                event = b"id: %d\ndata: %.6f\n\n" % (seq, time.time())
                await stream.send_all(b"%x\r\n%b\r\n" % (len(event), event))
            await trio.sleep(0.1)
        await stream.send_all(b"0\r\n\r\n")
        await _read_request(stream)

    host, port = await serve_tcp_handler(handler, nursery)
    async with run_proxy("--http", parser, "--upstream", f"http://{host}:{port}") as proxy:
        stream = await open_request(proxy.host, proxy.port, GET)
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/body", headers=[("Host", "test")]))
        ids: list[int] = []
        delays: list[float] = []
        pending = b""
        try:
            with trio.fail_after(20):
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(READ_SIZE))
                    elif isinstance(event, h11.Data):
                        arrived = time.time()
                        pending += event.data
                        *blocks, pending = pending.split(b"\n\n")
                        for block in blocks:
                            id_line, data_line = block.split(b"\n")
                            ids.append(int(id_line.removeprefix(b"id: ")))
                            delays.append(arrived - float(data_line.removeprefix(b"data: ")))
                    elif isinstance(event, h11.EndOfMessage):
                        break
        finally:
            await trio.aclose_forcefully(stream)
    assert ids == list(range(1, bursts * per_burst + 1))
    assert max(delays) < 0.1, f"slowest event took {max(delays) * 1000:.0f} ms"


async def test_a_client_pausing_within_the_read_timeout_gets_the_whole_body(
    nursery: trio.Nursery,
) -> None:
    """Backpressure is not silence: the client stops reading for 1 s (the upstream is
    held back meanwhile), with --read-timeout 3, and still gets every byte."""
    size = 32 * MiB
    await _download_pattern(nursery, size, "--read-timeout", "3", pause=1.0, within=30)


async def test_a_client_that_takes_nothing_for_the_read_timeout_is_cut(
    nursery: trio.Nursery,
) -> None:
    """A client that stops reading mid-body for longer than --read-timeout (0.5 s) is cut
    (as nginx's send_timeout does), and the proxy lets go of the upstream: a stalled
    client cannot hold an upstream connection for ever."""
    size = 256 * MiB  # far more than the socket buffers of both hops hold
    upstream_done = trio.Event()
    inner = pattern_upstream(size)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await inner(stream)
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            upstream_done.set()

    host, port = await serve_tcp_handler(handler, nursery)
    async with run_proxy("--upstream", f"http://{host}:{port}", "--read-timeout", "0.5") as proxy:
        stream = await open_request(proxy.host, proxy.port, GET)
        try:
            with trio.fail_after(20):
                await receive_head(stream)
                await trio.sleep(2.5)  # takes nothing
                with trio.fail_after(5):
                    await upstream_done.wait()  # the proxy let go of the upstream
                received = 0
                try:
                    while data := await stream.receive_some(READ_SIZE):
                        received += len(data)
                except trio.BrokenResourceError:
                    pass
        finally:
            await trio.aclose_forcefully(stream)
    assert received < size  # cut, not completed
