"""FastTLSStream against trio's own SSLStream as the client, over a socket pair."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trustme

from trioproxy.edge.tls import server_context
from trioproxy.edge.tls_stream import FastTLSStream

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@asynccontextmanager
async def pair(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FastTLSStream, trio.SSLStream[trio.SocketStream]]]:
    directory = tmp_path_factory.mktemp("tls")
    leaf = ca.issue_cert("server.test")
    leaf.cert_chain_pems[0].write_to_path(str(directory / "c.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "c.key"))
    context = server_context(str(directory / "c.pem"), str(directory / "c.key"))
    a, b = socket.socketpair()
    server = FastTLSStream.wrap(a, context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
        client_context,
        server_hostname="server.test",
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    try:
        yield server, client
    finally:
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(client)


async def test_both_ways_and_close_notify(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with pair(ca, tmp_path_factory) as (server, client):
        assert server.selected_alpn_protocol() is None
        big = bytes(range(256)) * 20_000  # 5 MB: more than the socket buffers hold

        async def read_all(stream: trio.abc.Stream, n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                chunk = await stream.receive_some()
                assert chunk
                out += chunk
            return bytes(out)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, big)
            assert await read_all(client, len(big)) == big
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, big)
            assert await read_all(server, len(big)) == big
        # A receive and a send at once, in two tasks.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"ping")
            nursery.start_soon(client.send_all, b"pong")
            assert await server.receive_some() == b"pong"
            assert await client.receive_some() == b"ping"
        # The server's close sends close_notify: the client reads a clean EOF.
        await server.aclose()
        assert await client.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")


async def test_eof_without_close_notify_reads_as_eof(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with pair(ca, tmp_path_factory) as (server, client):
        await trio.aclose_forcefully(client.transport_stream)
        assert await server.receive_some() == b""


async def test_a_cancelled_send_breaks_the_stream(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with pair(ca, tmp_path_factory) as (server, _client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            await trio.sleep(0.05)
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            nursery.cancel_scope.cancel()
        with trio.move_on_after(0.2):
            await server.send_all(b"x" * (16 << 20))  # nobody reads: it must wait
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"more")
