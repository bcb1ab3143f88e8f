"""In-memory wiring for unit tests: a fake upstream, the proxy's handler and an h11 client.

Nothing here opens a socket. The pieces meet over ``trio.testing.memory_stream_pair``:

    MemoryClient ──memory stream──► ClientConnection ─► Engine ─► UpstreamPool
                                                                      │ connector
    FakeUpstream ◄──memory stream (one per "accepted" connection) ◄───┘

- :class:`FakeUpstream` is the pool's ``connector``: every call "accepts" one connection
  and runs ``handler(peer)`` on it in the test's nursery. The default handler speaks
  HTTP/1.1 with ``h11`` and answers each request with ``app(request)``; a test that
  injects faults passes its own handler and writes raw bytes through the
  :class:`UpstreamPeer`.
- :func:`start_proxy` builds pool, engine and :class:`ServerState` the way
  ``trioproxy.server.listener.ProxyServer`` does, and :meth:`Proxy.connect` starts one
  ``ClientConnection.serve()`` and returns the :class:`MemoryClient` that drives it.

Everything runs in the nursery the test passes in (pytest-trio's ``nursery`` fixture),
so nothing outlives the test; with ``autojump_clock`` every timeout is instant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import cast

import attrs
import h11
import pytest
import trio
import trio.testing

from trioproxy.balance.balancer import Balancer
from trioproxy.balance.group import LiveGroup
from trioproxy.balance.health import HealthService
from trioproxy.balance.retry import RetryBudget, RetryPolicy
from trioproxy.balance.target import TargetSpec
from trioproxy.config.model import Timeouts, UpstreamGroup
from trioproxy.engine import Engine
from trioproxy.http.parsers import client_factory, server_factory
from trioproxy.server.connection import ClientConnection, ServerState
from trioproxy.snapshot import Route, Snapshot
from trioproxy.upstream.origin import Origin, UpstreamURL
from trioproxy.upstream.pool import UpstreamPool

Headers = list[tuple[bytes, bytes]]

UPSTREAM_URL = "http://up.test:80"
UPSTREAM = UpstreamURL.parse(UPSTREAM_URL)
ORIGIN = UPSTREAM.origin

READ_SIZE = 65536

#: The parser seam implementation ``start_proxy`` uses when not told ("h11" or
#: "httptools"); a test module parametrizes it with an autouse fixture.
PARSER = "h11"


def known_bug(
    request: pytest.FixtureRequest, implementation: str, *, where: str | set[str], bug: str
) -> None:
    """Strict-xfail the running test when it runs on parser ``where`` (a reported bug)."""
    if implementation == where or (isinstance(where, set) and implementation in where):
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"BUG ({implementation}): {bug}"))


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lowercase), or None."""
    for field_name, value in headers:
        if field_name.lower() == name:
            return bytes(value)
    return None


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [bytes(value) for field_name, value in headers if field_name.lower() == name]


# --- the upstream's side ---------------------------------------------------------------


@attrs.define
class ReceivedRequest:
    """A request as the fake upstream read it."""

    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes
    body: bytes = b""
    #: The request's end of message arrived (False: the proxy closed midway).
    complete: bool = False

    def header(self, name: bytes) -> bytes | None:
        return header(self.headers, name)

    def header_values(self, name: bytes) -> list[bytes]:
        return header_values(self.headers, name)


@attrs.frozen
class Reply:
    """What the default handler answers: a head, then ``body`` written chunk by chunk."""

    status: int = 200
    headers: Headers = attrs.Factory(list)
    body: Sequence[bytes] = ()


def ok(body: bytes = b"hello", *headers: tuple[bytes, bytes]) -> Reply:
    """A 200 with a Content-Length body."""
    return Reply(200, [(b"content-length", str(len(body)).encode()), *headers], [body])


App = Callable[[ReceivedRequest], Awaitable[Reply]]


async def hello_app(request: ReceivedRequest) -> Reply:
    return ok()


