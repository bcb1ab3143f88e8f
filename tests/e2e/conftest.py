"""Fixtures shared by the end-to-end tests: a raw HTTP/1.1 client that shows the bytes
and small purpose-built upstreams.

The real proxy and the reference upstream come from ``tests/fixtures.py`` and
``tests/conftest.py``; what is here is only what those do not offer. Test modules
cannot import a conftest (``--import-mode=importlib``), so everything is a fixture.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import h11
import pytest
import trio
import upstream_app
from fixtures import (
    ProxyProcess,
    read_head,
    run_asgi_proxy,
    run_proxy,
    serve_asgi,
    serve_tcp_handler,
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- the parser behind the proxy ---------------------------------------------------------


@pytest.fixture(params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest) -> str:
    """Each of the proxy's HTTP/1.1 parsers in turn (``--http``), for the tests where
    parsing decides the outcome."""
    name: str = request.param
    if name == "httptools":
        pytest.importorskip("httptools")
    return name


# --- the front end in front of the engine -------------------------------------------------

#: ``front_end(*cli_args)``: an async context manager yielding the running proxy.
FrontEnd = Callable[..., Any]


@pytest.fixture(params=["standalone", "asgi"])
def front_end(request: pytest.FixtureRequest) -> FrontEnd:
    """Each front end in turn, started with the same command-line arguments:
    ``python -m trioproxy ARGS`` (``fixtures.run_proxy``), and the ASGI app in a
    real ``hypercorn --worker-class trio trioproxy.asgi:app`` process configured by
    the same arguments (``fixtures.run_asgi_proxy``). The cases that take it are
    the ones both front ends must pass alike."""
    return run_proxy if request.param == "standalone" else run_asgi_proxy


# --- a raw HTTP/1.1 client ---------------------------------------------------------------


@attrs.frozen
class RawResponse:
    """One response as it came off the wire (header names lowercased by h11)."""

    status: int
    reason: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [value.decode("latin-1") for field, value in self.headers if field == key]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def echo_headers(self, name: str) -> list[str]:
        """For an ``/echo`` answer: the values of ``name`` the upstream received."""
        return [value for field, value in self.json()["headers"] if field == name]


class RawConnection:
    """A client socket that sends bytes as given and parses responses with h11.

    Bytes read past the end of one response are kept for the next, so pipelined
    answers can be read one after the other.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def _fill(self) -> bool:
        """Read more into the buffer; False at EOF (a reset counts as EOF)."""
        if self.eof:
            return False
        try:
            chunk = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    async def read_head_bytes(self, *, within: float = 5) -> bytes:
        """The raw bytes of the next head, up to and including the blank line."""
        with trio.fail_after(within):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._fill():
                    raise EOFError(f"EOF before a whole head; got {bytes(self.buffer)!r}")
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        return head

    async def read_response(self, method: bytes = b"GET", *, within: float = 5) -> RawResponse:
        """Parse the next whole response to a ``method`` request (1xx are skipped).

        Raises:
          h11.RemoteProtocolError: the connection ended before the response did.
          trio.TooSlowError: no whole response within ``within`` seconds.
        """
        parser = h11.Connection(h11.CLIENT)
        # Put the parser in the state of a client that sent ``method``.
        parser.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        parser.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = bytearray()
        with trio.fail_after(within):
            while True:
                if self.buffer:  # b"" would mean EOF to h11
                    parser.receive_data(bytes(self.buffer))
                    self.buffer.clear()
                while True:
                    event = parser.next_event()
                    if isinstance(event, h11.Response):
                        head = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        assert head is not None
                        self.buffer += parser.trailing_data[0]
                        return RawResponse(
                            status=head.status_code,
                            reason=bytes(head.reason),
                            http_version=bytes(head.http_version),
                            headers=[(bytes(k), bytes(v)) for k, v in head.headers],
                            body=bytes(body),
                        )
                    elif event is h11.NEED_DATA:
                        break
                    elif not isinstance(event, h11.InformationalResponse):
                        raise AssertionError(f"unexpected {event!r}")
                if not await self._fill():
                    parser.receive_data(b"")

    async def read_to_eof(self, *, within: float = 5) -> bytes:
        """Everything until the peer closes; fails after ``within`` seconds."""
        with trio.fail_after(within):
            while await self._fill():
                pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


RawConnect = Callable[[ProxyProcess], Awaitable[RawConnection]]


@pytest.fixture
async def raw_connect() -> AsyncIterator[RawConnect]:
    """``await raw_connect(proxy)``: a :class:`RawConnection` to the proxy, closed after the
    test."""
    opened: list[RawConnection] = []

    async def connect(proxy: ProxyProcess) -> RawConnection:
        connection = RawConnection(await trio.open_tcp_stream(proxy.host, proxy.port))
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        await trio.aclose_forcefully(connection.stream)


# --- small upstreams ---------------------------------------------------------------


def _client_port_app(app: ASGIApp) -> ASGIApp:
    """``app`` plus an ``x-upstream-client-port`` response header: the port the request
    came from, so a test can tell the proxy's upstream connections apart."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        port = str(scope["client"][1]).encode()

        async def send_with_port(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message["headers"], (b"x-upstream-client-port", port)],
                }
            await send(message)

        await app(scope, receive, send_with_port)

    return wrapped


@pytest.fixture
async def port_reporting_upstream(nursery: trio.Nursery) -> str:
    """Like ``upstream``, but every response names the upstream connection's client port
    in ``x-upstream-client-port``."""
    return await serve_asgi(_client_port_app(upstream_app.app), nursery)


def _named_app(name: str) -> ASGIApp:
    """An upstream that answers every request with its name."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = name.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.fixture
def named_upstream(nursery: trio.Nursery) -> Callable[[str], Awaitable[str]]:
    """``await named_upstream("A")``: the URL of an upstream whose every answer is ``A``."""

    async def start(name: str) -> str:
        return await serve_asgi(_named_app(name), nursery)

    return start


@attrs.define
class CannedUpstream:
    """A raw upstream: records each request head, answers it with fixed bytes, closes."""

    answer: bytes
    url: str = ""
    heads: list[bytes] = attrs.Factory(list)
    connections: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        head = await read_head(stream)
        if head:
            self.heads.append(head)
            await stream.send_all(self.answer)


@pytest.fixture
def canned_upstream(nursery: trio.Nursery) -> Callable[[bytes], Awaitable[CannedUpstream]]:
    """``await canned_upstream(answer)``: a started :class:`CannedUpstream`."""

    async def start(answer: bytes) -> CannedUpstream:
        canned = CannedUpstream(answer)
        host, port = await serve_tcp_handler(canned.handle, nursery)
        canned.url = f"http://{host}:{port}"
        return canned

    return start