class UpstreamPeer:
    """The fake upstream's end of one connection, with an h11 SERVER parser at hand."""

    def __init__(self, stream: trio.abc.Stream, index: int) -> None:
        self.stream = stream
        self.index = index
        self.h11 = h11.Connection(h11.SERVER)
        self.requests: list[ReceivedRequest] = []
        #: Set once this end saw the proxy close the connection (EOF or a broken write).
        self.closed_by_proxy = trio.Event()
        #: Set when a request head was read (the request may still be streaming in).
        self.head_received = trio.Event()

    async def receive_some(self) -> bytes:
        try:
            data = bytes(await self.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed_by_proxy.set()
        return data

    async def send(self, data: bytes | None) -> None:
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed_by_proxy.set()

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event; ``ConnectionClosed`` when the proxy closed (also midway)."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return h11.ConnectionClosed()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.receive_some())
                continue
            if type(event) is h11.ConnectionClosed:
                self.closed_by_proxy.set()
            return cast("h11.Event | type[h11.PAUSED]", event)

    async def read_head(self) -> ReceivedRequest | None:
        """Read the next request head, or None when the proxy closed the connection."""
        event = await self.next_event()
        if type(event) is not h11.Request:
            return None
        request = ReceivedRequest(
            event.method, event.target, list(event.headers), event.http_version
        )
        self.requests.append(request)
        self.head_received.set()
        return request

    async def read_body_event(self, request: ReceivedRequest) -> bytes | None:
        """The next body chunk; b"" at the end of the request, None if the proxy closed."""
        event = await self.next_event()
        if type(event) is h11.Data:
            request.body += event.data
            return bytes(event.data)
        if type(event) is h11.EndOfMessage:
            request.complete = True
            return b""
        return None

    async def read_request(self) -> ReceivedRequest | None:
        """Read a whole request (head and body), or None if the proxy closed first."""
        request = await self.read_head()
        if request is None:
            return None
        while True:
            chunk = await self.read_body_event(request)
            if chunk is None:
                return None
            if chunk == b"":
                return request

    async def respond(self, reply: Reply) -> None:
        """Send ``reply``; its body is left out where HTTP has none (HEAD, 204, 304)."""
        await self.send(
            self.h11.send(h11.Response(status_code=reply.status, headers=reply.headers))
        )
        head_request = bool(self.requests) and self.requests[-1].method == b"HEAD"
        if not head_request and reply.status not in (204, 304):
            for chunk in reply.body:
                await self.send(self.h11.send(h11.Data(data=chunk)))
        await self.send(self.h11.send(h11.EndOfMessage()))

    def next_cycle(self) -> bool:
        """Start the next request/response cycle; False if the connection must close."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    async def wait_for_eof(self) -> None:
        """Read and discard until the proxy closes its side."""
        while await self.receive_some():
            pass

    async def aclose(self) -> None:
        await self.stream.aclose()


Handler = Callable[[UpstreamPeer], Awaitable[None]]


def serve_app(app: App) -> Handler:
    """A keep-alive HTTP/1.1 server loop answering every request with ``app``."""

    async def handler(peer: UpstreamPeer) -> None:
        while True:
            request = await peer.read_request()
            if request is None:
                return
            await peer.respond(await app(request))
            if not peer.next_cycle():
                await peer.aclose()
                return

    return handler


class FakeUpstream:
    """The pool's connector: each call "accepts" a connection served by ``handler``.

    Args:
        nursery: where the handler tasks run (the test's).
        handler: per-connection behaviour; defaults to ``serve_app(app)``.
        app: the default handler's answer to each request.
        refuse: the connector raises ``OSError(111, "Connection refused")``, as a
            closed port would.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        handler: Handler | None = None,
        *,
        app: App = hello_app,
        refuse: bool = False,
    ) -> None:
        self.nursery = nursery
        self.handler = handler if handler is not None else serve_app(app)
        self.refuse = refuse
        self.peers: list[UpstreamPeer] = []
        self.origins: list[Origin] = []

    @property
    def accepted(self) -> int:
        return len(self.peers)

    @property
    def requests(self) -> list[ReceivedRequest]:
        return [request for peer in self.peers for request in peer.requests]

    async def connector(self, origin: Origin) -> trio.abc.Stream:
        if self.refuse:
            raise OSError(111, "Connection refused")
        self.origins.append(origin)
        proxy_end, upstream_end = trio.testing.memory_stream_pair()
        peer = UpstreamPeer(upstream_end, len(self.peers))
        self.peers.append(peer)
        self.nursery.start_soon(self._run, peer)
        return proxy_end

    async def _run(self, peer: UpstreamPeer) -> None:
        try:
            await self.handler(peer)
        finally:
            await trio.aclose_forcefully(peer.stream)


# --- the client's side -----------------------------------------------------------------


@attrs.define
class ClientResponse:
    status: int
    headers: Headers
    body: bytes
    http_version: bytes
    #: The response's end of message arrived; False if the connection ended first.
    complete: bool
    informational: list[int] = attrs.Factory(list)

    def header(self, name: bytes) -> bytes | None:
        return header(self.headers, name)

    def header_values(self, name: bytes) -> list[bytes]:
        return header_values(self.headers, name)


class MemoryClient:
    """The test's end of a client connection, driven with an h11 CLIENT parser."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        #: Set when the proxy's ``ClientConnection.serve()`` returned.
        self.served = trio.Event()
        self._eof = False
        self._raw_parser: h11.Connection | None = None

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers | None = None,
        body: bytes | None = None,
        *,
        end: bool = True,
    ) -> None:
        """Send a request head (a ``Host`` is added if missing), the body and its end."""
        headers = list(headers or [])
        if header(headers, b"host") is None:
            headers.insert(0, (b"host", b"proxy.test"))
        if body is not None and header(headers, b"content-length") is None:
            if header(headers, b"transfer-encoding") is None:
                headers.append((b"content-length", str(len(body)).encode()))
        await self.send_raw(
            self.h11.send(h11.Request(method=method, target=target, headers=headers))
        )
        if body:
            await self.send_body(body)
        if end:
            await self.send_end()

    async def send_body(self, data: bytes) -> None:
        await self.send_raw(self.h11.send(h11.Data(data=data)) or b"")

    async def send_end(self) -> None:
        await self.send_raw(self.h11.send(h11.EndOfMessage()) or b"")

    async def _receive(self) -> bytes:
        try:
            data = bytes(await self.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._eof = True
            # The handler closes its stream before an exception leaves serve(): let a
            # crash reach the test's nursery (and fail the test) before we go on.
            await trio.testing.wait_all_tasks_blocked()
        return data

    async def next_event(self) -> h11.Event:
        """The next h11 event (the client never pipelines, so never PAUSED)."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._receive())
                continue
            assert event is not h11.PAUSED
            return cast(h11.Event, event)

    async def read_response(self) -> ClientResponse:
        """Read one response; ``complete`` is False if the connection ended midway."""
        informational: list[int] = []
        while True:
            event = await self.next_event()
            if type(event) is h11.InformationalResponse:
                informational.append(event.status_code)
                continue
            break
        assert type(event) is h11.Response, f"expected a response, got {event!r}"
        response = ClientResponse(
            event.status_code,
            list(event.headers),
            b"",
            event.http_version,
            complete=False,
            informational=informational,
        )
        while True:
            try:
                event = await self.next_event()
            except h11.RemoteProtocolError:
                return response  # EOF before the end of the body
            if type(event) is h11.Data:
                response.body += event.data
            elif type(event) is h11.EndOfMessage:
                response.complete = True
                return response
            else:  # pragma: no cover
                raise AssertionError(f"unexpected {event!r} in a response body")

    async def read_informational(self) -> int:
        event = await self.next_event()
        assert type(event) is h11.InformationalResponse, event
        return event.status_code

    def next_cycle(self) -> None:
        self.h11.start_next_cycle()

    async def read_raw_response_body(self) -> bytes | None:
        """The body of the next response to requests sent with ``send_raw`` (pipelined...).

        Parsed by a second h11 client that pretends to have sent a GET for each response;
        None once the proxy closed the connection instead of answering.
        """
        parser = self._raw_parser
        if parser is None:
            parser = self._raw_parser = h11.Connection(h11.CLIENT)
        elif parser.their_state is h11.ERROR:
            return None
        else:
            parser.start_next_cycle()
        parser.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"p")]))
        parser.send(h11.EndOfMessage())
        body = b""
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError:
                return None
            if event is h11.NEED_DATA:
                parser.receive_data(await self._receive())
            elif type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                return body

    async def read_raw(self) -> bytes:
        """Whatever arrives until the proxy closes the connection."""
        chunks = []
        while data := await self._receive():
            chunks.append(data)
        return b"".join(chunks)

    async def wait_closed(self) -> bytes:
        """Wait until the proxy closed the connection; return any bytes past the last event."""
        leftover = bytes(self.h11.trailing_data[0])
        if self._eof:
            return leftover
        return leftover + await self.read_raw()

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- the proxy -------------------------------------------------------------------------


@attrs.define
class Proxy:
    upstream: FakeUpstream
    pool: UpstreamPool
    engine: Engine
    state: ServerState
    nursery: trio.Nursery
    #: The one route (catch-all) and its group.
    route: Route
    clients: list[MemoryClient] = attrs.Factory(list)
    #: Exceptions that escaped ``serve()`` (the listener would log them and drop the
    #: connection); they are re-raised too, so an unexpected one fails the test.
    crashes: list[BaseException] = attrs.Factory(list)

    @property
    def group(self) -> LiveGroup:
        assert self.route.group is not None
        return self.route.group

    def connect(self) -> MemoryClient:
        """A new client connection, served by ``ClientConnection(..., state).serve()``."""
        client_end, proxy_end = trio.testing.memory_stream_pair()
        client = MemoryClient(client_end)
        self.clients.append(client)
        self.nursery.start_soon(self._serve, proxy_end, client)
        return client

    async def _serve(self, stream: trio.abc.Stream, client: MemoryClient) -> None:
        try:
            await ClientConnection(stream, self.state).serve()
        except Exception as exc:
            self.crashes.append(exc)
            raise
        finally:
            client.served.set()


def start_proxy(
    nursery: trio.Nursery,
    upstream: FakeUpstream | None = None,
    *,
    read_timeout: float = 30.0,
    header_timeout: float = 10.0,
    body_timeout: float = 60.0,
    keepalive_timeout: float = 75.0,
    max_header_size: int = 65536,
    max_body_size: int | None = None,
    connect_timeout: float = 5.0,
    pool_timeout: float = 30.0,
    idle_timeout: float = 60.0,
    max_per_origin: int = 16,
    parser: str | None = None,
) -> Proxy:
    """Pool, engine and server state wired as ``ProxyServer`` does, to ``upstream``.

    ``max_body_size`` goes to the handler (declared lengths up front, streamed bodies
    as they arrive), as the listener sets it. ``parser`` (default: the module's
    ``PARSER``) picks the seam implementation for both sides.
    """
    parser = parser or PARSER
    if upstream is None:
        upstream = FakeUpstream(nursery)
    pool = UpstreamPool(
        connect_timeout=connect_timeout,
        pool_timeout=pool_timeout,
        idle_timeout=idle_timeout,
        max_per_origin=max_per_origin,
        max_head_size=max_header_size,
        connector=upstream.connector,
        protocol_factory=client_factory(parser),
    )
    group = LiveGroup(
        settings=UpstreamGroup(
            name="default",
            servers=(TargetSpec(url=UPSTREAM),),
            timeouts=Timeouts(connect=connect_timeout, read=read_timeout),
        ),
        balancer=Balancer.of_urls([UPSTREAM]),
        pool=pool,
        health=HealthService([]),
        retry=RetryPolicy(),
        budget=RetryBudget(),
    )
    engine = Engine()
    route = Route.to_group(group, max_body_size=max_body_size)
    engine.snapshot = Snapshot.of_routes([route])
    state = ServerState(
        engine,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        keepalive_timeout=keepalive_timeout,
        max_header_size=max_header_size,
        protocol_factory=server_factory(parser),
    )
    return Proxy(upstream, pool, engine, state, nursery, route)


#: Fake seconds after which a test counts as hung.
CEILING = 3600.0


@pytest.fixture(autouse=True)
async def fake_time_ceiling(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """Fail a test still blocked after CEILING s of fake time, at once (not at the
    60 s real-time limit). Autouse in every module that imports it."""

    async def ceiling() -> None:
        await trio.sleep(CEILING)
        raise AssertionError(f"still blocked after {CEILING} s of fake time")

    nursery.start_soon(ceiling)
